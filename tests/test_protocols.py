import numpy as np

from core.protocols import confusion_from_cluster_counts, heldout_mappings, label_free_mapping, protocol_scores

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
    # Held out, a cluster's only patch is in the scored fold: its mapping falls back to the
    # majority class elsewhere and is right only by chance.
    assert scores["held_out"]["miou"] < 0.6
    assert scores["held_out"]["folds"] == 4
