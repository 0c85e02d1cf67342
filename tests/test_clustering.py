import faiss
import numpy as np
import pytest

from core.clustering import assign_clusters, check_features, class_logits, fit_kmeans, inertia, l2_normalize

S = np.sqrt(0.5)


def _blobs(seed, num_blobs=4, dim=8, per_blob=100):
    """Points around orthogonal directions with norms from 0.5 to 5: clusters by direction, not length."""
    rng = np.random.default_rng(seed)
    truth = np.repeat(np.arange(num_blobs), per_blob)
    x = np.eye(dim)[truth] + 0.1 * rng.standard_normal((len(truth), dim))
    return (x * rng.uniform(0.5, 5, (len(truth), 1))).astype(np.float32), truth


def test_l2_normalize():
    out = l2_normalize(np.array([[3, 4], [0, 0]]))
    assert out.dtype == np.float32 and np.allclose(out, [[0.6, 0.8], [0, 0]])


def test_check_features_counts_broken_rows():
    x = np.ones((5, 3), np.float32)
    x[1, 0], x[3, 2] = np.nan, np.inf
    with pytest.raises(ValueError, match=r"shard-7: 2 of 5 .*re-extract"):
        check_features(x, "shard-7")
    with pytest.raises(ValueError, match="shard-7: no patch features"):
        check_features(np.zeros((0, 3), np.float32), "shard-7")


@pytest.mark.parametrize("engine", ["faiss", "sklearn"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_overclustering_separated_blobs_gives_pure_clusters(engine, seed):
    # k = 2 x blobs, as the tool over-clusters: every cluster lies inside one blob and none is empty.
    # (k = number of blobs is not asserted: faiss starts from random points, not k-means++, and
    # can settle with two centroids in one blob.)
    x, truth = _blobs(seed)
    centroids = fit_kmeans(x, 8, seed=seed, engine=engine)
    assert centroids.shape == (8, 8) and centroids.dtype == np.float32
    assert np.allclose(np.linalg.norm(centroids, axis=1), 1, atol=1e-6)
    assignment = assign_clusters(x, centroids)
    assert sorted(set(assignment)) == list(range(8))
    assert all(len(set(truth[assignment == c])) == 1 for c in range(8))


def test_sklearn_recovers_blobs_with_k_equal_to_their_number():
    x, truth = _blobs(0)
    assignment = assign_clusters(x, fit_kmeans(x, 4, seed=0, engine="sklearn"))
    pairs = set(zip(truth, assignment))
    assert len(pairs) == 4 and len({a for _, a in pairs}) == 4  # a bijection blob <-> cluster


@pytest.mark.parametrize("engine", ["faiss", "sklearn"])
def test_fit_is_byte_identical_twice(engine):
    x, _ = _blobs(3)
    assert fit_kmeans(x, 6, seed=5, engine=engine).tobytes() == fit_kmeans(x, 6, seed=5, engine=engine).tobytes()


def test_faiss_fit_ignores_the_callers_thread_count_and_restores_it():
    # On the development machine, plain faiss.Kmeans on exactly this input gives different
    # centroids with 1 and 2 OpenMP threads; fit_kmeans fixes the count.
    x = np.random.default_rng(0).standard_normal((20000, 90)).astype(np.float32)
    before = faiss.omp_get_max_threads()
    try:
        faiss.omp_set_num_threads(1)
        one = fit_kmeans(x, 300, seed=1, n_iter=20)
        assert faiss.omp_get_max_threads() == 1
        faiss.omp_set_num_threads(2)
        two = fit_kmeans(x, 300, seed=1, n_iter=20)
    finally:
        faiss.omp_set_num_threads(before)
    assert one.tobytes() == two.tobytes()


def test_fit_kmeans_errors():
    x, _ = _blobs(0, per_blob=2)  # n = 8
    with pytest.raises(ValueError, match=r"k=9 is larger than the number of sampled patch features \(n=8\); lower fit.k"):
        fit_kmeans(x, 9, seed=0)
    with pytest.raises(ValueError, match="at least 2"):
        fit_kmeans(x, 1, seed=0)
    with pytest.raises(ValueError, match="allowed: faiss, sklearn"):
        fit_kmeans(x, 2, seed=0, engine="torch")
    x[0, 0] = np.nan
    with pytest.raises(ValueError, match="1 of 8 .* NaN"):
        fit_kmeans(x, 2, seed=0)


def test_assign_clusters_by_hand():
    centroids = np.array([[1, 0], [0, 1]], np.float32)
    x = np.array([[3, 1], [0.1, 2], [-1, -0.5]], np.float32)  # third: cosines -0.89 and -0.45 -> 1
    assert assign_clusters(x, centroids).dtype == np.int32
    assert np.array_equal(assign_clusters(x, centroids), [0, 1, 1])
    assert np.array_equal(assign_clusters(x, centroids, block_rows=2), [0, 1, 1])
    assert assign_clusters(np.zeros((0, 2), np.float32), centroids).shape == (0,)
    with pytest.raises(ValueError, match=r"\(3, 2\).*\(2, 3\)"):
        assign_clusters(x, np.eye(2, 3, dtype=np.float32))


def test_class_logits_by_hand():
    centroids = np.array([[1, 0], [0, 1], [S, S], [-1, 0]], np.float32)
    mapping = np.array([2, 0, 2, 255])  # class 0: cluster 1; class 1: none; class 2: clusters 0 and 2
    x = np.array([[1, 0], [0, 1], [0.6, 0.8]], np.float32)
    expected = [[0.0, -np.inf, 1.0],         # cosines 1, 0, 0.71, -1
                [1.0, -np.inf, S],           # cosines 0, 1, 0.71, 0
                [0.8, -np.inf, 1.4 * S]]     # cosines 0.6, 0.8, 0.99, -0.6
    logits = class_logits(x, centroids, mapping, 3)
    assert logits.dtype == np.float32 and np.allclose(logits, expected)
    assert class_logits(x, centroids, np.full(4, 255), 3).max() == -np.inf


def test_inertia_by_hand():
    x = np.array([[1, 0], [0, 1]], np.float32)
    centroids = np.array([[1, 0], [S, S]], np.float32)
    assert inertia(x, centroids, np.array([0, 1])) == pytest.approx(1 - S)  # (1 - 1) + (1 - 0.71)
