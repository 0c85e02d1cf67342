"""One image through the label step, without Ray: every label map the run asks for, and no score.

`ImageLabeller.label` takes the patch-feature grids extract wrote (one per scale) and gives each
fit's nearest-centroid cluster map (the protocol's labelling) and the named label maps to score
(`ImageLabels.targets`): the main fit's label variants, the baseline's labels, and where asked
(`LabelRequest`) every fit labelled both ways (`LABELLINGS`, the protocol sensitivity), the
baseline's labels made in more ways and its clusters on CAUSE's centre crop. What scores them is
`core.evaluation`, a separate step: nothing here knows a metric.
"""

import time
from dataclasses import dataclass

import numpy as np

from core.classes import NUM_CLASSES
from core.image_ops import resize_nearest
from core.inference.paper_windows import is_one_window, paper_common_size
from core.inference.windows import StoredWindows
from core.labelling.assign import PixelAssigner, clusters_to_train_ids, window_cluster_maps
from core.labelling.cause_crop import crop_clusters
from core.labelling.maps import ImageLabels, LabelMap, subsample
from core.labelling.paper_baseline import merged_log_probs, paper_baseline_labels
from core.labelling.variants import ImageEvidence, run_variant

# How pixel labels are made: at the image's full size (bilinear features, official), or at the
# resized size (322x644 for Cityscapes) and upsampled NEAREST (the paper's scripts).
LABELLINGS = ("full", "resized")


def baseline_labellings(protocol: str, multi_scale: bool, crf: bool) -> list[str]:
    """The baseline's labels made in more ways, for the protocol sensitivity. Under the paper
    protocol, the paper's CAUSE script (core.labelling.paper_baseline): on its windows at 1.0 and, with
    inference.scales other than [1.0], on its scales; with refine.crf each also with its CRF.
    Otherwise, with refine.crf, this tool's CRF at full size."""
    if protocol == "paper":
        kinds = ["windows", *(["multiscale"] if multi_scale else [])]
        return [name for kind in kinds for name in (kind, *([f"{kind}+crf"] if crf else []))]
    return ["full+crf"] if crf else []


@dataclass(frozen=True)
class LabelFit:
    name: str
    centroids: np.ndarray  # (k, D) unit rows
    mapping: np.ndarray  # (k,) cluster -> trainId (255: none)
    stride: int = 1  # labelled on every stride-th pixel in each direction (its labels are never written)
    prototypes: np.ndarray | None = None  # (C, D) class prototypes (the main fit's, for prototype denoising)


def label_fits(fits: list[dict]) -> list[LabelFit]:
    """The broadcast fits (main first, baseline last), each at its pixel stride
    (`storage.run.fits.fit_pixel_stride`)."""
    return [LabelFit(f["name"], f["centroids"], f["mapping"], f["stride"], f.get("prototypes")) for f in fits]


@dataclass(frozen=True)
class LabelRequest:
    """What a run asks the labeller for besides each fit's clusters and the main fit's variants."""

    baseline: bool = True  # the last fit's own labels as one more target, "variant/<its name>"
    both_labellings: bool = False  # every fit labelled both ways, "fit/<fit>/<labelling>" (protocol sensitivity)
    baseline_labellings: tuple[str, ...] = ()  # "baseline/<name>" (`baseline_labellings`)
    cause_crop: bool = False  # the baseline's clusters on CAUSE's crop, "crop" and "crop+crf"


