"""Distributed Lloyd (Ray tasks over Parquet row groups + a tree reduce, every k in one pass)
against single-process Lloyd."""

from pathlib import Path

import numpy as np
import pytest
import ray

from core.clustering.kmeans import fit_kmeans
from core.clustering.lloyd import lloyd, lloyd_partial
from ray_jobs.distributed_lloyd import distributed_lloyd, lloyd_pass
from storage.features import patch_schema, patch_table
from storage.run.atomic import write_parquet_atomic
from tests.tiny_runs import own_ray_cluster

OWN_RAY_CLUSTER = True  # starts a cluster of its own settings: runs after the shared-cluster modules

DIM, K = 16, 12
SHARD_IMAGES = [7, 5, 8]  # images per shard; 24 x 48 patches each -> 23,040 rows in three uneven shards


@pytest.fixture(scope="module")
def ray_cluster():
    repo_root = str(Path(__file__).resolve().parent.parent)
    own_ray_cluster()
    ray.init(
        address="local",
        num_cpus=2,
        include_dashboard=False,
        object_store_memory=200 * 1024**2,
        runtime_env={"env_vars": {"PYTHONPATH": repo_root}},
        log_to_driver=False,
    )
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """Parquet shards in the extract stage's schema (float16 features) and the same rows as float32."""
    rng = np.random.default_rng(0)
    directions = rng.standard_normal((K, DIM))
    out = tmp_path_factory.mktemp("features")
    files, parts, image = [], [], 0
    schema = patch_schema(DIM, "float16")
    for shard, num_images in enumerate(SHARD_IMAGES):
        ids, feats, labels = [], [], []
        for _ in range(num_images):
            which = rng.integers(K, size=(24, 48))
            feat = directions[which] + 0.6 * rng.standard_normal((24, 48, DIM))
            ids.append(f"img{image:03d}")
            feats.append(feat.transpose(2, 0, 1))
            labels.append(which.astype(np.uint8))
            image += 1
        table = patch_table(ids, feats, labels, schema, [(24 * 14, 48 * 14)] * len(ids))
        path = out / f"shard-{shard:05d}.parquet"
        write_parquet_atomic(table, path)
        files.append(path)
        # What a worker reads: the float16 values, as float32.
        parts.append(
            np.concatenate([f.transpose(1, 2, 0).reshape(-1, DIM) for f in feats]).astype(np.float16).astype(np.float32)
        )
    return files, np.concatenate(parts)


def test_one_pass_equals_the_single_process_partial(ray_cluster, shards):
    files, x = shards
    init = fit_kmeans(x[::10], K, seed=0, n_iter=2)
    ((sums, counts, inertia),) = lloyd_pass([str(f) for f in files], {"k": init}, batch_rows=4096, fan_in=2).values()
    ref_sums, ref_counts, ref_inertia = lloyd_partial(x, init)
    assert counts.sum() == len(x) == 23040
    assert np.array_equal(counts, ref_counts)
    assert np.allclose(sums, ref_sums, rtol=1e-12, atol=1e-9)
    assert inertia == pytest.approx(ref_inertia, rel=1e-7)  # float32 cosines may round per block shape


def test_distributed_lloyd_equals_single_process_lloyd(ray_cluster, shards):
    files, x = shards
    init = fit_kmeans(x[::20], K, seed=1, n_iter=1)  # a rough warm start, so Lloyd has work to do
    centroids, history = distributed_lloyd(files, {"k": init}, max_iter=8, tol=1e-7, batch_rows=5000)["k"]
    ref_centroids, ref_history = lloyd(x, init, max_iter=8, tol=1e-7)
    assert centroids.shape == (K, DIM) and centroids.dtype == np.float32
    assert np.abs(ref_centroids - init).max() > 0.05  # the passes did move the centroids
    assert np.allclose(centroids, ref_centroids, atol=1e-5)
    assert len(history) == len(ref_history) >= 2
    assert [h["rows"] for h in history] == [len(x)] * len(history)
    assert np.allclose([h["inertia"] for h in history], [h["inertia"] for h in ref_history], rtol=1e-7)
    inertias = [h["inertia"] for h in history]
    assert all(b <= a + 1e-6 for a, b in zip(inertias, inertias[1:]))  # Lloyd never increases the objective


