"""The paper's evaluator: semantic mIoU and panoptic PQ as its scripts compute them.

A re-implementation of `mbps_pytorch/evaluate_cascade_pseudolabels.py` (GitHub
qbit-glitch/unsupervised_panoptic_segmentation; `evaluate_semantic` and `evaluate_panoptic` with
the default `thing_mode="connected_components"` and the standard 11 stuff / 8 things split), so
that our numbers can be set beside the paper's. Per image, prediction (trainIds, 255 = none) and
ground truth are resized with PIL NEAREST to 512 x 1024 (H x W), whatever their size. Then:

Semantic: a 19 x 19 confusion over pixels whose ground truth is one of the 19 classes *and* whose
prediction is < 19 -- a pixel predicted 255 (or >= 19) is dropped, not scored as a miss. IoU =
TP / (TP + FP + FN), mIoU = mean over classes with a non-zero denominator, pixel accuracy =
trace / total of that confusion.

Panoptic: the prediction has one segment per stuff class (0..10) kept if >= 64 px, and for thing
classes (11..18) the 4-connected components of each class, kept if >= 10 px. The ground truth has
one segment per stuff class of the semantic map (>= 64 px) and one per instanceId >= 1000 of a
thing class (>= 10 px), instances painted over stuff. Segments of a class match at IoU > 0.5.

Differences from the official Cityscapes evaluation (`cityscapesscripts`, i.e. `core.evaluation.metrics`,
`core.evaluation.pq`):
  - evaluated at 512 x 1024, not at the full 1024 x 2048;
  - unassigned predictions (255) on labelled pixels are not counted (officially a false negative);
  - no void or crowd handling in PQ: crowd regions (instanceId < 1000) are no ground-truth
    segment, void pixels count in every union, and an unmatched prediction lying on void or crowd
    is a false positive; small segments (< 64 px stuff, < 10 px things) are dropped on both sides;
  - PQ averages the classes, but SQ and RQ pool tp / fp / fn / iou_sum over classes
    (SQ = sum iou_sum / sum tp, RQ = sum tp / (sum tp + (sum fp + sum fn) / 2)).
The script's 1e-8 guards against division by zero are left out (they move results by < 1e-8
relative); where it reports 0 for an empty average we report None, like `core.evaluation.metrics`.
"""

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from core.classes import (
    CLASS_NAMES,
    LABEL_ID_TO_TRAIN_ID,
    NUM_CLASSES,
    STUFF_TRAIN_IDS,
    THING_TRAIN_IDS,
)
from core.evaluation.base import Evaluator, ImageToScore
from core.image_ops import connected_components, histogram, lookup, resize_nearest

PAPER_EVAL_HW = (512, 1024)
STUFF_MIN_AREA = 64
THING_MIN_AREA = 10
_IS_THING = np.isin(np.arange(NUM_CLASSES), THING_TRAIN_IDS)


@dataclass(frozen=True)
class PaperGroundTruth:
    """One image's ground truth as the script scores it, made once for all the predictions scored
    against it (`paper_ground_truth`): trainIds at PAPER_EVAL_HW and its panoptic segments."""

    train_ids: np.ndarray  # (512 * 1024,) uint8
    segments: np.ndarray  # (512, 1024) int32 segment ids, 0 = none
    classes: np.ndarray  # (n,) int64 class of segments 1..n


def paper_ground_truth(gt_train_ids: np.ndarray, gt_instance_ids: np.ndarray) -> PaperGroundTruth:
    sem = resize_nearest(gt_train_ids, PAPER_EVAL_HW)
    segments, classes = _gt_segments(sem, resize_nearest(gt_instance_ids, PAPER_EVAL_HW))
    return PaperGroundTruth(sem.ravel(), segments, np.array(classes, np.int64))


def paper_confusion(gt: PaperGroundTruth, pred_train_ids: np.ndarray) -> np.ndarray:
    """(19, 19) int64 pixel counts, rows ground truth, columns prediction (the script's transpose,
    our `core.evaluation.metrics` orientation), at PAPER_EVAL_HW; pixels with either side >= 19 are dropped."""
    return _confusion_at_eval_size(gt, resize_nearest(pred_train_ids, PAPER_EVAL_HW))


def _confusion_at_eval_size(gt: PaperGroundTruth, pred: np.ndarray) -> np.ndarray:
    """One count over the 256 x 256 (gt, pred) pairs of uint8 maps, the 19 x 19 of them kept."""
    pairs = np.bincount(gt.train_ids.astype(np.uint16) << 8 | pred.astype(np.uint8).ravel(), minlength=1 << 16)
    pairs = pairs.reshape(256, 256)
    return pairs[:NUM_CLASSES, :NUM_CLASSES].copy()


