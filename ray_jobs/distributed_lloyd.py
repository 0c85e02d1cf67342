"""Spherical Lloyd iterations over Parquet feature shards as Ray Data maps, for data beyond one machine.

Every iteration is one Ray Data pass: `read_parquet` (the feature column only) -> `map_batches`
running `core.clustering.lloyd_partial` on each batch of rows against the current centroids (sent
once per iteration through the object store with `ray.put`) -> one tiny row per batch
(sums (k, D) float64, counts (k,), inertia) -> the driver adds them up as they stream in and does
the update (`lloyd_update`). The driver holds the centroids and one running (k, D) sum, never the
features, so its memory does not grow with the number of rows. Warm-start it from a sampled fit
(`fit_kmeans`); the stopping rule and the history records are `core.clustering.run_lloyd`'s.
"""

from pathlib import Path

import numpy as np
import pyarrow as pa
import ray

from core.clustering import lloyd_partial, run_lloyd
from storage.shards import features_from_table


def _batch_partial(batch: pa.Table, centroids, column: str) -> dict[str, np.ndarray]:
    """One batch of Parquet rows -> its Lloyd partial as a one-row batch."""
    # fn_kwargs reach the UDF inside a closure, so an ObjectRef arrives as a ref (Ray Data #49207).
    c = ray.get(centroids) if isinstance(centroids, ray.ObjectRef) else centroids
    sums, counts, inertia = lloyd_partial(features_from_table(batch.select([column])), c)
    return {"sums": sums[None], "counts": counts[None], "inertia": np.array([inertia])}


def lloyd_pass(paths: list[str], centroids: np.ndarray, *, column: str = "feature", batch_rows: int = 65536,
               num_cpus: float = 1.0) -> tuple[np.ndarray, np.ndarray, float]:
    """One E-step over every row of the shards -> (sums, counts, inertia), reduced on the driver as it streams."""
    k, d = centroids.shape
    ref = ray.put(np.ascontiguousarray(centroids, dtype=np.float32))
    try:
        ds = ray.data.read_parquet(paths, columns=[column]).map_batches(
            _batch_partial, fn_kwargs={"centroids": ref, "column": column}, batch_size=batch_rows,
            batch_format="pyarrow", zero_copy_batch=True, num_cpus=num_cpus)
        sums = np.zeros((k, d), np.float64)
        counts = np.zeros(k, np.int64)
        inertia = 0.0
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            sums += batch["sums"].sum(axis=0)
            counts += batch["counts"].sum(axis=0)
            inertia += float(batch["inertia"].sum())
    finally:
        del ref  # the centroids of this pass leave the object store
    return sums, counts, inertia


def distributed_lloyd(shard_files: list[Path], init_centroids: np.ndarray, max_iter: int = 20, tol: float = 1e-4, *,
                      column: str = "feature", batch_rows: int = 65536,
                      num_cpus: float = 1.0) -> tuple[np.ndarray, list[dict]]:
    """Spherical Lloyd over all rows of the Parquet shards, starting from init_centroids (k, D).

    Returns (k, D) float32 unit centroids and one record per pass (see `run_lloyd`): it stops after
    max_iter passes or when the inertia changes by less than tol (relative). `batch_rows` bounds a
    worker's memory (batch_rows x k cosines); `num_cpus` is what each map task reserves. Needs a
    running Ray (`ray_jobs.session.init_ray`). The result equals single-process
    `core.clustering.lloyd` on the same rows up to float64 summation order.
    """
    paths = [str(p) for p in shard_files]
    if not paths:
        raise ValueError("distributed Lloyd: no feature shards given; run the extract stage first")
    init = np.asarray(init_centroids, dtype=np.float32)
    if init.ndim != 2 or init.shape[0] < 2:
        raise ValueError(f"distributed Lloyd: init_centroids of shape {init.shape}; (k >= 2, D) needed")

    def partial(centroids: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
        sums, counts, inertia = lloyd_pass(paths, centroids, column=column, batch_rows=batch_rows, num_cpus=num_cpus)
        if counts.sum() == 0:
            raise ValueError(f"distributed Lloyd: the {len(paths)} shards hold no feature rows")
        return sums, counts, inertia

    return run_lloyd(partial, init, max_iter, tol)
