"""Diagnostics for the report: dead centroids, which classes absorb which, cluster purity and size."""

import numpy as np

UNASSIGNED = "unassigned"  # name of the confusion matrix's extra column (no class predicted)


def dead_centroids(win_counts: np.ndarray) -> np.ndarray:
    """(m,) int64 ids of the clusters that never won a pixel's argmax, from a (k,) win count array."""
    win_counts = np.asarray(win_counts)
    if win_counts.ndim != 1:
        raise ValueError(f"win counts must be a (k,) array, got shape {win_counts.shape}")
    if (win_counts < 0).any():
        raise ValueError("win counts must be >= 0")
    return np.flatnonzero(win_counts == 0).astype(np.int64)


def dead_centroid_summary(win_counts: np.ndarray) -> dict:
    """JSON-safe: {"k", "dead", "dead_fraction", "dead_ids"}."""
    dead = dead_centroids(win_counts)
    k = len(win_counts)
    return {
        "k": k,
        "dead": int(dead.size),
        "dead_fraction": float(dead.size / k) if k else None,
        "dead_ids": dead.tolist(),
    }


def absorption_table(conf: np.ndarray, class_names: list[str], top: int = 2) -> list[dict]:
    """For each ground-truth class, where its pixels went.

    conf: (C, C+1) confusion (rows = ground truth, column C = unassigned) or (C, C).
    One row per class, in class order: {"class", "pixels", "correct" (share predicted as itself,
    None without pixels), "absorbed_by": up to `top` [{"class", "share"}] of the other columns
    (other classes and "unassigned") with the largest non-zero shares, largest first, ties in
    column order}.
    """
    conf = np.asarray(conf)
    c = conf.shape[0]
    if conf.ndim != 2 or conf.shape[1] not in (c, c + 1):
        raise ValueError(f"confusion matrix must be (C, C+1) or (C, C), got shape {conf.shape}")
    if len(class_names) != c:
        raise ValueError(f"{len(class_names)} class names for a confusion matrix of {c} classes")
    columns = list(class_names) + [UNASSIGNED] * (conf.shape[1] - c)
    totals = conf.sum(axis=1)
    shares = conf / np.maximum(totals, 1)[:, None]
    rows = []
    for i, name in enumerate(class_names):
        other = shares[i].copy()
        other[i] = -1.0  # the class itself is not an absorber
        order = np.argsort(-other, kind="stable")[:top]
        absorbed = [{"class": columns[j], "share": float(other[j])} for j in order if other[j] > 0]
        rows.append(
            {
                "class": name,
                "pixels": int(totals[i]),
                "correct": float(shares[i, i]) if totals[i] > 0 else None,
                "absorbed_by": absorbed,
            }
        )
    return rows


def cluster_purity(counts: np.ndarray) -> dict:
    """Purity and size of each cluster from a (k, C) cluster x class count matrix.

    Returns {"size": (k,) int64 labelled members, "majority": (k,) int64 most frequent class
    (-1 for an empty cluster), "purity": (k,) float64 majority share (NaN when empty),
    "weighted_purity": float, sum of majorities / all members (NaN when there are none)}.
    """
    counts = np.asarray(counts)
    if counts.ndim != 2:
        raise ValueError(f"counts must be a (k, C) matrix, got shape {counts.shape}")
    size = counts.sum(axis=1).astype(np.int64)
    majority_count = counts.max(axis=1) if counts.shape[1] else np.zeros(len(counts))
    majority = np.where(size > 0, counts.argmax(axis=1) if counts.shape[1] else -1, -1).astype(np.int64)
    purity = np.full(len(counts), np.nan)
    np.divide(majority_count, size, out=purity, where=size > 0)
    total = size.sum()
    weighted = float(majority_count.sum() / total) if total > 0 else float("nan")
    return {"size": size, "majority": majority, "purity": purity, "weighted_purity": weighted}
