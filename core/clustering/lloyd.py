"""Lloyd iterations over data that is never held whole: per-block partial sums that add up (the distributed fit
sums them over shards), the update, and the loop.
"""

import time
from collections.abc import Callable

import numpy as np
import scipy.sparse

from core.clustering.kmeans import check_dims, l2_normalize

# Rows whose best and second-best float32 cosines are closer than this are re-scored in float64, so
# the assignment does not depend on how a BLAS kernel rounds a given block shape or thread count
# (float32 error of a 90- or 768-d dot product of unit vectors is far below 1e-4).
TIE_MARGIN = 1e-4

ASSIGNERS = ("numpy", "torch", "faiss")  # how Lloyd's assignment step finds each row's two best cosines


class TopTwo:
    """Each row's best and second-best cosine to the unit centroids (b, k) -> ((b,) index, (b,) best,
    (b,) second), by numpy BLAS, torch matmuls (on `device`: "cpu" or "cuda") or a faiss flat
    inner-product index (on the GPU where faiss has one). Built once per pass: the centroids are
    copied to the device once."""

    def __init__(self, centroids: np.ndarray, assign: str = "numpy", device: str = "cpu"):
        if assign not in ASSIGNERS:
            raise ValueError(f"assign={assign!r}: one of {ASSIGNERS}")
        if assign == "numpy" and device != "cpu":
            raise ValueError(f"assign=numpy runs on the CPU, not {device}: use torch or faiss on a GPU")
        self.c, self.assign, self.device = centroids, assign, device
        if assign == "torch":
            import torch

            self.torch, self.ct = torch, torch.from_numpy(centroids).to(device)
        elif assign == "faiss":
            import faiss

            index = faiss.IndexFlatIP(centroids.shape[1])
            index.add(centroids)
            if device != "cpu":
                if not hasattr(faiss, "StandardGpuResources") or faiss.get_num_gpus() < 1:
                    raise ValueError(
                        "this faiss has no GPU support (faiss-cpu): assign with torch on the GPU, "
                        "or install a faiss build with CUDA"
                    )
                index = faiss.index_cpu_to_all_gpus(index)
            self.index = index

    def __call__(self, xn: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if self.assign == "torch":
            top, best = self.torch.topk(self.torch.from_numpy(xn).to(self.device) @ self.ct.T, 2, dim=1)
            top, best = top.cpu().numpy(), best.cpu().numpy()
            return best[:, 0].astype(np.int64), top[:, 0], top[:, 1]
        if self.assign == "faiss":
            top, best = self.index.search(xn, 2)
            return best[:, 0].astype(np.int64), top[:, 0], top[:, 1]
        cos = xn @ self.c.T  # (b, k)
        rows = np.arange(len(xn))
        best = cos.argmax(axis=1)
        top = cos[rows, best]
        cos[rows, best] = -np.inf
        return best, top, cos.max(axis=1)


def _best_cosine(xn: np.ndarray, top_two: TopTwo, c64: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Unit rows (b, d) float32 -> (best index int64, its cosine float64); near ties re-scored in float64."""
    if c64.shape[0] == 1:
        return np.zeros(len(xn), np.int64), (xn.astype(np.float64) @ c64.T)[:, 0]
    best, top, second = top_two(xn)
    top = top.astype(np.float64)
    near = top - second < TIE_MARGIN
    if near.any():
        exact = xn[near].astype(np.float64) @ c64.T
        best[near] = exact.argmax(axis=1)
        top[near] = exact.max(axis=1)
    return best, top


def lloyd_partial(
    features: np.ndarray, centroids: np.ndarray, block_rows: int = 65536, assign: str = "numpy", device: str = "cpu"
) -> tuple[np.ndarray, np.ndarray, float]:
    """One spherical Lloyd E-step over (n, d) raw features -> (sums (k, d) float64, counts (k,) int64, inertia).

    Each row is L2-normalised and assigned to its most cosine-similar centroid; `sums` adds up the
    normalised rows per centroid, `counts` counts them and `inertia` is the sum of 1 - cosine to the
    assigned centroid, all against the given centroids. Partials of disjoint row sets add up, which
    is what lets `ray_jobs.distributed_lloyd` run this per block and reduce on the driver. Memory
    is bounded by block_rows x k (the cosine block) whatever n is. A row's assignment does not
    depend on the block it is in, nor on `assign` / `device` (`TopTwo`: near ties are re-scored
    in float64, so every assigner gives the same assignment, sums and counts; the inertia adds
    float32 cosines, rounded as each kernel rounds them).
    """
    return lloyd_partials(features, {"fit": centroids}, block_rows, assign, device)["fit"]


def lloyd_partials(
    features: np.ndarray,
    centroids: dict[str, np.ndarray],
    block_rows: int = 65536,
    assign: str = "numpy",
    device: str = "cpu",
) -> dict[str, tuple[np.ndarray, np.ndarray, float]]:
    """`lloyd_partial` for several fits (a k sweep) at once: each block of rows is normalised and
    checked once for all of them, then assigned to each fit's centroids."""
    fits = {}
    for name, c in centroids.items():
        check_dims(features, c)
        unit = l2_normalize(c)
        fits[name] = (TopTwo(unit, assign, device), unit.astype(np.float64))
    out = {name: (np.zeros(c64.shape), np.zeros(len(c64), np.int64), 0.0) for name, (_, c64) in fits.items()}
    for start in range(0, features.shape[0], block_rows):
        xn = l2_normalize(features[start : start + block_rows])
        bad = ~np.isfinite(xn).all(axis=1)
        if bad.any():
            raise ValueError(f"{int(bad.sum())} feature rows contain NaN or inf")
        x64, b = xn.astype(np.float64), len(xn)
        for name, (top_two, c64) in fits.items():
            best, top = _best_cosine(xn, top_two, c64)
            k = len(c64)
            sums, counts, total = out[name]
            # (k, b) one-hot assignment matrix times the (b, d) rows: per-cluster sums in one sparse product.
            sums += scipy.sparse.csr_array((np.ones(b), (best, np.arange(b))), shape=(k, b)) @ x64
            counts += np.bincount(best, minlength=k)
            out[name] = (sums, counts, total + float((1.0 - top).sum()))
    return out


def lloyd_update(centroids: np.ndarray, sums: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Spherical M-step: (k, d) float32 unit centroids = normalised per-cluster sums.

    A cluster that got no rows keeps its old centre (normalised), so k stays fixed and a dead
    centroid stays visible to the caller (count 0) instead of being moved silently.
    """
    if sums.shape != centroids.shape or counts.shape != (centroids.shape[0],):
        raise ValueError(f"sums {sums.shape} / counts {counts.shape} do not match centroids {centroids.shape}")
    norms = np.linalg.norm(sums, axis=1, keepdims=True)
    updated = np.where(
        (counts[:, None] > 0) & (norms > 0),
        sums / np.maximum(norms, 1e-300),
        l2_normalize(centroids).astype(np.float64),
    )
    return np.ascontiguousarray(updated, dtype=np.float32)


def run_lloyd(
    partial: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray, float]],
    init_centroids: np.ndarray,
    max_iter: int,
    tol: float,
) -> tuple[np.ndarray, list[dict]]:
    """Lloyd iterations around an E-step `partial(centroids) -> (sums, counts, inertia)`.

    Every iteration is one pass over the data followed by `lloyd_update`. It stops after max_iter
    passes, or once the inertia changed by less than `tol` relative to the previous pass. Returns
    the centroids after the last update and one record per pass: the inertia of the centroids that
    pass started from, its relative change, the number of empty clusters and the seconds it took.
    """
    return run_lloyd_many(lambda cs: {"fit": partial(cs["fit"])}, {"fit": init_centroids}, max_iter, tol)["fit"]


def run_lloyd_many(
    partial: Callable[[dict[str, np.ndarray]], dict[str, tuple[np.ndarray, np.ndarray, float]]],
    inits: dict[str, np.ndarray],
    max_iter: int,
    tol: float,
) -> dict[str, tuple[np.ndarray, list[dict]]]:
    """`run_lloyd` for several fits (a k sweep) with one pass per iteration: `partial` takes the
    centroids of every fit still iterating and returns each one's E-step. Each fit keeps its own
    stopping rule and leaves the passes once it stops, so every result equals its own `run_lloyd`."""
    if max_iter < 1 or tol < 0:
        raise ValueError(f"max_iter={max_iter} must be >= 1 and tol={tol} >= 0")
    centroids = {name: l2_normalize(c) for name, c in inits.items()}
    history: dict[str, list[dict]] = {name: [] for name in inits}
    active = list(inits)
    for iteration in range(max_iter):
        if not active:
            break
        start = time.perf_counter()
        partials = partial({name: centroids[name] for name in active})
        seconds = time.perf_counter() - start  # the shared pass, recorded for each fit in it
        for name in list(active):
            sums, counts, total = partials[name]
            centroids[name] = lloyd_update(centroids[name], sums, counts)
            previous = history[name][-1]["inertia"] if history[name] else None
            change = None if previous is None else abs(previous - total) / max(previous, 1e-300)
            history[name].append(
                {
                    "iteration": iteration,
                    "inertia": total,
                    "relative_change": change,
                    "rows": int(counts.sum()),
                    "empty_clusters": int((counts == 0).sum()),
                    "seconds": seconds,
                    "fits_in_pass": len(partials),
                }
            )
            if change is not None and change < tol:
                active.remove(name)
    return {name: (centroids[name], history[name]) for name in inits}


def lloyd(
    features: np.ndarray, init_centroids: np.ndarray, max_iter: int = 20, tol: float = 1e-4, block_rows: int = 65536
) -> tuple[np.ndarray, list[dict]]:
    """Single-process spherical Lloyd on an in-memory (or memory-mapped) array; see `run_lloyd`."""
    return run_lloyd(lambda c: lloyd_partial(features, c, block_rows), init_centroids, max_iter, tol)
