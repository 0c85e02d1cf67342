"""Cluster -> class mappings from a (k, C) table of labelled-patch counts.

Many-to-one majority vote is what lets k >> C clusters give rare classes their own clusters;
one-to-one Hungarian matching is the CAUSE baseline protocol (k = C cluster probe).
"""

import numpy as np
from scipy.optimize import linear_sum_assignment

from core.classes import IGNORE


def cluster_class_counts(
    cluster_ids: np.ndarray, labels: np.ndarray, k: int, num_classes: int, ignore: int = IGNORE
) -> np.ndarray:
    """(k, C) int64: how many labelled patches of each class each cluster holds; ignore labels skipped."""
    if cluster_ids.shape != labels.shape:
        raise ValueError(f"cluster ids shape {cluster_ids.shape} and labels shape {labels.shape} differ")
    ids = cluster_ids.ravel().astype(np.int64)
    lab = labels.ravel().astype(np.int64)
    if ids.size and (ids.min() < 0 or ids.max() >= k):
        raise ValueError(f"cluster ids must lie in [0, {k}), got [{ids.min()}, {ids.max()}]")
    valid = (lab >= 0) & (lab < num_classes) & (lab != ignore)
    flat = np.bincount(ids[valid] * num_classes + lab[valid], minlength=k * num_classes)
    return flat.reshape(k, num_classes)


def _check_counts(counts: np.ndarray) -> None:
    if counts.ndim != 2 or counts.size == 0:
        raise ValueError(f"counts must be a non-empty (k, C) matrix, got shape {counts.shape}")
    if counts.sum() == 0:
        raise ValueError("no labelled patches: clusters cannot be mapped to classes without ground truth")


def majority_mapping(counts: np.ndarray) -> np.ndarray:
    """(k,) int64 many-to-one: each cluster -> its most frequent class (ties -> lowest class id).

    A cluster with no labelled member still wins pixels at labelling time, so it has to predict
    some class; the most frequent class overall is the least costly guess. Such clusters are
    reported separately (fit summary: clusters_without_labelled_patches).
    """
    _check_counts(counts)
    mapping = counts.argmax(axis=1)
    mapping[counts.sum(axis=1) == 0] = counts.sum(axis=0).argmax()
    return mapping.astype(np.int64)


def hungarian_mapping(counts: np.ndarray) -> np.ndarray:
    """(k,) int64 one-to-one matching maximising matched counts; unmatched clusters (k > C) -> 255."""
    _check_counts(counts)
    rows, cols = linear_sum_assignment(counts, maximize=True)
    mapping = np.full(counts.shape[0], IGNORE, dtype=np.int64)
    mapping[rows] = cols
    return mapping


def predict_classes(cluster_ids: np.ndarray, mapping: np.ndarray) -> np.ndarray:
    """Class (trainId, 255 = none) of each cluster id, same shape as `cluster_ids`."""
    if cluster_ids.size and (cluster_ids.min() < 0 or cluster_ids.max() >= len(mapping)):
        raise ValueError(f"cluster ids must lie in [0, {len(mapping)}), got [{cluster_ids.min()}, {cluster_ids.max()}]")
    return mapping[cluster_ids]