def paper_semantic_scores(conf: np.ndarray) -> dict:
    """mIoU, pixel accuracy and per-class IoU (fractions; None where undefined) of a summed confusion."""
    if conf.shape != (NUM_CLASSES, NUM_CLASSES):
        raise ValueError(f"confusion must be ({NUM_CLASSES}, {NUM_CLASSES}), got shape {conf.shape}")
    tp = np.diag(conf).astype(np.float64)
    den = conf.sum(0) + conf.sum(1) - tp
    iou = [float(t / d) if d > 0 else None for t, d in zip(tp, den)]
    present = [v for v in iou if v is not None]
    total = conf.sum()
    return {
        "miou": float(np.mean(present)) if present else None,
        "pixel_accuracy": float(tp.sum() / total) if total > 0 else None,
        "per_class_iou": dict(zip(CLASS_NAMES, iou)),
    }


def _stuff_segments(semantic: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, list[int]]:
    """One segment per stuff class of at least STUFF_MIN_AREA px (`counts`: `core.image_ops.histogram`):
    segment-id map (0 = none) and classes."""
    cats = [c for c in STUFF_TRAIN_IDS if counts[c] >= STUFF_MIN_AREA]
    ids = np.zeros(len(counts), np.int32)  # class -> its segment id
    ids[cats] = np.arange(1, len(cats) + 1)
    return lookup(semantic, ids), cats


def _paint(pan: np.ndarray, ids: np.ndarray) -> None:
    """Segments `ids` (0 = none) painted over `pan`."""
    on = ids > 0
    pan[on] = ids[on]


def _pred_segments(pred: np.ndarray) -> tuple[np.ndarray, list[int]]:
    """Segment-id map (0 = none) and the class of segments 1..n of the prediction. Each thing class's
    components are found within its bounding box: raster order there is raster order in the image,
    so the segments are numbered as the script numbers them."""
    present = histogram(pred)
    pan, cats = _stuff_segments(pred, present)
    things = [c for c in THING_TRAIN_IDS if present[c] >= THING_MIN_AREA]  # others: no component can be kept
    boxes = ndimage.find_objects(pred, max_label=NUM_CLASSES) if things else []  # class c's box at index c - 1
    for c in things:
        box = boxes[c - 1]
        mask = pred[box] == c
        comps, n = connected_components(mask, 4)  # scipy's default 4-connectivity, as in the script
        kept = np.flatnonzero(np.bincount(comps.ravel(), minlength=n + 1)[1:] >= THING_MIN_AREA) + 1
        ids = np.zeros(n + 1, np.int32)  # component -> its segment id, in the script's order
        ids[kept] = len(cats) + 1 + np.arange(len(kept))
        cats += [c] * len(kept)
        _paint(pan[box], ids[comps])
    return pan, cats


def _gt_segments(gt_sem: np.ndarray, gt_inst: np.ndarray) -> tuple[np.ndarray, list[int]]:
    pan, cats = _stuff_segments(gt_sem, histogram(gt_sem))
    uids = np.unique(gt_inst)
    inverse = np.searchsorted(uids, gt_inst)  # each pixel's index in uids (faster than unique's own inverse)
    counts = np.bincount(inverse.ravel(), minlength=len(uids))
    ids = np.zeros(len(uids), np.int32)  # instance -> its segment id
    for i, (uid, count) in enumerate(zip(uids, counts)):
        label_id = uid // 1000
        if uid < 1000 or label_id > 255 or count < THING_MIN_AREA:  # < 1000: crowd, no segment at all
            continue
        c = int(LABEL_ID_TO_TRAIN_ID[label_id])
        if c < NUM_CLASSES and _IS_THING[c]:
            cats.append(c)
            ids[i] = len(cats)
    _paint(pan, ids[inverse])  # painted after stuff: an instance wins over stuff
    return pan, cats


def paper_pq_stats(gt: PaperGroundTruth, pred_train_ids: np.ndarray) -> np.ndarray:
    """(19, 4) float64 per-class (tp, fp, fn, iou_sum) of one image at PAPER_EVAL_HW; sums over images."""
    return _pq_stats_at_eval_size(gt, resize_nearest(pred_train_ids, PAPER_EVAL_HW))


