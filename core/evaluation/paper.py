"""The seed paper's evaluator (`evaluate_cascade_pseudolabels.py`), as `core.evaluation.paper_rules` implements
it: prediction and ground truth resized NEAREST to 512 x 1024, unassigned predictions not
counted, its own panoptic segments and no void or crowd rules. tests/test_seed_eval.py checks it
against a loop-by-loop transcription of the script."""

from collections.abc import Callable

import numpy as np

from core.evaluation.base import Evaluator, ImageToScore
from core.classes import NUM_CLASSES
from core.evaluation.paper_rules import seed_confusion, seed_ground_truth, seed_pq_scores, seed_pq_stats, seed_semantic_scores


class SeedEvaluator(Evaluator):
    """Scores the targets made at every pixel that `scores(target)` accepts."""

    name = "seed"

    def __init__(self, scores: Callable[[str], bool] = lambda target: True):
        self.scores = scores

    def process(self, image: ImageToScore) -> dict[str, np.ndarray]:
        out, done = {}, {}
        for name, labels in image.targets.items():
            if labels.stride != 1 or not self.scores(name):
                continue
            if id(labels) not in done:
                done[id(labels)] = self._score(image, labels.train_ids)
            out[f"seed/confusion/{name}"], out[f"seed/pq/{name}"] = done[id(labels)]
        return out

    @staticmethod
    def _score(image: ImageToScore, train_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if image.truth is None:
            return np.zeros((NUM_CLASSES, NUM_CLASSES), np.int64), np.zeros((NUM_CLASSES, 4), np.float64)
        if "seed_truth" not in image.cache:  # resized and segmented once for every labelling of the image
            image.cache["seed_truth"] = seed_ground_truth(image.truth.train_ids, image.truth.instance_ids)
        truth = image.cache["seed_truth"]
        return seed_confusion(truth, train_ids), seed_pq_stats(truth, train_ids)

    def evaluate(self, totals: dict[str, np.ndarray]) -> dict:
        out = {}
        for key, confusion in totals.items():
            if key.startswith("seed/confusion/"):
                target = key.removeprefix("seed/confusion/")
                out[target] = {"semantic": seed_semantic_scores(confusion),
                               "panoptic": seed_pq_scores(totals[f"seed/pq/{target}"])}
        return out
