"""Spherical Lloyd iterations over Parquet feature shards as Ray tasks, for data beyond one machine,
every k of a sweep in the same pass.

Every iteration is one pass: one Ray task per Parquet row group streams its rows (the feature
column only, `batch_rows` rows at a time) through `core.clustering.lloyd.lloyd_partials` against the
current centroids of *every* fit still iterating (sent once per iteration through the object
store with `ray.put`), so a row is read and decoded once for the whole sweep. The per-row-group
partials (sums (k, D) float64, counts (k,), inertia, per fit) are tree-reduced by Ray tasks,
`fan_in` at a time: the driver holds object references, the centroids and in the end one reduced
partial per fit, never the features or the per-group partials, so its memory does not grow with the
number of rows or row groups. The tree is fixed by the row-group order, so the float sums (and the
result) do not depend on scheduling. Warm-start it from sampled fits (`fit_kmeans`); the stopping
rule and the history records are `core.clustering.lloyd.run_lloyd_many`'s.

Parallelism is one task per row group: `write_parquet_atomic` writes a shard of up to 1Mi rows as
one row group, and the extract stage's shards (16-25 images of 23 x 46 patches) are ~17-26k rows.
Plain tasks rather than a Ray Data plan: Lloyd runs its pass once per iteration, and Ray Data's
per-execution set-up (a `read_parquet` + `map_batches` pass over 24k rows took 6-16 s against
0.1-0.2 s for the same work as tasks on this project's 2-core machine) would dominate small passes.
"""

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray

from core.clustering.lloyd import lloyd_partials, run_lloyd_many
from ray_jobs.shard_tasks import ShardDataError, add_arrays, tree_add
from ray_jobs.streaming import user_errors_raised_as_themselves
from storage.features import features_from_table

Partials = dict[str, tuple[np.ndarray, np.ndarray, float]]  # per fit: sums (k, D), counts (k,), inertia


def row_groups(paths: list[str], row_weights: list[float] | None = None) -> list[dict]:
    """The work items of a pass: one per Parquet row group (read from the footers only), with the
    weight of its file's rows."""
    weights = [1.0] * len(paths) if row_weights is None else row_weights
    return [
        {"path": p, "row_group": g, "weight": float(w)}
        for p, w in zip(paths, weights, strict=True)
        for g in range(pq.ParquetFile(p).num_row_groups)
    ]


@ray.remote
def _row_group_partials(
    item: dict, centroids: dict[str, np.ndarray], column: str, batch_rows: int, assign: str, device: str
) -> Partials:
    """One row group's E-step against every fit's centroids, the rows read once. A weight other
    than 1 scales the sums and the inertia (the objective); counts stay rows, as the M-step only
    asks whether a cluster got any."""
    out = {name: (np.zeros(c.shape), np.zeros(len(c), np.int64), 0.0) for name, c in centroids.items()}
    weight = item.get("weight", 1.0)
    for batch in pq.ParquetFile(item["path"]).iter_batches(
        batch_size=batch_rows, row_groups=[int(item["row_group"])], columns=[column]
    ):
        try:
            out = add_arrays(
                out,
                lloyd_partials(
                    features_from_table(pa.Table.from_batches([batch])), centroids, batch_rows, assign, device
                ),
            )
        except ValueError as err:  # NaN rows, an assigner that cannot run here: the file and the reason
            raise ShardDataError(f"{item['path']} (row group {item['row_group']}): {err}") from None
    if weight != 1.0:
        out = {name: (sums * weight, counts, inertia * weight) for name, (sums, counts, inertia) in out.items()}
    return out


def lloyd_pass(
    paths: list[str],
    centroids: dict[str, np.ndarray],
    *,
    column: str = "feature",
    batch_rows: int = 65536,
    num_cpus: float = 1.0,
    num_gpus: float = 0.0,
    assign: str = "numpy",
    fan_in: int = 8,
    items: list[dict] | None = None,
) -> Partials:
    """One E-step over every row of the shards for every fit -> per fit (sums, counts, inertia)."""
    items = row_groups(paths) if items is None else items
    if not items:  # shards without row groups hold no rows
        return {name: (np.zeros(c.shape), np.zeros(len(c), np.int64), 0.0) for name, c in centroids.items()}
    ref = ray.put({name: np.ascontiguousarray(c, dtype=np.float32) for name, c in centroids.items()})
    try:
        device = "cuda" if num_gpus > 0 else "cpu"
        level = [
            _row_group_partials.options(num_cpus=num_cpus, num_gpus=num_gpus).remote(
                item, ref, column, batch_rows, assign, device
            )
            for item in items
        ]
        with user_errors_raised_as_themselves():
            return ray.get(tree_add(level, add_arrays, fan_in))
    finally:
        del ref  # the centroids of this pass leave the object store


def distributed_lloyd(
    shard_files: list[Path],
    inits: dict[str, np.ndarray],
    max_iter: int = 20,
    tol: float = 1e-4,
    *,
    column: str = "feature",
    batch_rows: int = 65536,
    num_cpus: float = 1.0,
    num_gpus: float = 0.0,
    assign: str = "numpy",
    fan_in: int = 8,
    row_weights: list[float] | None = None,
) -> dict[str, tuple[np.ndarray, list[dict]]]:
    """Spherical Lloyd over all rows of the Parquet shards for every fit in `inits` (name -> (k, D)),
    one pass per iteration for all of them.

    Returns per fit (k, D) float32 unit centroids and one record per pass it took part in (see
    `run_lloyd_many`): a fit stops after max_iter passes or when its inertia changes by less than
    tol (relative), and later passes leave it out. `batch_rows` bounds a task's memory (batch_rows
    x k cosines); `num_cpus` / `num_gpus` is what each row-group task reserves; `assign` is the
    assignment step's engine (`core.clustering.lloyd.TopTwo`: numpy, torch or faiss), on the GPU where
    num_gpus > 0. Needs a running Ray
    (`ray_jobs.session.init_ray`). Each result equals single-process `core.clustering.lloyd` of
    that fit on the same rows up to float64 summation order. `row_weights` (one per shard file):
    the weight of each of its rows, for a union of feature sets fitted by share (`fit.features`).
    """
    paths = [str(p) for p in shard_files]
    if not paths:
        raise ValueError("distributed Lloyd: no feature shards given; run the extract stage first")
    inits = {name: np.asarray(c, dtype=np.float32) for name, c in inits.items()}
    for name, c in inits.items():
        if c.ndim != 2 or c.shape[0] < 2:
            raise ValueError(f"distributed Lloyd: {name}'s initial centroids have shape {c.shape}; (k >= 2, D) needed")
    items = row_groups(paths, row_weights)

    def partial(centroids: dict[str, np.ndarray]) -> Partials:
        partials = lloyd_pass(
            paths,
            centroids,
            column=column,
            batch_rows=batch_rows,
            num_cpus=num_cpus,
            num_gpus=num_gpus,
            assign=assign,
            fan_in=fan_in,
            items=items,
        )
        if any(counts.sum() == 0 for _, counts, _ in partials.values()):
            raise ValueError(f"distributed Lloyd: the {len(paths)} shards hold no feature rows")
        return partials

    return run_lloyd_many(partial, inits, max_iter, tol)
