"""The main fit's label variants: the paper's labels and each optional refinement of them.

Under the paper protocol (labels at the resized size from the windows) the CRF is the paper's:
unary softmax(5 * class logits) at the resized size, the image resized as extract resizes it
(PIL bilinear; the paper passes BGR, which the bilateral kernel treats alike), NEAREST up.

Every variant turns one image's evidence into (trainIds, thing instances or None); None means
instances come from connected components, as the paper pipeline does. The label actor scores
each variant against the same ground truth, so the report compares them on equal terms.
"""

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from core.classes import IGNORE, NUM_CLASSES
from core.image_ops import resize_nearest
from core.inference.windows import resize_rgb
from core.labelling.assign import PixelAssigner, clusters_to_train_ids
from core.refine.crf import dense_crf
from core.refine.em import refine_semantic
from core.refine.paper_heuristics import denoise_by_prototypes, diffuse_by_neighbours
from core.refine.superpixels import refine_labels_by_superpixels, superpixels
from core.refine.things import split_things

REFINEMENTS = ("crf", "em_semantic", "em_things", "superpixels", "prototype_denoising", "knn_diffusion")
PAPER_CRF_SCALE = 5.0  # generate_overclustered_semantics.py: the CRF's unary is softmax(5 * class logits)
SINGLE_SCALE = "single_scale"  # scored beside a multi-scale seed, to measure what the scales add


@dataclass(frozen=True)
class RefineSettings:
    """The refinements' parameters (config section `refine`: `configs.specs.refine_settings`)."""

    tau: float = 0.05  # EM's softmax temperature
    iterations: int = 3  # EM rounds
    superpixel_step: int = 16  # the superpixel grid, in pixels


@dataclass
class ImageEvidence:
    image: np.ndarray  # (H, W, 3) uint8
    grids: list[tuple[np.ndarray, tuple[int, int]]]  # per scale: features (D, gh, gw), resized (h, w); base scale first
    patch_size: int
    plain_labels: np.ndarray  # (H, W) uint8 trainIds of the main fit
    class_logits: np.ndarray | None  # (C+1, H, W) float32 mean cosine logits of the main fit (for the CRF)
    resized_logits: np.ndarray | None = None  # (C, h, w) the paper's class logits at the resized size (its CRF's input)
    prototypes: np.ndarray | None = None  # (C, D) the main fit's class prototypes over the split (prototype denoising)


def enabled_variants(switched_on: set[str], multi_scale: bool) -> list[str]:
    """'plain' first, the base scale alone when the paper averages scales, then the refinements
    switched on (`REFINEMENTS` order)."""
    return ["plain", *([SINGLE_SCALE] if multi_scale else []), *(name for name in REFINEMENTS if name in switched_on)]


def run_variant(
    name: str, ev: ImageEvidence, centroids: np.ndarray, mapping: np.ndarray, refine: RefineSettings
) -> tuple[np.ndarray, np.ndarray | None]:
    h, w = ev.plain_labels.shape
    if name == "plain":
        return ev.plain_labels, None
    if name == "crf" and ev.resized_logits is not None:  # the paper's CRF: softmax(5 logits) at 322x644, NEAREST up
        resized = ev.resized_logits.shape[1:]
        probs = dense_crf(resize_rgb(ev.image, resized), ev.resized_logits, alpha=PAPER_CRF_SCALE)
        return resize_nearest(probs.argmax(axis=0).astype(np.uint8), (h, w)), None
    if name == "crf":
        scores = np.nan_to_num(ev.class_logits, neginf=-1.0)
        probs = dense_crf(ev.image, scores)  # (C+1, H, W)
        labels = probs.argmax(axis=0).astype(np.uint8)
        labels[labels == NUM_CLASSES] = IGNORE
        return labels, None
    features, resized = ev.grids[0]
    if name == SINGLE_SCALE:
        (cluster_map,), _ = PixelAssigner([centroids]).assign(ev.grids[:1], ev.patch_size, (h, w))
        return clusters_to_train_ids(cluster_map, mapping), None
    if name == "em_semantic":
        refined = refine_semantic(features, centroids, mapping, tau=refine.tau, T=refine.iterations)
        (cluster_map,), _ = PixelAssigner([refined]).assign(ev.grids, ev.patch_size, (h, w))
        return clusters_to_train_ids(cluster_map, mapping), None
    if name == "prototype_denoising":
        if ev.prototypes is None:
            raise ValueError("prototype denoising needs the main fit's class prototypes: fit again with this version")
        return denoise_by_prototypes(ev.plain_labels, features, ev.prototypes), None
    if name == "knn_diffusion":
        return diffuse_by_neighbours(ev.plain_labels, features, NUM_CLASSES), None
    if name == "em_things":
        instances = split_things(
            features, ev.plain_labels, tau=refine.tau, T=refine.iterations, resized_hw=resized, patch_size=ev.patch_size
        )
        return ev.plain_labels, instances
    if name == "superpixels":
        small = F.interpolate(
            torch.tensor(ev.image).permute(2, 0, 1)[None].float(),
            size=resized,
            mode="bilinear",
            antialias=True,
            align_corners=False,
        )[0].permute(1, 2, 0)
        sp = superpixels(
            features,
            small.round().clamp(0, 255).byte().numpy(),
            step=refine.superpixel_step,
            tau=refine.tau,
            T=refine.iterations,
            resized_hw=resized,
            patch_size=ev.patch_size,
        )
        return refine_labels_by_superpixels(ev.plain_labels, sp), None
    raise ValueError(f"unknown label variant {name!r}")
