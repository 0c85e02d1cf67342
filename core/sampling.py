"""Bounded, deterministic samples of patch rows for fitting k-means."""

import zlib

import numpy as np


def per_image_sample(image_ids: np.ndarray, cap: int, seed: int) -> np.ndarray:
    """Indices of at most `cap` rows per image, sorted.

    Each image's choice depends only on (seed, image id), not on shard boundaries, row order
    of other images or worker count, so the sample is the same however the data was split.
    """
    order = np.argsort(image_ids, kind="stable")
    uniq, starts, counts = np.unique(image_ids[order], return_index=True, return_counts=True)
    chosen = []
    for image_id, start, count in zip(uniq, starts, counts):
        rows = order[start:start + count]
        if count > cap:
            rng = np.random.default_rng([seed, zlib.crc32(str(image_id).encode())])
            rows = rows[rng.choice(count, cap, replace=False)]
        chosen.append(rows)
    return np.sort(np.concatenate(chosen)) if chosen else np.zeros(0, np.int64)


def subsample(n: int, max_rows: int, seed: int) -> np.ndarray:
    """Sorted indices of min(n, max_rows) rows chosen uniformly with a fixed seed."""
    if n <= max_rows:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, max_rows, replace=False))


def image_fold(image_id: str, num_folds: int, seed: int) -> int:
    """The cross-validation fold of an image: a hash of (seed, id), so it never depends on shards."""
    return zlib.crc32(f"{seed}:{image_id}".encode()) % num_folds
