"""CAUSE's test protocol for a baseline's centroids (test_tr.py and utils/utils.py of
ByungKwanLee/Causal-Unsupervised-Segmentation), on the one 322x322 centre crop of each image.

Labelling: the crop's patch features are upsampled bilinearly (align_corners=False) to the
crop, each pixel L2-normalised, and compared by cosine with the L2-normalised centroids; the
pixel takes the best one. Without CRF (test_without_crf) the features come from one unflipped pass
with the whole model under fp16 autocast; with CRF (test) from the flip-averaged pass with
autocast around the backbone only (actors.window_features). With CRF: unary from the k-way
log_softmax(3 * cosine), CAUSE's kernels, the image rebuilt from the normalised tensor as
`VF.to_pil_image(invTrans(img))` does (its `mul(255).byte()` truncates), then argmax.
Scoring (STEGO's NiceTool): ground truth = labelIds 7..33 as classes 0..26 (the rest ignored),
a (cluster x class) pixel table summed over all crops, one Hungarian matching over the whole
table (maximising matched pixels), IoU = TP / (TP + FP + FN) per class, mIoU = mean over the
classes whose IoU is defined, accuracy = matched pixels / all counted pixels.
"""

import numpy as np
from scipy.optimize import linear_sum_assignment

from core.classes import IGNORE, LABEL_ID_TO_CLASS_27, NUM_CLASSES_27
from core.evaluation.base import Evaluator, ImageToScore
from core.inference.windows import cause_view

CLASS_NAMES_27 = [
    "road",
    "sidewalk",
    "parking",
    "rail track",
    "building",
    "wall",
    "fence",
    "guard rail",
    "bridge",
    "tunnel",
    "pole",
    "polegroup",
    "traffic light",
    "traffic sign",
    "vegetation",
    "terrain",
    "sky",
    "person",
    "rider",
    "car",
    "truck",
    "bus",
    "caravan",
    "trailer",
    "train",
    "motorcycle",
    "bicycle",
]


def crop_counts(clusters: np.ndarray, crop_label_ids: np.ndarray, k: int) -> np.ndarray:
    """(k, 27) int64 (cluster, class) pixel counts of one crop; classes are labelIds 7..33, the rest ignored."""
    gt = LABEL_ID_TO_CLASS_27[crop_label_ids].astype(np.int64).ravel()
    valid = gt != IGNORE
    flat = clusters.astype(np.int64).ravel()[valid] * NUM_CLASSES_27 + gt[valid]
    return np.bincount(flat, minlength=k * NUM_CLASSES_27).reshape(k, NUM_CLASSES_27)


def hungarian_scores(counts: np.ndarray) -> dict:
    """(k, 27) summed (cluster, class) pixel counts -> CAUSE's mIoU, accuracy and per-class IoU
    (fractions; None where undefined), after one Hungarian matching of clusters to classes."""
    rows, cols = linear_sum_assignment(counts, maximize=True)
    tp = np.zeros(NUM_CLASSES_27)
    predicted = np.zeros(NUM_CLASSES_27)  # pixels of the cluster matched to each class
    tp[cols] = counts[rows, cols]
    predicted[cols] = counts[rows].sum(axis=1)
    union = counts.sum(axis=0) + predicted - tp
    iou = np.divide(tp, union, out=np.full(NUM_CLASSES_27, np.nan), where=union > 0)
    total = counts.sum()
    return {
        "miou": float(np.nanmean(iou)) if (union > 0).any() else None,
        "pixel_accuracy": float(tp.sum() / total) if total else None,
        "per_class_iou": {name: None if np.isnan(v) else float(v) for name, v in zip(CLASS_NAMES_27, iou)},
        "mapping": {int(r): int(c) for r, c in zip(rows, cols)},
    }


CROPS = ("crop", "crop+crf")


class CauseEvaluator(Evaluator):
    """`k`: the baseline's cluster count; `short_side`, `crop`: CAUSE's view (inference.short_side, inference.crop)."""

    name = "cause"

    def __init__(self, k: int, short_side: int, crop: int):
        self.k, self.short_side, self.crop = k, short_side, crop

    def process(self, image: ImageToScore) -> dict[str, np.ndarray]:
        counts = np.zeros((len(CROPS), self.k, NUM_CLASSES_27), np.int64)
        if image.truth is not None:
            crop_ids = cause_view(image.truth.label_ids, self.short_side, self.crop)
            for i, name in enumerate(CROPS):
                counts[i] = crop_counts(image.crops[name], crop_ids, self.k)
        return {"cause/counts": counts}

    def evaluate(self, totals: dict[str, np.ndarray]) -> dict:
        return {name: hungarian_scores(totals["cause/counts"][i]) for i, name in enumerate(CROPS)}