def _pq_stats_at_eval_size(gt: PaperGroundTruth, pred: np.ndarray) -> np.ndarray:
    gp, gc = gt.segments, gt.classes
    pp, pc = _pred_segments(pred)
    ng, npr = len(gc) + 1, len(pc) + 1
    inter = np.bincount(gp.ravel().astype(np.int64) * npr + pp.ravel(), minlength=ng * npr).reshape(ng, npr)
    union = inter.sum(1, keepdims=True) + inter.sum(0, keepdims=True) - inter
    iou = np.divide(inter, union, out=np.zeros(inter.shape), where=union > 0)[1:, 1:]
    pc = np.array(pc, np.int64)
    # The script matches greedily (best unmatched prediction per ground truth); with IoU > 0.5 and
    # non-overlapping segments every match is unique, so thresholding gives the same pairs.
    gi, pi = np.nonzero((iou > 0.5) & (gc[:, None] == pc[None, :]))
    stats = np.zeros((NUM_CLASSES, 4))
    stats[:, 0] = np.bincount(gc[gi], minlength=NUM_CLASSES)
    stats[:, 1] = np.bincount(pc, minlength=NUM_CLASSES) - stats[:, 0]
    stats[:, 2] = np.bincount(gc, minlength=NUM_CLASSES) - stats[:, 0]
    stats[:, 3] = np.bincount(gc[gi], weights=iou[gi, pi], minlength=NUM_CLASSES)
    return stats


def paper_pq_scores(stats: np.ndarray) -> dict:
    """PQ / SQ / RQ (fractions) from summed `paper_pq_stats`, with the paper's rules.

    PQ of a group = mean of per-class PQ over its classes with tp + fp + fn > 0; SQ and RQ of a
    group pool the counts over its classes. The script reports only the all-class SQ and RQ; the
    stuff / things ones here are the same pooling over the group. Per class SQ = 0 when tp = 0
    (as in the script); classes with tp + fp + fn = 0 are None (the script reports 0).
    """
    if stats.shape != (NUM_CLASSES, 4):
        raise ValueError(f"stats must be ({NUM_CLASSES}, 4), got shape {stats.shape}")
    tp, fp, fn, iou = stats.T
    den = tp + 0.5 * fp + 0.5 * fn
    present = (tp + fp + fn) > 0
    pq = np.divide(iou, den, out=np.zeros(NUM_CLASSES), where=present)
    sq = np.divide(iou, tp, out=np.zeros(NUM_CLASSES), where=tp > 0)
    rq = np.divide(tp, den, out=np.zeros(NUM_CLASSES), where=present)

    def group(sel: np.ndarray) -> dict:
        sel = sel & present
        if not sel.any():
            return {"pq": None, "sq": None, "rq": None, "n": 0}
        t = tp[sel].sum()
        return {
            "pq": float(pq[sel].mean()),
            "sq": float(iou[sel].sum() / t) if t > 0 else 0.0,
            "rq": float(t / den[sel].sum()),
            "n": int(sel.sum()),
        }

    return {
        "all": group(np.ones(NUM_CLASSES, bool)),
        "stuff": group(~_IS_THING),
        "things": group(_IS_THING),
        "per_class": {
            name: {
                "pq": float(pq[i]) if present[i] else None,
                "sq": float(sq[i]) if present[i] else None,
                "rq": float(rq[i]) if present[i] else None,
                "tp": int(tp[i]),
                "fp": int(fp[i]),
                "fn": int(fn[i]),
            }
            for i, name in enumerate(CLASS_NAMES)
        },
    }


class PaperEvaluator(Evaluator):
    """Scores the targets made at every pixel that `scores(target)` accepts."""

    name = "paper"

    def __init__(self, scores: Callable[[str], bool] = lambda target: True):
        self.scores = scores

    def process(self, image: ImageToScore) -> dict[str, np.ndarray]:
        out, done = {}, {}
        for name, labels in image.targets.items():
            if labels.stride != 1 or not self.scores(name):
                continue
            if id(labels) not in done:
                done[id(labels)] = self._score(image, labels.train_ids)
            out[f"paper/confusion/{name}"], out[f"paper/pq/{name}"] = done[id(labels)]
        return out

    @staticmethod
    def _score(image: ImageToScore, train_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if image.truth is None:
            return np.zeros((NUM_CLASSES, NUM_CLASSES), np.int64), np.zeros((NUM_CLASSES, 4), np.float64)
        if "paper_truth" not in image.cache:  # resized and segmented once for every labelling of the image
            image.cache["paper_truth"] = paper_ground_truth(image.truth.train_ids, image.truth.instance_ids)
        truth, pred = image.cache["paper_truth"], resize_nearest(train_ids, PAPER_EVAL_HW)  # resized once for both
        return _confusion_at_eval_size(truth, pred), _pq_stats_at_eval_size(truth, pred)

    def evaluate(self, totals: dict[str, np.ndarray]) -> dict:
        out = {}
        for key, confusion in totals.items():
            if key.startswith("paper/confusion/"):
                target = key.removeprefix("paper/confusion/")
                out[target] = {
                    "semantic": paper_semantic_scores(confusion),
                    "panoptic": paper_pq_scores(totals[f"paper/pq/{target}"]),
                }
        return out
