"""Spherical k-means on patch features: centroids are unit vectors, assignment is by cosine.

Everything here is *spherical* k-means: feature rows are L2-normalised before they are clustered,
centroids are unit vectors, a row goes to the centroid of highest cosine (= nearest in L2, since
both are unit length), a centroid is the normalised mean (= normalised sum) of its rows, and the
objective ("inertia") is the sum over rows of 1 - cosine to the assigned centroid (half the squared
L2 distance). The fit engines, the block-wise Lloyd step (`lloyd_partial` + `lloyd_update`, which
`ray_jobs.distributed_lloyd` maps over Parquet shards) and `inertia` all use these definitions.
"""

import math
import time
from typing import Callable

import numpy as np
import scipy.sparse

ENGINES = ("faiss", "sklearn")
# faiss's distance products round differently for different OpenMP thread counts; a near-tie that
# flips then changes the centroids (checked with faiss-cpu 1.15.1: the same data gave other centroids
# at 2 and 16 threads than at 1, 4 and 8, each count repeatable). So every fit runs with this count:
# same sample + seed -> same bytes whatever thread count the caller (or Ray) set. A different CPU
# may still round differently; that was not checked.
FAISS_THREADS = 8


def l2_normalize(x: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    """float32 rows (last axis) scaled to unit length; an all-zero row stays zero."""
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), eps)


def check_features(x: np.ndarray, source: str, block_rows: int = 1 << 20) -> None:
    """Reject an empty (n, d) feature array or one with NaN/inf rows, naming where it came from."""
    if x.ndim != 2 or x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(f"{source}: no patch features (shape {x.shape}); extract features before fitting")
    # In blocks: the (n, d) boolean mask of a 20M-row array alone would be 1.8 GB.
    bad = sum(int((~np.isfinite(x[i:i + block_rows]).all(axis=1)).sum()) for i in range(0, x.shape[0], block_rows))
    if bad:
        raise ValueError(f"{source}: {bad} of {x.shape[0]} patch feature rows contain NaN or inf; the features of "
                         "those images are broken: re-extract them or drop those images")


def kmeans_plusplus(x: np.ndarray, k: int, seed: int, n_local_trials: int | None = None) -> np.ndarray:
    """(k,) distinct row indices of x chosen by greedy k-means++ (Arthur & Vassilvitskii 2007).

    Each next centre is drawn with probability proportional to the squared L2 distance to the
    nearest centre chosen so far; as in scikit-learn, `n_local_trials` (default 2 + ln k)
    candidates are drawn and the one that lowers the potential most is kept. For unit rows the
    squared distance is 2 (1 - cosine), so this is k-means++ for the spherical objective too.
    Vectorised: one (trials, d) x (d, n) product per centre. Deterministic for a given seed.
    """
    x = np.asarray(x, dtype=np.float32)
    n = x.shape[0]
    if not 1 <= k <= n:
        raise ValueError(f"k-means++: k={k} centres from {n} rows")
    trials = n_local_trials or 2 + int(math.log(k))
    rng = np.random.default_rng(seed)
    sq_norms = np.einsum("nd,nd->n", x, x, dtype=np.float64)

    def sq_dist(rows: np.ndarray) -> np.ndarray:  # (len(rows), n) squared L2 distances to x[rows]
        dot = (x[rows] @ x.T).astype(np.float64)
        return np.maximum(sq_norms[rows, None] + sq_norms[None, :] - 2.0 * dot, 0.0)

    chosen = np.empty(k, dtype=np.int64)
    chosen[0] = rng.integers(n)
    closest = sq_dist(chosen[:1])[0]  # (n,) squared distance to the nearest chosen centre
    closest[chosen[0]] = 0.0
    for i in range(1, k):
        cumulative = np.cumsum(closest)
        if cumulative[-1] <= 0.0:  # every row coincides with a centre: take unchosen rows uniformly
            rest = np.setdiff1d(np.arange(n), chosen[:i], assume_unique=True)
            chosen[i:] = rng.choice(rest, k - i, replace=False)
            break
        candidates = np.searchsorted(cumulative, rng.random(trials) * cumulative[-1], side="right")
        candidates = np.minimum(candidates, n - 1)
        candidate_closest = np.minimum(closest[None, :], sq_dist(candidates))  # (trials, n)
        best = int(candidate_closest.sum(axis=1).argmin())
        chosen[i] = candidates[best]
        closest = candidate_closest[best]
        closest[chosen[i]] = 0.0
    return chosen


