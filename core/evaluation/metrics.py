"""Semantic segmentation metrics that stream: per-image confusion matrices sum to the dataset's.

The confusion matrix is (C, C+1): rows are ground-truth classes, columns 0..C-1 predicted
classes, and column C counts valid ground-truth pixels whose prediction is no class at all
(255 from a cluster that a one-to-one matching left unmapped). Keeping that column, rather than
dropping those pixels, scores them as misses (false negatives of their true class), as an
argmax over clusters followed by the mapping would.
"""

import numpy as np
from PIL import Image


def confusion_matrix(gt: np.ndarray, pred: np.ndarray, num_classes: int, ignore: int = 255) -> np.ndarray:
    """(C, C+1) int64 pixel counts; pixels with gt == ignore or gt outside [0, C) are skipped."""
    if gt.shape != pred.shape:
        raise ValueError(f"ground truth shape {gt.shape} and prediction shape {pred.shape} differ")
    if gt.dtype == pred.dtype == np.uint8 and num_classes < 255 and ignore >= num_classes:
        # label maps: one count over the 256 x 256 (gt, pred) pairs, folded into (C, C+1)
        pairs = np.bincount((gt.astype(np.uint16) << 8 | pred).ravel(), minlength=1 << 16).reshape(256, 256)
        return np.concatenate(
            [pairs[:num_classes, :num_classes], pairs[:num_classes, num_classes:].sum(1, keepdims=True)], 1
        )
    g = gt.ravel().astype(np.int64)
    p = pred.ravel().astype(np.int64)
    valid = (g >= 0) & (g < num_classes) & (g != ignore)
    col = np.where((p >= 0) & (p < num_classes), p, num_classes)  # anything else: "unassigned"
    flat = np.bincount(g[valid] * (num_classes + 1) + col[valid], minlength=num_classes * (num_classes + 1))
    return flat.reshape(num_classes, num_classes + 1)


def _check_confusion(conf: np.ndarray) -> int:
    """C of a (C, C+1) confusion, or of a plain (C, C) one (no unassigned column)."""
    if conf.ndim != 2 or conf.shape[1] not in (conf.shape[0], conf.shape[0] + 1):
        raise ValueError(f"confusion matrix must be (C, C+1) or (C, C), got shape {conf.shape}")
    return conf.shape[0]


def iou_per_class(conf: np.ndarray) -> np.ndarray:
    """(C,) float64 TP / (TP + FP + FN); NaN for a class absent from both ground truth and prediction."""
    c = _check_confusion(conf)
    tp = np.diag(conf[:, :c]).astype(np.float64)
    gt_total = conf.sum(axis=1)  # TP + FN, unassigned pixels included
    pred_total = conf[:, :c].sum(axis=0)  # TP + FP
    union = gt_total + pred_total - tp
    iou = np.full(c, np.nan)
    np.divide(tp, union, out=iou, where=union > 0)
    return iou


# How a mean IoU averages the classes. "present": the classes in ground truth or prediction (cityscapesscripts,
# whose IoU of a class with no pixel on either side is NaN and left out). "all": every class, one absent from both
# counting 0, as the paper's patch-level sweep averages (overclustering_cause.py in qbit-glitch/
# unsupervised_panoptic_segmentation: `iou = tp / denom if denom > 0 else 0.0`, then `np.mean` over the 19).
MIOU_RULES = {
    "present": "mean over the classes present in ground truth or prediction",
    "all": "mean over all {num_classes} classes, an absent class counting 0 (the paper's rule)",
}


def miou_rule_text(rule: str, num_classes: int) -> str:
    return MIOU_RULES[rule].format(num_classes=num_classes)


def mean_iou(conf: np.ndarray, rule: str = "present") -> float:
    """Mean IoU by `rule` (MIOU_RULES); NaN where no ground-truth pixel was scored (or, for
    "present", no class is present)."""
    iou = iou_per_class(conf)
    if rule == "all":
        return float(np.nan_to_num(iou, nan=0.0).mean()) if conf.sum() > 0 else float("nan")
    if rule != "present":
        raise ValueError(f"unknown mIoU rule {rule!r}; allowed: {', '.join(MIOU_RULES)}")
    present = ~np.isnan(iou)
    return float(iou[present].mean()) if present.any() else float("nan")


def pixel_accuracy(conf: np.ndarray) -> float:
    """Correct / all valid ground-truth pixels (unassigned pixels are wrong); NaN if there are none."""
    c = _check_confusion(conf)
    total = conf.sum()
    return float(np.trace(conf[:, :c]) / total) if total > 0 else float("nan")


def _json_float(value: float) -> float | None:
    return None if np.isnan(value) else float(value)


def semantic_scores(conf: np.ndarray, class_names: list[str], miou_rule: str = "present") -> dict:
    """JSON-safe summary; values are fractions in [0, 1], None where undefined (NaN); the mIoU
    averaged by `miou_rule` (MIOU_RULES), which it records."""
    if len(class_names) != conf.shape[0]:
        raise ValueError(f"{len(class_names)} class names for a confusion matrix of {conf.shape[0]} classes")
    iou = iou_per_class(conf)
    return {
        "miou": _json_float(mean_iou(conf, miou_rule)),
        "miou_rule": miou_rule,
        "pixel_accuracy": _json_float(pixel_accuracy(conf)),
        "per_class_iou": {name: _json_float(v) for name, v in zip(class_names, iou)},
        "num_pixels": int(conf.sum()),
    }


def patch_majority_labels(
    label_map: np.ndarray, grid_h: int, grid_w: int, num_classes: int, ignore: int = 255
) -> np.ndarray:
    """(H, W) trainIds -> (grid_h, grid_w) uint8: each patch cell's most frequent valid trainId.

    Pixel (y, x) belongs to cell (floor(y * grid_h / H), floor(x * grid_w / W)), so sizes that do
    not divide evenly still give every pixel exactly one cell. Ties go to the lowest class id
    (argmax); a cell without any valid pixel is `ignore`.
    """
    if label_map.ndim != 2:
        raise ValueError(f"label map must be 2-D (H, W), got shape {label_map.shape}")
    h, w = label_map.shape
    if not (1 <= grid_h <= h and 1 <= grid_w <= w):
        raise ValueError(f"patch grid {grid_h}x{grid_w} does not fit a {h}x{w} label map: every cell needs a pixel")
    cell_y = np.arange(h) * grid_h // h
    cell_x = np.arange(w) * grid_w // w
    cell = (cell_y[:, None] * grid_w + cell_x[None, :]).ravel()
    labels = label_map.ravel().astype(np.int64)
    valid = (labels >= 0) & (labels < num_classes) & (labels != ignore)
    counts = np.bincount(cell[valid] * num_classes + labels[valid], minlength=grid_h * grid_w * num_classes)
    counts = counts.reshape(grid_h * grid_w, num_classes)
    majority = np.where(counts.any(axis=1), counts.argmax(axis=1), ignore).astype(np.uint8)
    return majority.reshape(grid_h, grid_w)


def patch_nearest_labels(label_map: np.ndarray, grid_h: int, grid_w: int) -> np.ndarray:
    """(H, W) trainIds -> (grid_h, grid_w) uint8: one PIL NEAREST sample per patch (the paper's patch
    labels), pixel (floor((i + 0.5) H / grid_h), floor((j + 0.5) W / grid_w)); 255 stays ignore."""
    if label_map.ndim != 2:
        raise ValueError(f"label map must be 2-D (H, W), got shape {label_map.shape}")
    return np.asarray(Image.fromarray(label_map.astype(np.uint8)).resize((grid_w, grid_h), Image.NEAREST))
