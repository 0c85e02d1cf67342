"""Bounded, deterministic samples of patch rows for fitting k-means.

Every patch row gets a pseudo-random priority from (seed, image id, its index among the image's
rows); the sample is the rows of lowest priority: at most `cap` per image, at most `max_rows` in
all. It depends on neither shard boundaries, shard order nor worker count, and it is drawn in one
streaming pass that holds at most `max_rows` rows plus one shard's (`BoundedSample`).
"""

import hashlib
import zlib

import numpy as np

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """A bijective 64-bit mix (SplitMix64's finaliser); uint64 arithmetic wraps."""
    x = (x + _GOLDEN).astype(np.uint64)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def patch_priorities(image_ids: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(priority uint64, image index) per row; an image's rows are consecutive, as in a features shard."""
    uniq, first, inverse = np.unique(image_ids, return_index=True, return_inverse=True)
    image_hash = np.array(
        [int.from_bytes(hashlib.blake2b(f"{seed}:{i}".encode(), digest_size=8).digest(), "little") for i in uniq],
        np.uint64,
    )
    within = np.arange(len(image_ids), dtype=np.uint64) - first[inverse].astype(np.uint64)
    with np.errstate(over="ignore"):
        return _splitmix64(image_hash[inverse] ^ _splitmix64(within)), inverse


def per_image_lowest(priorities: np.ndarray, image_index: np.ndarray, cap: int) -> np.ndarray:
    """Indices of each image's `cap` rows of lowest priority."""
    order = np.lexsort((priorities, image_index))
    group = image_index[order]
    starts = np.flatnonzero(np.r_[True, group[1:] != group[:-1]])
    rank = np.arange(len(order)) - np.repeat(starts, np.diff(np.r_[starts, len(order)]))
    return order[rank < cap]


class BoundedSample:
    """The `max_rows` rows of lowest priority among everything added, in priority order."""

    def __init__(self, max_rows: int):
        self.max_rows = max_rows
        self.priorities = np.zeros(0, np.uint64)
        self.rows: np.ndarray | None = None

    def add(self, priorities: np.ndarray, rows: np.ndarray) -> None:
        prio = np.concatenate([self.priorities, priorities])
        rows = rows if self.rows is None else np.concatenate([self.rows, rows])
        if len(prio) > self.max_rows:
            keep = np.argpartition(prio, self.max_rows - 1)[: self.max_rows]
            prio, rows = prio[keep], rows[keep]
        self.priorities, self.rows = prio, rows

    def result(self) -> np.ndarray:
        if self.rows is None:
            return np.zeros((0, 0), np.float32)
        return self.rows[np.argsort(self.priorities, kind="stable")]


def image_fold(image_id: str, num_folds: int, seed: int) -> int:
    """The cross-validation fold of an image: a hash of (seed, id), so it never depends on shards."""
    return zlib.crc32(f"{seed}:{image_id}".encode()) % num_folds
