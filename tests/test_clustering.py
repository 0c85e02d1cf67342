import faiss
import numpy as np
import pytest

from core.clustering.kmeans import assign_clusters, check_features, fit_kmeans, inertia, kmeans_plusplus, l2_normalize
from core.clustering.lloyd import lloyd, lloyd_partial, lloyd_update

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
    # (k = number of blobs: see test_k_equal_to_the_number_of_blobs_recovers_them.)
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


@pytest.mark.parametrize("seed", range(5))
def test_faiss_recovers_blobs_with_k_equal_to_their_number(seed):
    # With k-means++ seeding every blob gets a centroid (random-point seeding could put two in one).
    x, truth = _blobs(seed, num_blobs=6)
    assignment = assign_clusters(x, fit_kmeans(x, 6, seed=seed))
    pairs = set(zip(truth, assignment))
    assert len(pairs) == 6 and len({a for _, a in pairs}) == 6


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
    with pytest.raises(
        ValueError, match=r"k=9 is larger than the number of sampled patch features \(n=8\); lower fit.k"
    ):
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


def test_inertia_by_hand():
    x = np.array([[1, 0], [0, 1]], np.float32)
    centroids = np.array([[1, 0], [S, S]], np.float32)
    assert inertia(x, centroids, np.array([0, 1])) == pytest.approx(1 - S)  # (1 - 1) + (1 - 0.71)


def test_kmeans_plusplus_takes_one_seed_per_blob_and_is_seeded():
    x, truth = _blobs(0, num_blobs=8, dim=8, per_blob=50)
    xn = l2_normalize(x)
    for seed in range(5):
        chosen = kmeans_plusplus(xn, 8, seed)
        assert chosen.dtype == np.int64 and sorted(truth[chosen]) == list(range(8))
        assert np.array_equal(chosen, kmeans_plusplus(xn, 8, seed))
    assert not np.array_equal(kmeans_plusplus(xn, 8, 0), kmeans_plusplus(xn, 8, 1))


def test_kmeans_plusplus_with_fewer_distinct_rows_than_k():
    x = np.repeat(np.eye(2, 3, dtype=np.float32), 5, axis=0)  # 10 rows, 2 distinct
    chosen = kmeans_plusplus(x, 4, seed=0)
    assert len(set(chosen)) == 4 and {tuple(r) for r in x[chosen]} == {(1, 0, 0), (0, 1, 0)}
    with pytest.raises(ValueError, match="k=11 centres from 10 rows"):
        kmeans_plusplus(x, 11, seed=0)


def test_lloyd_partial_by_hand():
    centroids = np.array([[1, 0], [0, 1], [-1, 0]], np.float32)
    x = np.array([[3, 0], [0.6, 0.8], [0, -2], [0.8, 0.6]], np.float32)  # raw: rows are normalised first
    sums, counts, total = lloyd_partial(x, centroids)
    # row 0 -> c0 (cos 1); row 1 -> c1 (0.8); row 2 -> c0 (cos 0, 0, -1, 0: tie c0/c2 -> first); row 3 -> c0 (0.8)
    assert sums.dtype == np.float64 and counts.dtype == np.int64
    assert np.array_equal(counts, [3, 1, 0])
    assert np.allclose(sums, [[1.8, -0.4], [0.6, 0.8], [0, 0]])
    assert total == pytest.approx(0 + 0.2 + 1 + 0.2)
    assert lloyd_partial(x[:0], centroids)[2] == 0.0
    with pytest.raises(ValueError, match="1 feature rows contain NaN"):
        lloyd_partial(np.array([[1, 0], [np.nan, 0]], np.float32), centroids)


