"""One image through the label pass, without Ray: its labels for every fit and variant, and its scores.

`ImageLabeller.label` takes the patch-feature grids extract wrote (one per scale) and gives the
nearest-centroid cluster map of every fit and the main fit's label variants (trainIds + panoptic
segmentation, seconds). `image_scores` scores them against the image's ground truth: per fit the
(cluster, class) pixel counts and cluster wins (enough to score any mapping protocol later), per
variant the confusion matrix and panoptic match statistics, and per fit the protocol sensitivity:
its labels made both ways (`LABELLINGS`) and each scored by both evaluators (`EVALUATORS`).
`shard_scores` adds up the images of a shard into the arrays of its `scores/shard-*.npz`.
"""

import time
from dataclasses import dataclass

import numpy as np

from core.labelling import PixelAssigner, clusters_to_train_ids, subsample, window_cluster_maps
from core.labels import NUM_CLASSES, NUM_CLASSES_27
from core.mapping import cluster_class_counts
from core.metrics import confusion_matrix
from core.panoptic import Panoptic, panoptic_from_train_ids, pq_stats
from core.seed_baseline import is_one_window, merged_log_probs, seed_baseline_labels, seed_common_size
from core.seed_eval import resize_nearest, seed_confusion, seed_ground_truth, seed_pq_stats
from core.variants import ImageEvidence, run_variant
from core.windows import StoredWindows

# How pixel labels are made: at the image's full size (bilinear features, official), or at the
# resized size (322x644 for Cityscapes) and upsampled NEAREST (the seed's scripts).
LABELLINGS = ("full", "resized")
EVALUATORS = ("official", "seed")  # cityscapesscripts' rules (core.metrics, core.panoptic); the seed's (core.seed_eval)


def baseline_labellings(protocol: str, multi_scale: bool, crf: bool) -> list[str]:
    """The baseline's labels made in more ways, each scored by both evaluators beside its
    LABELLINGS rows. Under the seed protocol, the seed's CAUSE script (core.seed_baseline): on
    its windows at 1.0 and, with inference.scales other than [1.0], on its scales; with refine.crf
    each also with its CRF. Otherwise, with refine.crf, this tool's CRF at full size."""
    if protocol == "seed":
        kinds = ["windows", *(["multiscale"] if multi_scale else [])]
        return [name for kind in kinds for name in (kind, *([f"{kind}+crf"] if crf else []))]
    return ["full+crf"] if crf else []


@dataclass(frozen=True)
class LabelFit:
    name: str
    centroids: np.ndarray  # (k, D) unit rows
    mapping: np.ndarray  # (k,) cluster -> trainId (255: none)
    stride: int = 1  # scored on every stride-th pixel in each direction
    prototypes: np.ndarray | None = None  # (C, D) class prototypes (the main fit's, for prototype denoising)


@dataclass
class ImageLabels:
    cluster_maps: list[np.ndarray]  # per fit, the protocol's labelling: (H, W) or its stride subsample
    variants: list[tuple[np.ndarray, Panoptic, float]]  # per variant: trainIds (H, W), panoptic, seconds
    # per LABELLINGS entry, per fit: its cluster map, (H, W); "full" only at the fit's stride
    labellings: dict[str, list[np.ndarray]]
    baseline_labellings: dict[str, np.ndarray]  # per `baseline_labellings` name: the baseline's trainIds (H, W)


