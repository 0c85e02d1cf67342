"""The official Cityscapes rules (cityscapesscripts), at full resolution.

Per fit: the (cluster, class) pixel counts of its labels on the image's valid pixels, by held-out
fold: every mapping protocol's mIoU (same-set, held-out, label-free, few-shot, human) is computed
from them in the report (`core.mapping.protocols`). Per target: the confusion matrix (`core.evaluation.metrics`:
void pixels skipped, a pixel predicted 255 is a miss) and, at every pixel, the panoptic match
statistics (`core.evaluation.pq`: IoU > 0.5, void and crowd rules). tests/test_official_eval.py checks
both against cityscapesscripts itself.
"""

from collections.abc import Callable

import numpy as np

from core.classes import CLASS_NAMES, NUM_CLASSES
from core.evaluation.base import FOLD_SUFFIX, Evaluator, ImageToScore
from core.evaluation.metrics import confusion_matrix, semantic_scores
from core.evaluation.pq import pq_scores, pq_stats
from core.labelling.maps import subsample
from core.mapping.majority import cluster_class_counts
from core.panoptic import segment_index


class OfficialEvaluator(Evaluator):
    """`scores(target)`: which of an image's targets it scores (every one by default)."""

    name = "official"

    def __init__(self, scores: Callable[[str], bool] = lambda target: True):
        self.scores = scores

    def process(self, image: ImageToScore) -> dict[str, np.ndarray]:
        truth, out = image.truth, {}
        for fit, (clusters, stride) in image.clusters.items():
            k = image.cluster_counts[fit]
            out[f"official/clusters/{fit}{FOLD_SUFFIX}"] = (
                cluster_class_counts(clusters, subsample(truth.train_ids, stride), k, NUM_CLASSES)
                if truth is not None
                else np.zeros((k, NUM_CLASSES), np.int64)
            )
        done = {}  # one scoring per distinct label map
        for name, labels in image.targets.items():
            if not self.scores(name):
                continue
            if id(labels) not in done:
                done[id(labels)] = self._score(image, labels)
            confusion, pq = done[id(labels)]
            out[f"official/confusion/{name}"] = confusion
            if pq is not None:
                out[f"official/pq/{name}"] = pq
        return out

    @staticmethod
    def _score(image: ImageToScore, labels) -> tuple[np.ndarray, np.ndarray | None]:
        full = labels.stride == 1  # a labelling made only at a stride gets no panoptic segments
        if image.truth is None:
            return (
                np.zeros((NUM_CLASSES, NUM_CLASSES + 1), np.int64),
                np.zeros((NUM_CLASSES, 4), np.float64) if full else None,
            )
        confusion = confusion_matrix(subsample(image.truth.train_ids, labels.stride), labels.train_ids, NUM_CLASSES)
        if not full:
            return confusion, None
        if "official_gt_index" not in image.cache:  # the ground truth's segments indexed once per image
            image.cache["official_gt_index"] = segment_index(image.truth.panoptic)
        return confusion, pq_stats(
            image.truth.panoptic, image.segment(labels), gt_index=image.cache["official_gt_index"]
        )

    def evaluate(self, totals: dict[str, np.ndarray]) -> dict:
        """Per target: semantic scores and, where it was segmented, PQ / SQ / RQ."""
        out = {}
        for key, confusion in totals.items():
            if key.startswith("official/confusion/"):
                target = key.removeprefix("official/confusion/")
                pq = totals.get(f"official/pq/{target}")
                out[target] = {
                    "semantic": semantic_scores(confusion, CLASS_NAMES),
                    "panoptic": None if pq is None else pq_scores(pq),
                }
        return out