def test_lloyd_partial_does_not_depend_on_blocks():
    x = np.random.default_rng(0).standard_normal((3000, 20)).astype(np.float32)
    c = l2_normalize(x[:50])
    whole = lloyd_partial(x, c, block_rows=65536)
    for block_rows in (1, 7, 1000):
        sums, counts, total = lloyd_partial(x, c, block_rows=block_rows)
        assert np.array_equal(counts, whole[1]) and np.allclose(sums, whole[0], rtol=1e-12)
        assert total == pytest.approx(whole[2], rel=1e-7)  # float32 cosines round per kernel (block shape)
    # Partials of disjoint row sets add up to the partial of their union.
    a, b = lloyd_partial(x[:1234], c), lloyd_partial(x[1234:], c)
    assert np.array_equal(a[1] + b[1], whole[1]) and np.allclose(a[0] + b[0], whole[0], rtol=1e-12)
    # The inertia is the one `inertia` computes for the same assignment.
    xn = l2_normalize(x)
    assert whole[2] == pytest.approx(inertia(xn, c, assign_clusters(xn, c)), rel=1e-6)


def test_lloyd_update_normalises_sums_and_keeps_empty_centres():
    old = np.array([[1, 0], [0, 2], [S, S]], np.float32)
    sums = np.array([[3, 4], [0, 0], [-2, 0]], np.float64)
    new = lloyd_update(old, sums, np.array([5, 0, 2]))
    assert new.dtype == np.float32 and np.allclose(new, [[0.6, 0.8], [0, 1], [-1, 0]])
    with pytest.raises(ValueError, match="do not match"):
        lloyd_update(old, sums[:2], np.array([5, 0]))


def test_lloyd_never_increases_inertia_and_stops_on_tol():
    x, _ = _blobs(1, num_blobs=6, dim=8, per_blob=200)
    init = l2_normalize(x[:6])  # a poor start: 6 points of the first blob
    centroids, history = lloyd(x, init, max_iter=30, tol=1e-9)
    inertias = [h["inertia"] for h in history]
    assert all(b <= a + 1e-9 for a, b in zip(inertias, inertias[1:])) and inertias[-1] < inertias[0]
    assert history[-1]["relative_change"] < 1e-9 or len(history) == 30
    assert all(h["rows"] == len(x) for h in history)
    assert centroids.dtype == np.float32 and np.allclose(np.linalg.norm(centroids, axis=1), 1, atol=1e-6)
    _, short = lloyd(x, init, max_iter=30, tol=0.01)
    changes = [h["relative_change"] for h in short[1:]]
    assert changes[-1] < 0.01 and all(c >= 0.01 for c in changes[:-1])  # stops at the first small change


@pytest.mark.parametrize("assign", ["torch", "faiss"])
def test_every_assigner_gives_the_numpy_partial_bit_for_bit(assign):
    """torch matmuls and a faiss flat index find the same best centroid as numpy BLAS (near ties
    are re-scored in float64 whatever found them), so the sums and counts are the same bit for bit;
    the inertia sums float32 cosines, which each kernel rounds its own way."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal((5000, 24)).astype(np.float32)
    c = l2_normalize(x[:40])
    x[100] = x[3]  # rows on a centroid and exact ties between two centroids
    c[7] = c[8]
    reference = lloyd_partial(x, c, block_rows=1000)
    other = lloyd_partial(x, c, block_rows=1000, assign=assign)
    assert np.array_equal(other[1], reference[1]) and np.array_equal(other[0], reference[0])
    assert other[2] == pytest.approx(reference[2], rel=1e-7)
    with pytest.raises(ValueError, match="1 feature rows contain NaN"):
        lloyd_partial(np.array([[1, 0], [np.nan, 0]], np.float32), np.eye(2, dtype=np.float32), assign=assign)


def test_an_assigner_that_cannot_run_on_the_gpu_says_so():
    c = np.eye(3, dtype=np.float32)
    with pytest.raises(ValueError, match="numpy runs on the CPU"):
        lloyd_partial(c, c, device="cuda")
    with pytest.raises(ValueError, match="no GPU support"):
        lloyd_partial(c, c, assign="faiss", device="cuda")
    with pytest.raises(ValueError, match="one of"):
        lloyd_partial(c, c, assign="cupy")
