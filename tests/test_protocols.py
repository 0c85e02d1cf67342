import numpy as np
import pytest

from core.mapping.protocols import (
    confusion_from_cluster_counts,
    few_shot_scores,
    heldout_mappings,
    label_free_mapping,
    protocol_scores,
)

NAMES = ["a", "b"]


def test_confusion_from_cluster_counts_sums_clusters_into_mapped_columns():
    counts = np.array([[5, 1], [0, 4], [2, 2]])  # (k=3, C=2)
    conf = confusion_from_cluster_counts(counts, np.array([0, 1, 255]))
    assert conf.tolist() == [[5, 0, 2], [1, 4, 2]]


def test_heldout_mapping_uses_only_other_folds():
    fold_counts = np.array([[[9, 0]], [[0, 1]], [[0, 1]]])  # one cluster; fold 0 says a, folds 1-2 say b
    assert heldout_mappings(fold_counts).tolist() == [[1], [0], [0]]


def test_label_free_mapping_goes_through_the_baseline_clusters():
    co = np.array([[3, 1], [0, 7], [2, 2]])  # 3 clusters vs 2 baseline clusters
    assert label_free_mapping(co, np.array([1, 0])).tolist() == [1, 0, 1]


def test_one_cluster_per_patch_is_an_oracle_same_set_but_not_held_out():
    # 8 patches, each its own cluster, in 4 folds of two; classes alternate.
    k, folds = 8, 4
    labels = np.array([0, 1] * 4)
    fold_counts = np.zeros((folds, k, 2), np.int64)
    for patch in range(k):
        fold_counts[patch // 2, patch, labels[patch]] = 1
    same_set = fold_counts.sum(axis=0).argmax(axis=1)
    scores = protocol_scores(fold_counts, fold_counts, same_set, None, NAMES)
    assert scores["same_set"]["miou"] == 1.0
    # the paper's rule: a class no patch has or is mapped to counts 0 in every protocol's mean
    padded = np.concatenate([fold_counts, np.zeros((folds, k, 1), np.int64)], axis=2)  # class c: no patch
    three = protocol_scores(padded, padded, same_set, same_set, NAMES + ["c"], "all")
    assert three["same_set"]["miou"] == three["label_free"]["miou"] == 2 / 3
    assert three["held_out"]["miou_rule"] == "all"
    assert three["held_out"]["miou"] == pytest.approx(scores["held_out"]["miou"] * 2 / 3)
    # Held out, a cluster's only patch is in the scored fold: its mapping falls back to the
    # majority class elsewhere and is right only by chance.
    assert scores["held_out"]["miou"] < 0.6
    assert scores["held_out"]["folds"] == 4


def test_few_shot_with_every_patch_is_the_held_out_mapping_and_one_look_costs_on_mixed_clusters():
    """Cluster 0 is pure class a; cluster 1 holds class b 3 : 1 over a in every fold. Looking at
    enough patches is the held-out majority (no spread over draws); one look at cluster 1 picks
    a in about a quarter of the draws, which lowers the mean and spreads it."""
    fold_counts = np.tile(np.array([[[6, 0], [1, 3]]]), (3, 1, 1))  # (F=3, k=2, C=2)
    pixels = fold_counts * 10
    held_out = protocol_scores(pixels, fold_counts, np.array([0, 1]), None, NAMES)["held_out"]["miou"]
    few = few_shot_scores(pixels, fold_counts, [1, 1000], draws=200, seed=0, class_names=NAMES)
    assert few["1000"]["miou_mean"] == held_out and few["1000"]["miou_std"] == 0.0
    assert few["1"]["miou_mean"] < held_out and few["1"]["miou_std"] > 0
    assert few_shot_scores(pixels, fold_counts, [1], draws=200, seed=0, class_names=NAMES) == {"1": few["1"]}  # seeded
    pure = np.tile(np.array([[[6, 0], [0, 4]]]), (3, 1, 1))
    assert few_shot_scores(pure, pure, [1], 5, 0, NAMES)["1"]["miou_mean"] == 1.0
    one_fold = fold_counts.copy()
    one_fold[1:] = 0
    assert few_shot_scores(pixels, one_fold, [1], 5, 0, NAMES) == {}  # held out needs two labelled folds
