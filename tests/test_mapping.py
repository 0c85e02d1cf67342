import numpy as np
import pytest

from core.mapping.majority import cluster_class_counts, hungarian_mapping, majority_mapping, predict_classes

# 5 clusters x 3 classes; column totals [11, 4, 8]
COUNTS = np.array(
    [
        [5, 1, 0],
        [0, 3, 3],  # tie between classes 1 and 2
        [0, 0, 0],  # no labelled patch
        [2, 0, 4],
        [4, 0, 1],
    ]
)


def test_cluster_class_counts_skips_ignore():
    ids = np.array([0, 0, 1, 2, 2, 2])
    labels = np.array([1, 1, 255, 0, 2, 0])
    expected = [[0, 2, 0], [0, 0, 0], [2, 0, 1], [0, 0, 0]]
    assert np.array_equal(cluster_class_counts(ids, labels, k=4, num_classes=3), expected)
    with pytest.raises(ValueError, match=r"\[0, 2\)"):
        cluster_class_counts(ids, labels, k=2, num_classes=3)


def test_majority_mapping_by_hand():
    # ties -> lowest class; the empty cluster 2 -> class 0, the most frequent overall
    mapping = majority_mapping(COUNTS)
    assert mapping.dtype == np.int64
    assert np.array_equal(mapping, [0, 1, 0, 2, 0])


def test_hungarian_leaves_extra_clusters_unmatched():
    # best one-to-one: 0->0 (5) + 1->1 (3) + 3->2 (4) = 12; next best 4->0, 1->1, 3->2 = 11
    assert np.array_equal(hungarian_mapping(COUNTS), [0, 1, 255, 2, 255])


def test_hungarian_with_fewer_clusters_than_classes():
    # 0->1 (5) + 1->2 (2) = 7 beats 0->0 + 1->1 = 5; class 0 gets no cluster
    assert np.array_equal(hungarian_mapping(np.array([[1, 5, 0], [0, 4, 2]])), [1, 2])


def test_mappings_follow_a_permutation_of_clusters():
    counts = np.random.default_rng(0).integers(0, 10_000, (12, 5))
    perm = np.random.default_rng(1).permutation(12)
    assert np.array_equal(majority_mapping(counts[perm]), majority_mapping(counts)[perm])
    assert np.array_equal(hungarian_mapping(counts[perm]), hungarian_mapping(counts)[perm])


def test_no_labelled_patches_is_an_error():
    with pytest.raises(ValueError, match="no labelled patches"):
        majority_mapping(np.zeros((4, 3), np.int64))


def test_predict_classes():
    mapping = np.array([0, 1, 255, 2])
    assert np.array_equal(predict_classes(np.array([[0, 3], [2, 1]]), mapping), [[0, 2], [255, 1]])
    with pytest.raises(ValueError, match=r"\[0, 4\)"):
        predict_classes(np.array([-1]), mapping)
