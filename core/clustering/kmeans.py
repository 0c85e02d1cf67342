"""K-means on unit patch features: k-means++ seeding, faiss spherical Lloyd on a sample (the default fit), the
paper's MiniBatchKMeans, and the assignment of rows to centroids.
"""

import math

import numpy as np

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
    bad = sum(int((~np.isfinite(x[i : i + block_rows]).all(axis=1)).sum()) for i in range(0, x.shape[0], block_rows))
    if bad:
        raise ValueError(
            f"{source}: {bad} of {x.shape[0]} patch feature rows contain NaN or inf; the features of "
            "those images are broken: re-extract them or drop those images"
        )


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


def fit_kmeans(
    x: np.ndarray,
    k: int,
    seed: int,
    engine: str = "faiss",
    n_iter: int = 50,
    max_points_per_centroid: int = 256,
    init_points_per_centroid: int = 64,
) -> np.ndarray:
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
        raise ValueError(
            f"max_points_per_centroid={max_points_per_centroid} and init_points_per_centroid="
            f"{init_points_per_centroid} must be >= 1"
        )
    check_features(x, "k-means input")
    n, d = x.shape
    if k > n:
        raise ValueError(
            f"k={k} is larger than the number of sampled patch features (n={n}); "
            "lower fit.k / fit.k_sweep or raise fit.max_patches_per_image"
        )
    if engine == "faiss":
        import faiss  # here, not at module level: Ray workers that only assign or run Lloyd steps skip the import

        rng = np.random.default_rng(seed)
        sample_rows = min(n, k * max_points_per_centroid)
        chosen = rng.permutation(n) if sample_rows == n else rng.choice(n, sample_rows, replace=False)
        init_rows = np.sort(chosen[: min(sample_rows, k * init_points_per_centroid)])
        xs = np.ascontiguousarray(l2_normalize(x[np.sort(chosen)]))
        init = l2_normalize(x[init_rows])
        init_centroids = np.ascontiguousarray(init[kmeans_plusplus(init, k, seed)])
        # min_points_per_centroid=1: k <= n is checked above; faiss would only print a warning.
        # xs has at most k * max_points_per_centroid rows, so faiss does not subsample again.
        kmeans = faiss.Kmeans(
            d,
            k,
            niter=n_iter,
            seed=seed,
            spherical=True,
            verbose=False,
            max_points_per_centroid=max_points_per_centroid,
            min_points_per_centroid=1,
        )
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


# The paper's k-means (mbps_pytorch/overclustering_cause.py), exactly as its scripts call it.
PAPER_MINIBATCH = {"batch_size": 10000, "max_iter": 300, "n_init": 3, "random_state": 42}


def paper_normalize(x: np.ndarray) -> np.ndarray:
    """The paper's feature preparation: nan_to_num, float64, rows L2-normalised."""
    x = np.nan_to_num(np.asarray(x, dtype=np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-8)


def fit_paper_minibatch(x: np.ndarray, k: int) -> np.ndarray:
    """The paper's fit: MiniBatchKMeans(PAPER_MINIBATCH) on the normalised float64 rows -> (k, d)
    float64 centres, not unit length (its mapping predicts by Euclidean distance to these)."""
    from sklearn.cluster import MiniBatchKMeans

    if not 2 <= k <= len(x):
        raise ValueError(
            f"k={k} with {len(x)} labelled patch features: the paper's k-means needs 2 <= k <= n; "
            "lower fit.k / fit.k_sweep"
        )
    return MiniBatchKMeans(n_clusters=k, **PAPER_MINIBATCH).fit(paper_normalize(x)).cluster_centers_


def assign_euclidean(x: np.ndarray, centres: np.ndarray, block_rows: int = 65536) -> np.ndarray:
    """(n,) int32 nearest centre in L2 of the paper-normalised rows (sklearn's predict)."""
    out = np.empty(len(x), np.int32)
    c_sq = (centres**2).sum(axis=1)
    for i in range(0, len(x), block_rows):
        xn = paper_normalize(x[i : i + block_rows])
        out[i : i + block_rows] = (c_sq[None, :] - 2.0 * xn @ centres.T).argmin(axis=1)
    return out


def check_dims(x: np.ndarray, centroids: np.ndarray) -> None:
    if x.ndim != 2 or centroids.ndim != 2 or x.shape[1] != centroids.shape[1]:
        raise ValueError(
            f"features of shape {x.shape} do not match centroids of shape {centroids.shape} "
            "(same feature kind and dimension needed)"
        )


def assign_clusters(x: np.ndarray, centroids: np.ndarray, block_rows: int = 65536) -> np.ndarray:
    """(n,) int32 index of the most cosine-similar centroid for each row of x (raw or normalised).

    Rows are not normalised: a row's norm scales all its k similarities alike, so the argmax of
    x . c over unit centroids is the argmax of cosine. Blocks bound the (rows, k) product's memory.
    """
    check_dims(x, centroids)
    c = l2_normalize(centroids)
    out = np.empty(x.shape[0], dtype=np.int32)
    for start in range(0, x.shape[0], block_rows):
        block = np.asarray(x[start : start + block_rows], dtype=np.float32)
        out[start : start + len(block)] = (block @ c.T).argmax(axis=1)
    return out


def inertia(x_normed: np.ndarray, centroids: np.ndarray, assignment: np.ndarray) -> float:
    """Sum over rows of (1 - cosine to the assigned centroid): half the squared L2 distance of unit vectors."""
    check_dims(x_normed, centroids)
    cosine = np.einsum("nd,nd->n", x_normed, centroids[assignment], dtype=np.float64)
    return float((1.0 - cosine).sum())
