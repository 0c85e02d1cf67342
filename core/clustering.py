"""Spherical k-means on patch features: centroids are unit vectors, assignment is by cosine."""

import faiss
import numpy as np
from sklearn.cluster import MiniBatchKMeans

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


def check_features(x: np.ndarray, source: str) -> None:
    """Reject an empty (n, d) feature array or one with NaN/inf rows, naming where it came from."""
    if x.ndim != 2 or x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(f"{source}: no patch features (shape {x.shape}); extract features before fitting")
    bad = int((~np.isfinite(x).all(axis=1)).sum())
    if bad:
        raise ValueError(f"{source}: {bad} of {x.shape[0]} patch feature rows contain NaN or inf; the features of "
                         "those images are broken: re-extract them or drop those images")


def fit_kmeans(x: np.ndarray, k: int, seed: int, engine: str = "faiss", n_iter: int = 50,
               max_points_per_centroid: int = 256) -> np.ndarray:
    """(n, d) raw features -> (k, d) float32 unit centroids; the same input and seed give identical bytes.

    The features are L2-normalised first, so nearest centroid (L2) = highest cosine.
    faiss: `n_iter` Lloyd iterations on at most k * max_points_per_centroid points (faiss's
    seeded subsample). sklearn: MiniBatchKMeans, `n_iter` passes over the data at most.
    """
    if engine not in ENGINES:
        raise ValueError(f"unknown k-means engine {engine!r}; allowed: {', '.join(ENGINES)}")
    if k < 2:
        raise ValueError(f"k={k}: k-means needs at least 2 clusters")
    check_features(x, "k-means input")
    n, d = x.shape
    if k > n:
        raise ValueError(f"k={k} is larger than the number of sampled patch features (n={n}); "
                         "lower fit.k / fit.k_sweep or raise fit.max_patches_per_image")
    xn = np.ascontiguousarray(l2_normalize(x))
    if engine == "faiss":
        # min_points_per_centroid=1: k <= n is checked above; faiss would only print a warning.
        kmeans = faiss.Kmeans(d, k, niter=n_iter, seed=seed, spherical=True, verbose=False,
                              max_points_per_centroid=max_points_per_centroid, min_points_per_centroid=1)
        outer_threads = faiss.omp_get_max_threads()
        faiss.omp_set_num_threads(FAISS_THREADS)
        try:
            kmeans.train(xn)
        finally:
            faiss.omp_set_num_threads(outer_threads)
        centroids = kmeans.centroids
    else:
        kmeans = MiniBatchKMeans(n_clusters=k, random_state=seed, n_init=3, batch_size=4096, max_iter=n_iter)
        centroids = kmeans.fit(xn).cluster_centers_
    return np.ascontiguousarray(l2_normalize(centroids))  # sklearn's means are not unit length


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


def class_logits(x_normed: np.ndarray, centroids: np.ndarray, mapping: np.ndarray, num_classes: int) -> np.ndarray:
    """(n, C) float32: per class, the highest cosine similarity among that class's clusters.

    A class that no cluster maps to gets -inf: it can never be predicted. Clusters mapped outside
    [0, C) (255 = left without a class) take part in no class.
    """
    _check_dims(x_normed, centroids)
    if mapping.shape != (centroids.shape[0],):
        raise ValueError(f"mapping of shape {mapping.shape} for {centroids.shape[0]} centroids")
    cosine = np.asarray(x_normed, np.float32) @ np.asarray(centroids, np.float32).T  # (n, k)
    mapped = np.flatnonzero((mapping >= 0) & (mapping < num_classes))
    by_class = mapped[np.argsort(mapping[mapped], kind="stable")]  # clusters grouped by class
    classes, starts = np.unique(mapping[by_class], return_index=True)
    logits = np.full((x_normed.shape[0], num_classes), -np.inf, dtype=np.float32)
    if classes.size:
        logits[:, classes] = np.maximum.reduceat(cosine[:, by_class], starts, axis=1)
    return logits


def inertia(x_normed: np.ndarray, centroids: np.ndarray, assignment: np.ndarray) -> float:
    """Sum over rows of (1 - cosine to the assigned centroid): half the squared L2 distance of unit vectors."""
    _check_dims(x_normed, centroids)
    cosine = np.einsum("nd,nd->n", x_normed, centroids[assignment], dtype=np.float64)
    return float((1.0 - cosine).sum())