class ImageLabeller:
    """`fits`: the main fit first (and, with `request.baseline`, the baseline last); `variants`: the
    main fit's variants to make ('plain' first); `labelling`: the protocol's (`LABELLINGS`)."""

    def __init__(
        self,
        fits: list[LabelFit],
        variants: list[str],
        refine,
        device="cpu",
        labelling: str = "full",
        request: LabelRequest = LabelRequest(baseline=False),
    ):
        if fits[0].stride != 1 or (request.baseline and fits[-1].stride != 1):
            raise ValueError("the main fit and the baseline are labelled at every pixel (stride 1)")
        if labelling not in LABELLINGS:
            raise ValueError(f"unknown labelling {labelling!r}; allowed: {', '.join(LABELLINGS)}")
        self.fits, self.variants, self.refine, self.request = fits, variants, refine, request
        self.labelling, self.device = labelling, device
        self.main = PixelAssigner([fits[0].centroids], device=device)
        self.others = PixelAssigner(
            [f.centroids for f in fits[1:]], device=device, strides=[f.stride for f in fits[1:]]
        )
        self.resized = PixelAssigner([f.centroids for f in fits], device=device)

    def _resized_maps(
        self, grids, patch_size: int, image_hw: tuple[int, int], windows
    ) -> tuple[list[np.ndarray], np.ndarray | None]:
        """Every fit's labels made at the resized size, NEAREST-upsampled to the image: from the
        windows' pixel map where extract kept the windows (the paper's merge), else from the grid.
        With the paper's labelling, its windows and a CRF variant, also the main fit's class logits
        at the resized size (the paper's CRF input)."""
        logits = None
        if windows is not None:
            paper_crf = self.labelling == "resized" and "crf" in self.variants
            maps, logits = window_cluster_maps(
                windows.windows,
                windows.axis_weights,
                [f.centroids for f in self.fits],
                self.device,
                first_fit_mapping=self.fits[0].mapping if paper_crf else None,
            )
        else:
            maps = self.resized.assign(grids[:1], patch_size, grids[0][1])[0]
        return [resize_nearest(m, image_hw) for m in maps], logits

    def label(
        self,
        grids: list[tuple[np.ndarray, tuple[int, int]]],
        patch_size: int,
        image_hw: tuple[int, int],
        image: np.ndarray | None = None,
        windows: StoredWindows | None = None,
        cause_grids: tuple[np.ndarray, np.ndarray] | None = None,
        cause_rgb: np.ndarray | None = None,
    ) -> ImageLabels:
        """grids: per scale (features (D, gh, gw), resized (h, w)), the base scale first. `image`
        (H, W, 3) uint8 is needed by the variants that look at colour (crf, superpixels).
        windows: `core.inference.windows.StoredWindows` where extract kept the windows (the paper protocol).
        cause_grids, cause_rgb: CAUSE's crop (its two passes' features, the crop's pixels), for
        `request.cause_crop`."""
        main = self.fits[0]
        start = time.perf_counter()
        labellings = {self.labelling} | (set(LABELLINGS) if self.request.both_labellings else set())
        # the full-size class logits feed this tool's CRF; the paper's takes them at the resized size from the windows
        full_crf = "crf" in self.variants and (self.labelling == "full" or windows is None)
        maps, logits, resized_logits = {}, None, None
        if "full" in labellings or full_crf:
            (main_map,), logits = self.main.assign(
                grids,
                patch_size,
                image_hw,
                num_classes=NUM_CLASSES,
                first_fit_mapping=main.mapping if full_crf else None,
            )
            other_maps = self.others.assign(grids, patch_size, image_hw)[0] if len(self.fits) > 1 else []
            maps["full"] = [main_map, *other_maps]
        if "resized" in labellings:
            maps["resized"], resized_logits = self._resized_maps(grids, patch_size, image_hw, windows)
        own = (
            maps["full"]
            if self.labelling == "full"
            else [subsample(m, f.stride) for m, f in zip(maps["resized"], self.fits)]
        )
        clusters = {f.name: m for f, m in zip(self.fits, own)}
        plain_labels = clusters_to_train_ids(own[0], main.mapping)
        assign_seconds = time.perf_counter() - start
        evidence = ImageEvidence(
            image=image,
            grids=grids,
            patch_size=patch_size,
            plain_labels=plain_labels,
            class_logits=logits,
            resized_logits=resized_logits,
            prototypes=main.prototypes,
        )
        targets, seconds = {}, {}
        for name in self.variants:
            start = time.perf_counter()
            labels, instances = run_variant(name, evidence, main.centroids, main.mapping, self.refine)
            targets[f"variant/{name}"] = LabelMap(labels, instances)
            seconds[name] = assign_seconds + time.perf_counter() - start
        if self.request.baseline:
            start = time.perf_counter()
            targets[f"variant/{self.fits[-1].name}"] = LabelMap(clusters_to_train_ids(own[-1], self.fits[-1].mapping))
            seconds[self.fits[-1].name] = time.perf_counter() - start
        if self.request.both_labellings:
            targets |= self._every_labelling(maps, targets)
        log_probs = {}  # per kind of the paper's script: with and without its CRF start from the same
        for name in self.request.baseline_labellings:
            targets[f"baseline/{name}"] = LabelMap(
                self._baseline_labelling(name, grids, patch_size, image_hw, image, windows, log_probs)
            )
        crops = {}
        if self.request.cause_crop:
            plain, flipped = cause_grids
            crops = crop_clusters(plain, flipped, self.fits[-1].centroids, cause_rgb)
        return ImageLabels(clusters, targets, seconds, crops)

    def _every_labelling(self, maps: dict[str, list[np.ndarray]], targets: dict[str, LabelMap]) -> dict[str, LabelMap]:
        """Every fit labelled both ways; the protocol's own labelling of the main fit and of the
        baseline is the same map as their variant ("plain", the baseline's), and the same object."""
        own = {(self.fits[0].name, self.labelling): targets["variant/plain"]}
        if self.request.baseline:
            own[(self.fits[-1].name, self.labelling)] = targets[f"variant/{self.fits[-1].name}"]
        out = {}
        for labelling in LABELLINGS:
            for fit, cluster_map in zip(self.fits, maps[labelling]):
                stride = fit.stride if labelling == "full" else 1
                out[f"fit/{fit.name}/{labelling}"] = own.get((fit.name, labelling)) or LabelMap(
                    clusters_to_train_ids(cluster_map, fit.mapping), stride=stride
                )
        return out

    def _baseline_labelling(
        self,
        name: str,
        grids,
        patch_size: int,
        image_hw: tuple[int, int],
        image: np.ndarray | None,
        windows,
        log_probs: dict[str, np.ndarray],
    ) -> np.ndarray:
        """One of the baseline's `baseline_labellings`: trainIds (H, W)."""
        fit = self.fits[-1]
        kind, crf = name.split("+")[0], name.endswith("+crf")
        if kind == "full":  # this tool's CRF on the baseline's class logits at full size
            (cluster_map,), logits = PixelAssigner([fit.centroids], device=self.device).assign(
                grids, patch_size, image_hw, first_fit_mapping=fit.mapping, num_classes=NUM_CLASSES
            )
            evidence = ImageEvidence(
                image=image,
                grids=grids,
                patch_size=patch_size,
                plain_labels=clusters_to_train_ids(cluster_map, fit.mapping),
                class_logits=logits,
            )
            return run_variant("crf", evidence, fit.centroids, fit.mapping, self.refine)[0]
        if kind not in log_probs:  # the paper's CAUSE script, on its windows at 1.0 or on its scales
            scale_windows = [windows.single] if kind == "windows" else windows.scales
            crop = windows.windows.shape[-1] * patch_size
            common = paper_common_size(*image_hw, crop, patch_size)
            if kind == "windows" and is_one_window(windows.single[1], crop):  # the script keeps the patch logits
                common = (crop // patch_size, crop // patch_size)
            log_probs[kind] = merged_log_probs(scale_windows, fit.centroids, crop, patch_size, common)
        return paper_baseline_labels(log_probs[kind], fit.mapping, image_hw, image if crf else None)
