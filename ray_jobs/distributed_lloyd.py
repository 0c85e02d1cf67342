"""Spherical Lloyd iterations over Parquet feature shards as Ray Data maps, for data beyond one machine.

Every iteration is one Ray Data pass: `from_items` over the shards' Parquet row groups ->
`map_batches` in which each task streams its row groups (the feature column only, `batch_rows`
rows at a time) through `core.clustering.lloyd_partial` against the current centroids (sent once
per iteration through the object store with `ray.put`) -> one tiny row per row group
(sums (k, D) float64, counts (k,), inertia) -> the driver adds them up as they stream in and does
the update (`lloyd_update`). The driver holds the centroids, one running (k, D) sum and the list of
row groups, never the features, so its memory does not grow with the number of rows. Warm-start it
from a sampled fit (`fit_kmeans`); the stopping rule and the history records are
`core.clustering.run_lloyd`'s.

Parallelism is one task per row group: `write_parquet_atomic` writes a shard of up to 1Mi rows as
one row group, and the extract stage's shards (16-25 images of 23 x 46 patches) are ~17-26k rows.

Why not `ray.data.read_parquet`: on this project's 2-core machine (under load from other jobs) a
`read_parquet` + `map_batches` pass over 24k rows in 3 files took 6-16 s against 0.1-0.2 s for
`from_items` of the row groups + the same UDF in the same Ray session; the difference is Ray Data's
Parquet datasource set-up on every execution (file listing, metadata, read planning), and Lloyd runs
its plan once per iteration.
"""

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray

from core.clustering import lloyd_partial, run_lloyd
from storage.shards import features_from_table


def row_groups(paths: list[str]) -> list[dict]:
    """The work items of a pass: one per Parquet row group (read from the footers only)."""
    return [{"path": p, "row_group": g} for p in paths for g in range(pq.ParquetFile(p).num_row_groups)]


def _partials(items: dict[str, np.ndarray], centroids, column: str, batch_rows: int) -> dict[str, np.ndarray]:
    """Row groups -> one Lloyd partial per row group, streamed from Parquet batch_rows rows at a time."""
    # fn_kwargs reach the UDF inside a closure, so an ObjectRef arrives as a ref (Ray Data #49207).
    c = ray.get(centroids) if isinstance(centroids, ray.ObjectRef) else centroids
    k, d = c.shape
    out_sums, out_counts, out_inertia = [], [], []
    for path, group in zip(items["path"], items["row_group"]):
        sums, counts, inertia = np.zeros((k, d)), np.zeros(k, np.int64), 0.0
        for record_batch in pq.ParquetFile(path).iter_batches(batch_size=batch_rows, row_groups=[int(group)],
                                                              columns=[column]):
            part = lloyd_partial(features_from_table(pa.Table.from_batches([record_batch])), c, batch_rows)
            sums += part[0]
            counts += part[1]
            inertia += part[2]
        out_sums.append(sums)
        out_counts.append(counts)
        out_inertia.append(inertia)
    return {"sums": np.stack(out_sums), "counts": np.stack(out_counts), "inertia": np.array(out_inertia)}


def lloyd_pass(paths: list[str], centroids: np.ndarray, *, column: str = "feature", batch_rows: int = 65536,
               num_cpus: float = 1.0, items: list[dict] | None = None) -> tuple[np.ndarray, np.ndarray, float]:
    """One E-step over every row of the shards -> (sums, counts, inertia), reduced on the driver as it streams."""
    k, d = centroids.shape
    items = row_groups(paths) if items is None else items
    if not items:  # shards without row groups hold no rows
        return np.zeros((k, d)), np.zeros(k, np.int64), 0.0
    ref = ray.put(np.ascontiguousarray(centroids, dtype=np.float32))
    try:
        ds = ray.data.from_items(items).map_batches(
            _partials, fn_kwargs={"centroids": ref, "column": column, "batch_rows": batch_rows},
            batch_size=1, batch_format="numpy", num_cpus=num_cpus)
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
    worker's memory (batch_rows x k cosines); `num_cpus` is what each map task reserves (leave the
    default 1 or less: fractions let more tasks share a core). A task's unit of work is one row group. Needs a
    running Ray (`ray_jobs.session.init_ray`). The result equals single-process
    `core.clustering.lloyd` on the same rows up to float64 summation order.
    """
    paths = [str(p) for p in shard_files]
    if not paths:
        raise ValueError("distributed Lloyd: no feature shards given; run the extract stage first")
    init = np.asarray(init_centroids, dtype=np.float32)
    if init.ndim != 2 or init.shape[0] < 2:
        raise ValueError(f"distributed Lloyd: init_centroids of shape {init.shape}; (k >= 2, D) needed")

    items = row_groups(paths)

    def partial(centroids: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
        sums, counts, inertia = lloyd_pass(paths, centroids, column=column, batch_rows=batch_rows,
                                           num_cpus=num_cpus, items=items)
        if counts.sum() == 0:
            raise ValueError(f"distributed Lloyd: the {len(paths)} shards hold no feature rows")
        return sums, counts, inertia

    return run_lloyd(partial, init, max_iter, tol)