class ImageLabeller:
    """`fits`: the main fit first; `variants`: the main fit's variants to make ('seed' first), and,
    when `baseline` is set, the last fit's own labels as one more variant (named after it) and
    its `baseline_labellings`."""

    def __init__(self, fits: list[LabelFit], variants: list[str], refine, panoptic, baseline: bool,
                 device="cpu", labelling: str = "full", extra_baseline: list[str] = ()):
        if fits[0].stride != 1 or (baseline and fits[-1].stride != 1):
            raise ValueError("the main fit and the baseline are labelled at every pixel (stride 1)")
        if labelling not in LABELLINGS:
            raise ValueError(f"unknown labelling {labelling!r}; allowed: {', '.join(LABELLINGS)}")
        self.fits, self.variants, self.refine, self.panoptic, self.baseline = fits, variants, refine, panoptic, baseline
        self.labelling, self.device = labelling, device
        self.extra_baseline = list(extra_baseline) if baseline else []
        self.main = PixelAssigner([fits[0].centroids], device=device)
        self.others = PixelAssigner([f.centroids for f in fits[1:]], device=device, strides=[f.stride for f in fits[1:]])
        self.resized = PixelAssigner([f.centroids for f in fits], device=device)

    def _resized_maps(self, grids, patch_size: int, image_hw: tuple[int, int], windows) -> tuple[list[np.ndarray], np.ndarray | None]:
        """Every fit's labels made at the resized size, NEAREST-upsampled to the image: from the
        windows' pixel map where extract kept the windows (the seed's merge), else from the grid.
        With the seed's labelling, its windows and a CRF variant, also the main fit's class logits
        at the resized size (the seed's CRF input)."""
        logits = None
        if windows is not None:
            seed_crf = self.labelling == "resized" and "crf" in self.variants
            maps, logits = window_cluster_maps(windows.windows, windows.axis_weights, [f.centroids for f in self.fits], self.device,
                                               first_fit_mapping=self.fits[0].mapping if seed_crf else None)
        else:
            maps = self.resized.assign(grids[:1], patch_size, grids[0][1])[0]
        return [resize_nearest(m, image_hw) for m in maps], logits

    def label(self, grids: list[tuple[np.ndarray, tuple[int, int]]], patch_size: int, image_hw: tuple[int, int],
              image: np.ndarray | None = None, windows: StoredWindows | None = None) -> ImageLabels:
        """grids: per scale (features (D, gh, gw), resized (h, w)), the base scale first. `image`
        (H, W, 3) uint8 is needed by the variants that look at colour (crf, superpixels).
        windows: `core.windows.StoredWindows` where extract kept the windows (the seed protocol)."""
        main = self.fits[0]
        start = time.perf_counter()
        # the full-size class logits feed this tool's CRF; the seed's takes them at the resized size from the windows
        full_crf = "crf" in self.variants and (self.labelling == "full" or windows is None)
        (main_map,), logits = self.main.assign(grids, patch_size, image_hw, num_classes=NUM_CLASSES,
                                               first_fit_mapping=main.mapping if full_crf else None)
        other_maps = self.others.assign(grids, patch_size, image_hw)[0] if len(self.fits) > 1 else []
        full = [main_map, *other_maps]
        resized_maps, resized_logits = self._resized_maps(grids, patch_size, image_hw, windows)
        labellings = {"full": full, "resized": resized_maps}
        main_map, *other_maps = full if self.labelling == "full" else [
            subsample(m, f.stride) for m, f in zip(labellings["resized"], self.fits)]
        seed_labels = clusters_to_train_ids(main_map, main.mapping)
        seed_seconds = time.perf_counter() - start
        evidence = ImageEvidence(image=image, grids=grids, patch_size=patch_size, seed_labels=seed_labels, class_logits=logits,
                                 resized_logits=resized_logits, prototypes=main.prototypes)
        outcomes = []
        for name in self.variants:
            start = time.perf_counter()
            labels, instances = run_variant(name, evidence, main.centroids, main.mapping, self.refine)
            outcomes.append((labels, self.panoptic_of(labels, instances), seed_seconds + time.perf_counter() - start))
        if self.baseline:
            start = time.perf_counter()
            labels = clusters_to_train_ids(other_maps[-1], self.fits[-1].mapping)
            outcomes.append((labels, self.panoptic_of(labels, None), time.perf_counter() - start))
        extra = self._extra_baseline(grids, patch_size, image_hw, image, windows)
        return ImageLabels([main_map, *other_maps], outcomes, labellings, extra)

    def _extra_baseline(self, grids, patch_size: int, image_hw: tuple[int, int], image: np.ndarray | None,
                        windows) -> dict[str, np.ndarray]:
        """The baseline's `baseline_labellings`: trainIds (H, W) per name."""
        fit, out, log_probs = self.fits[-1], {}, {}
        for name in self.extra_baseline:
            kind, crf = name.split("+")[0], name.endswith("+crf")
            if kind == "full":  # this tool's CRF on the baseline's class logits at full size
                (cluster_map,), logits = PixelAssigner([fit.centroids], device=self.device).assign(
                    grids, patch_size, image_hw, first_fit_mapping=fit.mapping, num_classes=NUM_CLASSES)
                evidence = ImageEvidence(image=image, grids=grids, patch_size=patch_size,
                                         seed_labels=clusters_to_train_ids(cluster_map, fit.mapping), class_logits=logits)
                out[name] = run_variant("crf", evidence, fit.centroids, fit.mapping, self.refine)[0]
                continue
            if kind not in log_probs:  # the seed's CAUSE script, on its windows at 1.0 or on its scales
                scale_windows = [windows.single] if kind == "windows" else windows.scales
                crop = windows.windows.shape[-1] * patch_size
                common = seed_common_size(*image_hw, crop, patch_size)
                if kind == "windows" and is_one_window(windows.single[1], crop):  # the script keeps the patch logits
                    common = (crop // patch_size, crop // patch_size)
                log_probs[kind] = merged_log_probs(scale_windows, fit.centroids, crop, patch_size, common)
            out[name] = seed_baseline_labels(log_probs[kind], fit.mapping, image_hw, image if crf else None)
        return out

    def panoptic_of(self, labels: np.ndarray, instances: np.ndarray | None) -> Panoptic:
        p = self.panoptic
        return panoptic_from_train_ids(labels, instances, min_area=p.thing_min_area, stuff_min_area=p.stuff_min_area,
                                       connectivity=p.connectivity)


def sensitivity_scores(labeller: ImageLabeller, labels: ImageLabels, gt: np.ndarray | None, gt_pan: Panoptic | None,
                       gt_instances: np.ndarray | None) -> dict[str, np.ndarray]:
    """Per fit and labelling: the official confusion (F, L, C, C+1) on the fit's pixels, the
    seed's (F, L, C, C), and panoptic statistics (F, L, evaluator, C, 4). A labelling that exists
    only at a stride (the sweep's extra fits, full size) gets the official confusion only. The
    same for the baseline's `baseline_labellings` (B, ...): base_confusion, base_seed_confusion, base_pq."""
    n_fit, n_lab, n_base = len(labeller.fits), len(LABELLINGS), len(labeller.extra_baseline)
    out = {"sens_confusion": np.zeros((n_fit, n_lab, NUM_CLASSES, NUM_CLASSES + 1), np.int64),
           "sens_seed_confusion": np.zeros((n_fit, n_lab, NUM_CLASSES, NUM_CLASSES), np.int64),
           "sens_pq": np.zeros((n_fit, n_lab, len(EVALUATORS), NUM_CLASSES, 4), np.float64),
           "base_confusion": np.zeros((n_base, NUM_CLASSES, NUM_CLASSES + 1), np.int64),
           "base_seed_confusion": np.zeros((n_base, NUM_CLASSES, NUM_CLASSES), np.int64),
           "base_pq": np.zeros((n_base, len(EVALUATORS), NUM_CLASSES, 4), np.float64)}
    if gt is None:
        return out
    seed_gt = seed_ground_truth(gt, gt_instances)  # resized and segmented once for every labelling below
    for b, name in enumerate(labeller.extra_baseline):  # the baseline's labels made in more ways
        train_ids = labels.baseline_labellings[name]
        out["base_confusion"][b] = confusion_matrix(gt, train_ids, NUM_CLASSES)
        out["base_seed_confusion"][b] = seed_confusion(seed_gt, train_ids)
        out["base_pq"][b, 0] = pq_stats(gt_pan, labeller.panoptic_of(train_ids, None))
        out["base_pq"][b, 1] = seed_pq_stats(seed_gt, train_ids)
    # the main fit's and the baseline's own labels already have their panoptic segments (variants)
    own = LABELLINGS.index(labeller.labelling)
    segmented = {(0, own): labels.variants[0][1]} | ({(n_fit - 1, own): labels.variants[-1][1]} if labeller.baseline else {})
    for f, fit in enumerate(labeller.fits):
        for l, labelling in enumerate(LABELLINGS):
            cluster_map = labels.labellings[labelling][f]
            train_ids = clusters_to_train_ids(cluster_map, fit.mapping)
            if cluster_map.shape != gt.shape:
                out["sens_confusion"][f, l] = confusion_matrix(subsample(gt, fit.stride), train_ids, NUM_CLASSES)
                continue
            out["sens_confusion"][f, l] = confusion_matrix(gt, train_ids, NUM_CLASSES)
            panoptic = segmented[(f, l)] if (f, l) in segmented else labeller.panoptic_of(train_ids, None)
            out["sens_pq"][f, l, 0] = pq_stats(gt_pan, panoptic)
            out["sens_seed_confusion"][f, l] = seed_confusion(seed_gt, train_ids)
            out["sens_pq"][f, l, 1] = seed_pq_stats(seed_gt, train_ids)
    return out


def image_scores(labels: ImageLabels, fits: list[LabelFit], gt: np.ndarray | None,
                 gt_pan: Panoptic | None) -> dict[str, np.ndarray]:
    """One image's counts: wins_<fit> (k,), pixel_counts_<fit> (k, C) on the fit's pixels;
    variant_confusion (V, C, C+1), variant_pq (V, C, 4), variant_seconds (V,). Without ground
    truth the counts against it are zero."""
    n_var = len(labels.variants)
    out = {"variant_confusion": np.zeros((n_var, NUM_CLASSES, NUM_CLASSES + 1), np.int64),
           "variant_pq": np.zeros((n_var, NUM_CLASSES, 4), np.float64),
           "variant_seconds": np.array([seconds for _, _, seconds in labels.variants], np.float64)}
    for fit, cluster_map in zip(fits, labels.cluster_maps):
        k = len(fit.mapping)
        out[f"wins_{fit.name}"] = np.bincount(cluster_map.ravel(), minlength=k)
        out[f"pixel_counts_{fit.name}"] = (cluster_class_counts(cluster_map, subsample(gt, fit.stride), k, NUM_CLASSES)
                                          if gt is not None else np.zeros((k, NUM_CLASSES), np.int64))
    if gt is not None:
        for v, (train_ids, panoptic, _) in enumerate(labels.variants):
            out["variant_confusion"][v] = confusion_matrix(gt, train_ids, NUM_CLASSES)
            out["variant_pq"][v] = pq_stats(gt_pan, panoptic)
    return out


def shard_scores(image_ids: list[str], folds: list[int], scores: list[dict[str, np.ndarray]], fits: list[LabelFit],
                 variants: list[str], num_folds: int, cause: bool = False, extra_baseline: list[str] = ()) -> dict[str, np.ndarray]:
    """The images of a shard (in shard order) -> the arrays of its scores npz: per fit the pixel
    counts by held-out fold (F, k, C) and the wins; per variant the summed confusion and seconds;
    per image the panoptic statistics (so float sums never depend on the sharding)."""
    n_var, n_fit, n_lab, n_base = len(variants), len(fits), len(LABELLINGS), len(extra_baseline)
    arrays = {"image_ids": np.array(image_ids, dtype=np.str_), "variants": np.array(variants, dtype=np.str_),
              "variant_confusion": sum((s["variant_confusion"] for s in scores), np.zeros((n_var, NUM_CLASSES, NUM_CLASSES + 1), np.int64)),
              "variant_seconds": sum((s["variant_seconds"] for s in scores), np.zeros(n_var)),
              "image_pq": np.array([s["variant_pq"] for s in scores], np.float64).reshape(-1, n_var, NUM_CLASSES, 4),
              "sens_confusion": sum((s["sens_confusion"] for s in scores), np.zeros((n_fit, n_lab, NUM_CLASSES, NUM_CLASSES + 1), np.int64)),
              "sens_seed_confusion": sum((s["sens_seed_confusion"] for s in scores), np.zeros((n_fit, n_lab, NUM_CLASSES, NUM_CLASSES), np.int64)),
              "image_sens_pq": np.array([s["sens_pq"] for s in scores], np.float64).reshape(
                  -1, n_fit, n_lab, len(EVALUATORS), NUM_CLASSES, 4),
              "baseline_labellings": np.array(list(extra_baseline), dtype=np.str_),
              "base_confusion": sum((s["base_confusion"] for s in scores), np.zeros((n_base, NUM_CLASSES, NUM_CLASSES + 1), np.int64)),
              "base_seed_confusion": sum((s["base_seed_confusion"] for s in scores), np.zeros((n_base, NUM_CLASSES, NUM_CLASSES), np.int64)),
              "image_base_pq": np.array([s["base_pq"] for s in scores], np.float64).reshape(len(scores), n_base, len(EVALUATORS), NUM_CLASSES, 4)}
    if cause:  # the baseline on CAUSE's crops (the cause protocol)
        arrays["cause_counts"] = sum((s["cause_counts"] for s in scores), np.zeros((2, len(fits[-1].mapping), NUM_CLASSES_27), np.int64))
    for fit in fits:
        k = len(fit.mapping)
        counts = np.zeros((num_folds, k, NUM_CLASSES), np.int64)
        for fold, s in zip(folds, scores):
            counts[fold] += s[f"pixel_counts_{fit.name}"]
        arrays[f"pixel_counts_{fit.name}"] = counts
        arrays[f"wins_{fit.name}"] = sum((s[f"wins_{fit.name}"] for s in scores), np.zeros(k, np.int64))
    return arrays
