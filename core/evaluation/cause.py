"""CAUSE's test protocol for the baseline (test_tr.py), as `core.evaluation.cause_rules` implements it: the
baseline's clusters on the 322 centre crop (made by the label step, without and with CAUSE's CRF)
against the crop's 27 classes, one Hungarian matching over the (cluster, class) table of all crops."""

import numpy as np

from core.evaluation.cause_rules import crop_counts, hungarian_scores
from core.evaluation.base import Evaluator, ImageToScore
from core.classes import NUM_CLASSES_27
from core.inference.windows import cause_view

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