def test_stops_on_relative_inertia_change(ray_cluster, shards):
    files, x = shards
    init, _ = lloyd(x, fit_kmeans(x, K, seed=0), max_iter=50, tol=0)  # converged: the second pass changes ~nothing
    _, history = distributed_lloyd(files, {"k": init}, max_iter=10, tol=1e-6)["k"]
    assert len(history) == 2 and history[0]["relative_change"] is None and history[1]["relative_change"] < 1e-6


def test_no_shards_is_an_error(ray_cluster):
    with pytest.raises(ValueError, match="no feature shards"):
        distributed_lloyd([], {"k": np.eye(2, DIM, dtype=np.float32)}, max_iter=1)


def test_one_pass_for_the_whole_sweep_equals_separate_lloyd_per_k(ray_cluster, shards):
    """Every k in one pass per iteration: each fit's centroids and history equal its own Lloyd,
    including a fit that stops early (and leaves the later passes) while the others go on."""
    files, x = shards
    inits = {f"k{k}": fit_kmeans(x[::20], k, seed=k, n_iter=1) for k in (4, 12, 30)}
    inits["k12_converged"], _ = lloyd(x, fit_kmeans(x, K, seed=0), max_iter=50, tol=0)
    together = distributed_lloyd(files, inits, max_iter=6, tol=1e-6, batch_rows=5000, fan_in=2)
    for name, init in inits.items():
        centroids, history = together[name]
        alone, alone_history = distributed_lloyd(files, {name: init}, max_iter=6, tol=1e-6, batch_rows=5000)[name]
        reference, ref_history = lloyd(x, init, max_iter=6, tol=1e-6)
        np.testing.assert_allclose(centroids, alone, atol=1e-6)
        np.testing.assert_allclose(centroids, reference, atol=1e-5)
        assert len(history) == len(alone_history) == len(ref_history)
        np.testing.assert_allclose([h["inertia"] for h in history], [h["inertia"] for h in ref_history], rtol=1e-7)
    assert len(together["k12_converged"][1]) == 2 and len(together["k30"][1]) > 2
    assert [h["fits_in_pass"] for h in together["k30"][1]][:3] == [4, 4, 3]  # the converged fit left after pass 2


def test_the_tree_reduce_does_not_depend_on_scheduling(ray_cluster, shards):
    files, x = shards
    init = fit_kmeans(x[::10], K, seed=2, n_iter=1)
    runs = [lloyd_pass([str(f) for f in files], {"k": init}, batch_rows=3000, fan_in=2)["k"] for _ in range(2)]
    assert np.array_equal(runs[0][0], runs[1][0]) and runs[0][2] == runs[1][2]  # bit for bit


def test_row_weights_fit_a_union_by_share(ray_cluster, shards):
    """A file's row weight scales its pull on the centroids: weight 0 leaves Lloyd on the other
    files' rows alone, and scaling every weight alike changes the inertia only."""
    files, x = shards
    init = fit_kmeans(x[::20], K, seed=3, n_iter=1)
    first_rows = SHARD_IMAGES[0] * 24 * 48
    weighted, history = distributed_lloyd(files, {"k": init}, max_iter=3, tol=0, row_weights=[1.0, 0.0, 0.0])["k"]
    alone, alone_history = lloyd(x[:first_rows], init, max_iter=3, tol=0)
    np.testing.assert_allclose(weighted, alone, atol=1e-5)
    np.testing.assert_allclose([h["inertia"] for h in history], [h["inertia"] for h in alone_history], rtol=1e-6)
    doubled, doubled_history = distributed_lloyd(files, {"k": init}, max_iter=3, tol=0, row_weights=[2.0] * 3)["k"]
    plain, plain_history = distributed_lloyd(files, {"k": init}, max_iter=3, tol=0)["k"]
    np.testing.assert_allclose(doubled, plain, atol=1e-6)
    np.testing.assert_allclose(
        [h["inertia"] for h in doubled_history], [2 * h["inertia"] for h in plain_history], rtol=1e-9
    )


def test_the_torch_assigner_in_the_tasks_gives_the_same_fit(ray_cluster, shards):
    files, x = shards
    init = fit_kmeans(x[::20], K, seed=4, n_iter=1)
    numpy_fit, numpy_history = distributed_lloyd(files, {"k": init}, max_iter=2, tol=0)["k"]
    torch_fit, torch_history = distributed_lloyd(files, {"k": init}, max_iter=2, tol=0, assign="torch")["k"]
    assert np.array_equal(numpy_fit, torch_fit)
    np.testing.assert_allclose([h["inertia"] for h in torch_history], [h["inertia"] for h in numpy_history], rtol=1e-7)