def fit_kmeans(x: np.ndarray, k: int, seed: int, engine: str = "faiss", n_iter: int = 50,
               max_points_per_centroid: int = 256, init_points_per_centroid: int = 64) -> np.ndarray:
    """(n, d) raw features -> (k, d) float32 unit centroids; the same input and seed give identical bytes.

    The features are L2-normalised first, so nearest centroid (L2) = highest cosine.
    faiss: k-means++ seeding (`kmeans_plusplus`) on a seeded sample of at most
    k * init_points_per_centroid rows, then `n_iter` spherical Lloyd iterations with faiss on a
    seeded sample of at most k * max_points_per_centroid rows (the seeding sample is part of it).
    Only the sample is copied and normalised, so x may be far larger than the memory a copy needs
    (a memory-mapped array works). sklearn: MiniBatchKMeans (its own k-means++, best of 3 inits,
    batches of 4096) on all rows, `n_iter` passes over the data at most.
    """
    if engine not in ENGINES:
        raise ValueError(f"unknown k-means engine {engine!r}; allowed: {', '.join(ENGINES)}")
    if k < 2:
        raise ValueError(f"k={k}: k-means needs at least 2 clusters")
    if max_points_per_centroid < 1 or init_points_per_centroid < 1:
        raise ValueError(f"max_points_per_centroid={max_points_per_centroid} and init_points_per_centroid="
                         f"{init_points_per_centroid} must be >= 1")
    check_features(x, "k-means input")
    n, d = x.shape
    if k > n:
        raise ValueError(f"k={k} is larger than the number of sampled patch features (n={n}); "
                         "lower fit.k / fit.k_sweep or raise fit.max_patches_per_image")
    if engine == "faiss":
        import faiss  # here, not at module level: Ray workers that only assign or run Lloyd steps skip the import

        rng = np.random.default_rng(seed)
        sample_rows = min(n, k * max_points_per_centroid)
        chosen = rng.permutation(n) if sample_rows == n else rng.choice(n, sample_rows, replace=False)
        init_rows = np.sort(chosen[:min(sample_rows, k * init_points_per_centroid)])
        xs = np.ascontiguousarray(l2_normalize(x[np.sort(chosen)]))
        init = l2_normalize(x[init_rows])
        init_centroids = np.ascontiguousarray(init[kmeans_plusplus(init, k, seed)])
        # min_points_per_centroid=1: k <= n is checked above; faiss would only print a warning.
        # xs has at most k * max_points_per_centroid rows, so faiss does not subsample again.
        kmeans = faiss.Kmeans(d, k, niter=n_iter, seed=seed, spherical=True, verbose=False,
                              max_points_per_centroid=max_points_per_centroid, min_points_per_centroid=1)
        outer_threads = faiss.omp_get_max_threads()
        faiss.omp_set_num_threads(FAISS_THREADS)
        try:
            kmeans.train(xs, init_centroids=init_centroids)
        finally:
            faiss.omp_set_num_threads(outer_threads)
        centroids = kmeans.centroids
    else:
        from sklearn.cluster import MiniBatchKMeans

        xn = np.ascontiguousarray(l2_normalize(x))
        kmeans = MiniBatchKMeans(n_clusters=k, random_state=seed, n_init=3, batch_size=4096, max_iter=n_iter)
        centroids = kmeans.fit(xn).cluster_centers_
    return np.ascontiguousarray(l2_normalize(centroids))  # sklearn's means are not unit length


# The seed's k-means (mbps_pytorch/overclustering_cause.py), exactly as its scripts call it.
SEED_MINIBATCH = {"batch_size": 10000, "max_iter": 300, "n_init": 3, "random_state": 42}


