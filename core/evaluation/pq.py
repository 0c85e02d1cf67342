"""Panoptic quality (PQ) that streams over images.

`pq_stats` scores one image's `core.panoptic.Panoptic` against the ground truth's as a (C, 4)
float64 array of per-class [tp, fp, fn, iou_sum]; arrays of many images add up (`np.sum` / `+`),
and `pq_scores` turns the sum into PQ / SQ / RQ. The rules are those of
`cityscapesscripts/evaluation/evalPanopticSemanticLabeling.py` (COCO panopticapi `pq_compute`):
  - a predicted and a ground-truth segment of the same class match when IoU > 0.5, where the
    union leaves out the predicted segment's pixels on void (the intersection with crowd stays);
  - crowd ground truth is never matched and never a false negative;
  - an unmatched prediction is a false positive unless more than half of its pixels lie on void
    or on a crowd region of its own class.
Scores are fractions in [0, 1], like `core.evaluation.metrics.semantic_scores`.
"""

import numpy as np

from core.classes import (
    CLASS_NAMES,
    NUM_CLASSES,
    THING_TRAIN_IDS,
)
from core.panoptic import Panoptic, segment_index

PQ_STAT_FIELDS = ("tp", "fp", "fn", "iou_sum")  # columns of a pq_stats array
TP, FP, FN, IOU_SUM = range(4)


def _pairs(gt_idx: np.ndarray, pred_idx: np.ndarray, n_gt: int, n_pred: int):
    """Sparse intersections: (gt index, pred index, pixel count), indices n_gt / n_pred = void."""
    cols = n_pred + 1
    code = gt_idx.ravel() * cols + pred_idx.ravel()
    size = (n_gt + 1) * cols
    if size <= 2 * code.size + 1_000_000:  # dense counting is cheap enough
        counts = np.bincount(code, minlength=size)
        nz = np.flatnonzero(counts)
        return nz // cols, nz % cols, counts[nz]
    codes, counts = np.unique(code, return_counts=True)
    return codes // cols, codes % cols, counts


def pq_stats(
    gt: Panoptic, pred: Panoptic, num_classes: int = NUM_CLASSES, gt_index: np.ndarray | None = None
) -> np.ndarray:
    """(C, 4) float64 per-class [tp, fp, fn, iou_sum] of one image; sums over images add up.
    `gt_index`: `segment_index(gt)`, where the caller scores several predictions against one gt."""
    if gt.ids.shape != pred.ids.shape:
        raise ValueError(f"ground truth shape {gt.ids.shape} and prediction shape {pred.ids.shape} differ")
    stats = np.zeros((num_classes, 4), dtype=np.float64)
    ng, npd = len(gt.segment_ids), len(pred.segment_ids)
    gt_index = segment_index(gt) if gt_index is None else gt_index
    gi, pi, inter = _pairs(gt_index, segment_index(pred), ng, npd)

    void_inter = np.zeros(npd, dtype=np.int64)  # each prediction's pixels on void ground truth
    on_void = (gi == ng) & (pi < npd)
    void_inter[pi[on_void]] = inter[on_void]

    # Matches: same class, non-crowd ground truth, IoU > 0.5 (unique by the > 0.5 rule).
    both = (gi < ng) & (pi < npd)
    gi_b, pi_b, in_b = gi[both], pi[both], inter[both]
    same_class = gt.category[gi_b] == pred.category[pi_b]
    cand = same_class & ~gt.iscrowd[gi_b]
    gi_c, pi_c, in_c = gi_b[cand], pi_b[cand], in_b[cand]
    union = pred.area[pi_c] + gt.area[gi_c] - in_c - void_inter[pi_c]
    iou = in_c / union
    match = iou > 0.5
    cat_m = gt.category[gi_c[match]]
    stats[:, TP] = np.bincount(cat_m, minlength=num_classes)
    stats[:, IOU_SUM] = np.bincount(cat_m, weights=iou[match], minlength=num_classes)
    gt_matched = np.zeros(ng, dtype=bool)
    gt_matched[gi_c[match]] = True
    pred_matched = np.zeros(npd, dtype=bool)
    pred_matched[pi_c[match]] = True

    # False negatives: unmatched non-crowd ground truth.
    fn = ~gt_matched & ~gt.iscrowd
    stats[:, FN] = np.bincount(gt.category[fn], minlength=num_classes)

    # False positives: unmatched predictions not mostly (> 0.5) on void or same-class crowd.
    crowd_inter = np.zeros(npd, dtype=np.int64)
    on_crowd = same_class & gt.iscrowd[gi_b]
    np.add.at(crowd_inter, pi_b[on_crowd], in_b[on_crowd])
    ignored = (void_inter + crowd_inter) / np.maximum(pred.area, 1) > 0.5
    fp = ~pred_matched & ~ignored
    stats[:, FP] = np.bincount(pred.category[fp], minlength=num_classes)
    return stats


def pq_scores(stats: np.ndarray, class_names: list[str] | None = None, thing_ids: list[int] | None = None) -> dict:
    """PQ / SQ / RQ from summed `pq_stats`; fractions in [0, 1] (like `semantic_scores`).

    Per class: PQ = iou_sum / (tp + fp/2 + fn/2), SQ = iou_sum / tp (0 when tp = 0),
    RQ = tp / (tp + fp/2 + fn/2). A class with tp + fp + fn = 0 is left out of the averages
    (as the official evaluator does) and reported as None (the official script reports 0.0).
    "all" / "stuff" / "things" average the classes' values; `n` counts the classes averaged,
    and an average over no class is None.
    """
    class_names = CLASS_NAMES if class_names is None else class_names
    thing_ids = THING_TRAIN_IDS if thing_ids is None else thing_ids
    if stats.ndim != 2 or stats.shape != (len(class_names), 4):
        raise ValueError(f"stats must be ({len(class_names)}, 4), got shape {stats.shape}")
    tp, fp, fn, iou = (stats[:, i] for i in range(4))
    den = tp + 0.5 * fp + 0.5 * fn
    present = (tp + fp + fn) > 0
    safe_den = np.where(present, den, 1.0)
    pq = np.where(present, iou / safe_den, np.nan)
    sq = np.where(present, iou / np.where(tp > 0, tp, 1.0), np.nan)  # iou_sum = 0 when tp = 0
    rq = np.where(present, tp / safe_den, np.nan)
    is_thing = np.zeros(len(class_names), dtype=bool)
    is_thing[list(thing_ids)] = True

    def average(sel: np.ndarray) -> dict:
        sel = sel & present
        n = int(sel.sum())
        if n == 0:
            return {"pq": None, "sq": None, "rq": None, "n": 0}
        return {"pq": float(pq[sel].mean()), "sq": float(sq[sel].mean()), "rq": float(rq[sel].mean()), "n": n}

    def value(x: float) -> float | None:
        return None if np.isnan(x) else float(x)

    return {
        "all": average(np.ones(len(class_names), dtype=bool)),
        "stuff": average(~is_thing),
        "things": average(is_thing),
        "per_class": {
            name: {
                "pq": value(pq[i]),
                "sq": value(sq[i]),
                "rq": value(rq[i]),
                "tp": int(tp[i]),
                "fp": int(fp[i]),
                "fn": int(fn[i]),
            }
            for i, name in enumerate(class_names)
        },
    }
