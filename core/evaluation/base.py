"""The evaluator contract: one image's labels and ground truth in, counts that add up out.

The label step makes label maps and knows no metric; an evaluator scores them. As in
detectron2's `DatasetEvaluator` (reset / process / evaluate), but split for a distributed run:

  process(image)   -> {name: array} counts of one image, on the worker that scores it;
  (the counts of every image are added up: per shard by `add_images`, then over shards by the
   report with `add_totals`; nothing an evaluator keeps between images);
  evaluate(totals) -> numbers, in the report.

How counts add up is fixed by their names and types, so every evaluator sums alike and no sum
depends on how images were sharded:
  - integer arrays are summed (exact in any order);
  - a name ending in FOLD_SUFFIX is an integer array summed per held-out fold of its images: the
    shard and the report hold it with a leading fold axis (the mapping protocols need it);
  - float arrays (PQ's iou sums) are kept per image and summed in image-id order by the report.
"""

from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import numpy as np

from core.labelling.maps import LabelMap
from core.panoptic import Panoptic, panoptic_from_train_ids

FOLD_SUFFIX = "@fold"


@dataclass(frozen=True)
class PanopticRules:
    """How predicted panoptic segments are made from trainIds (config section `panoptic`)."""

    thing_min_area: int = 64
    stuff_min_area: int = 64
    connectivity: int = 8


class Segmenter:
    """One panoptic segmentation per distinct label map of an image, shared by the PNG writer and
    every evaluator that needs segments. Label maps are told apart by identity: the label step
    hands the same `LabelMap` object wherever it means the same labels (and pickling keeps that)."""

    def __init__(self, rules: PanopticRules, known: dict[int, tuple[LabelMap, Panoptic]] | None = None):
        self.rules = rules
        self._done: dict[int, tuple[LabelMap, Panoptic]] = dict(known or {})

    def __call__(self, labels: LabelMap) -> Panoptic:
        if id(labels) not in self._done:
            r = self.rules
            panoptic = panoptic_from_train_ids(
                labels.train_ids,
                labels.instances,
                min_area=r.thing_min_area,
                stuff_min_area=r.stuff_min_area,
                connectivity=r.connectivity,
            )
            self._done[id(labels)] = (labels, panoptic)  # the map is kept: its id stays its own
        return self._done[id(labels)][1]


@dataclass
class GroundTruth:
    """One image's ground truth, read once for every evaluator."""

    label_ids: np.ndarray  # (H, W) uint8 Cityscapes labelIds
    train_ids: np.ndarray  # (H, W) uint8 trainIds, 255 = void
    instance_ids: np.ndarray  # (H, W) Cityscapes instanceIds
    panoptic: Panoptic  # the official ground-truth segments (`core.panoptic.gt_panoptic`)


@dataclass
class ImageToScore:
    """What an evaluator sees of one image. `truth` is None for an image without ground truth:
    its counts are zeros of the same shapes, so every image of a run has the same arrays."""

    targets: dict[str, LabelMap]  # named labellings: "variant/<v>", "fit/<fit>/<labelling>", "baseline/<labelling>"
    clusters: dict[str, tuple[np.ndarray, int]]  # per fit: its cluster map (protocol's labelling) and stride
    cluster_counts: dict[str, int]  # per fit: k
    crops: dict[str, np.ndarray]  # "crop", "crop+crf": the baseline's clusters on CAUSE's centre crop, where made
    truth: GroundTruth | None
    fold: int
    segment: Segmenter
    cache: dict = field(default_factory=dict)  # per image: what evaluators derive once (e.g. the paper's resized truth)


class Evaluator(ABC):
    """Scores some of an image's targets under one set of rules."""

    name: str

    @abstractmethod
    def process(self, image: ImageToScore) -> dict[str, np.ndarray]:
        """One image -> its counts, named `<evaluator>/...` (see the module docstring for how they add up)."""

    @abstractmethod
    def evaluate(self, totals: dict[str, np.ndarray]) -> dict:
        """The summed counts of every image -> this evaluator's numbers (JSON-safe)."""


def add_images(counts: list[dict[str, np.ndarray]], folds: list[int], num_folds: int) -> dict[str, np.ndarray]:
    """The counts of a shard's images (in shard order) -> the shard's arrays (module docstring)."""
    out: dict[str, np.ndarray] = {}
    for name in counts[0] if counts else ():
        arrays = [c[name] for c in counts]
        if name.endswith(FOLD_SUFFIX):
            total = np.zeros((num_folds, *arrays[0].shape), arrays[0].dtype)
            for fold, array in zip(folds, arrays):
                total[fold] += array
            out[name] = total
        elif np.issubdtype(arrays[0].dtype, np.floating):
            out[name] = np.stack(arrays)
        else:
            out[name] = np.sum(arrays, axis=0, dtype=arrays[0].dtype)
    return out


def add_totals(shards: list[tuple[list[str], dict[str, np.ndarray]]]) -> dict[str, np.ndarray]:
    """Every shard's (image ids, arrays) -> the run's totals: integer arrays summed, per-image float
    arrays summed in image-id order (the same bits however the images were sharded)."""
    names = dict.fromkeys(name for _, arrays in shards for name in arrays)  # a shard of failed images has none
    totals = {}
    for name in names:
        parts = [(image_ids, arrays[name]) for image_ids, arrays in shards if name in arrays]
        if np.issubdtype(parts[0][1].dtype, np.floating):
            ids = np.array([i for image_ids, _ in parts for i in image_ids], dtype=np.str_)
            totals[name] = np.concatenate([a for _, a in parts])[np.argsort(ids, kind="stable")].sum(axis=0)
        else:
            totals[name] = np.sum([a for _, a in parts], axis=0, dtype=parts[0][1].dtype)
    return totals