def seed_normalize(x: np.ndarray) -> np.ndarray:
    """The seed's feature preparation: nan_to_num, float64, rows L2-normalised."""
    x = np.nan_to_num(np.asarray(x, dtype=np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-8)


def fit_seed_minibatch(x: np.ndarray, k: int) -> np.ndarray:
    """The seed's fit: MiniBatchKMeans(SEED_MINIBATCH) on the normalised float64 rows -> (k, d)
    float64 centres, not unit length (its mapping predicts by Euclidean distance to these)."""
    from sklearn.cluster import MiniBatchKMeans

    if not 2 <= k <= len(x):
        raise ValueError(f"k={k} with {len(x)} labelled patch features: the seed's k-means needs 2 <= k <= n; "
                         "lower fit.k / fit.k_sweep")
    return MiniBatchKMeans(n_clusters=k, **SEED_MINIBATCH).fit(seed_normalize(x)).cluster_centers_


def assign_euclidean(x: np.ndarray, centres: np.ndarray, block_rows: int = 65536) -> np.ndarray:
    """(n,) int32 nearest centre in L2 of the seed-normalised rows (sklearn's predict)."""
    out = np.empty(len(x), np.int32)
    c_sq = (centres ** 2).sum(axis=1)
    for i in range(0, len(x), block_rows):
        xn = seed_normalize(x[i:i + block_rows])
        out[i:i + block_rows] = (c_sq[None, :] - 2.0 * xn @ centres.T).argmin(axis=1)
    return out


# Rows whose best and second-best float32 cosines are closer than this are re-scored in float64, so
# the assignment does not depend on how a BLAS kernel rounds a given block shape or thread count
# (float32 error of a 90- or 768-d dot product of unit vectors is far below 1e-4).
_TIE_MARGIN = 1e-4


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
                    raise ValueError("this faiss has no GPU support (faiss-cpu): assign with torch on the GPU, "
                                     "or install a faiss build with CUDA")
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
    near = top - second < _TIE_MARGIN
    if near.any():
        exact = xn[near].astype(np.float64) @ c64.T
        best[near] = exact.argmax(axis=1)
        top[near] = exact.max(axis=1)
    return best, top


def lloyd_partial(features: np.ndarray, centroids: np.ndarray, block_rows: int = 65536, assign: str = "numpy",
                  device: str = "cpu") -> tuple[np.ndarray, np.ndarray, float]:
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


def lloyd_partials(features: np.ndarray, centroids: dict[str, np.ndarray], block_rows: int = 65536,
                   assign: str = "numpy", device: str = "cpu") -> dict[str, tuple[np.ndarray, np.ndarray, float]]:
    """`lloyd_partial` for several fits (a k sweep) at once: each block of rows is normalised and
    checked once for all of them, then assigned to each fit's centroids."""
    fits = {}
    for name, c in centroids.items():
        _check_dims(features, c)
        unit = l2_normalize(c)
        fits[name] = (TopTwo(unit, assign, device), unit.astype(np.float64))
    out = {name: (np.zeros(c64.shape), np.zeros(len(c64), np.int64), 0.0) for name, (_, c64) in fits.items()}
    for start in range(0, features.shape[0], block_rows):
        xn = l2_normalize(features[start:start + block_rows])
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
    updated = np.where((counts[:, None] > 0) & (norms > 0), sums / np.maximum(norms, 1e-300),
                       l2_normalize(centroids).astype(np.float64))
    return np.ascontiguousarray(updated, dtype=np.float32)


def run_lloyd(partial: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray, float]], init_centroids: np.ndarray,
              max_iter: int, tol: float) -> tuple[np.ndarray, list[dict]]:
    """Lloyd iterations around an E-step `partial(centroids) -> (sums, counts, inertia)`.

    Every iteration is one pass over the data followed by `lloyd_update`. It stops after max_iter
    passes, or once the inertia changed by less than `tol` relative to the previous pass. Returns
    the centroids after the last update and one record per pass: the inertia of the centroids that
    pass started from, its relative change, the number of empty clusters and the seconds it took.
    """
    return run_lloyd_many(lambda cs: {"fit": partial(cs["fit"])}, {"fit": init_centroids}, max_iter, tol)["fit"]


def run_lloyd_many(partial: Callable[[dict[str, np.ndarray]], dict[str, tuple[np.ndarray, np.ndarray, float]]],
                   inits: dict[str, np.ndarray], max_iter: int, tol: float) -> dict[str, tuple[np.ndarray, list[dict]]]:
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
            history[name].append({"iteration": iteration, "inertia": total, "relative_change": change,
                                  "rows": int(counts.sum()), "empty_clusters": int((counts == 0).sum()),
                                  "seconds": seconds, "fits_in_pass": len(partials)})
            if change is not None and change < tol:
                active.remove(name)
    return {name: (centroids[name], history[name]) for name in inits}


def lloyd(features: np.ndarray, init_centroids: np.ndarray, max_iter: int = 20, tol: float = 1e-4,
          block_rows: int = 65536) -> tuple[np.ndarray, list[dict]]:
    """Single-process spherical Lloyd on an in-memory (or memory-mapped) array; see `run_lloyd`."""
    return run_lloyd(lambda c: lloyd_partial(features, c, block_rows), init_centroids, max_iter, tol)


def _check_dims(x: np.ndarray, centroids: np.ndarray) -> None:
    if x.ndim != 2 or centroids.ndim != 2 or x.shape[1] != centroids.shape[1]:
        raise ValueError(f"features of shape {x.shape} do not match centroids of shape {centroids.shape} "
                         "(same feature kind and dimension needed)")


def assign_clusters(x: np.ndarray, centroids: np.ndarray, block_rows: int = 65536) -> np.ndarray:
    """(n,) int32 index of the most cosine-similar centroid for each row of x (raw or normalised).

    Rows are not normalised: a row's norm scales all its k similarities alike, so the argmax of
    x . c over unit centroids is the argmax of cosine. Blocks bound the (rows, k) product's memory.
    """
    _check_dims(x, centroids)
    c = l2_normalize(centroids)
    out = np.empty(x.shape[0], dtype=np.int32)
    for start in range(0, x.shape[0], block_rows):
        block = np.asarray(x[start:start + block_rows], dtype=np.float32)
        out[start:start + len(block)] = (block @ c.T).argmax(axis=1)
    return out


def inertia(x_normed: np.ndarray, centroids: np.ndarray, assignment: np.ndarray) -> float:
    """Sum over rows of (1 - cosine to the assigned centroid): half the squared L2 distance of unit vectors."""
    _check_dims(x_normed, centroids)
    cosine = np.einsum("nd,nd->n", x_normed, centroids[assignment], dtype=np.float64)
    return float((1.0 - cosine).sum())
