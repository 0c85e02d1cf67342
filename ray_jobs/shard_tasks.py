"""The fit stage's passes over every feature shard as Ray tasks, their results tree-reduced.

A pass runs one function per shard as a Ray task (each reads and checks its own file against its
marker) and adds the results up `fan_in` at a time in Ray tasks: the driver holds object
references and the one reduced result, never the shards nor the per-shard results, so its memory
does not grow with the number of shards. The tree is fixed by the shard order, so a result that
depends on summation order (float sums) does not depend on scheduling. Plain tasks, as in
`ray_jobs.distributed_lloyd` (which shares `tree_add`): these passes are short and run once.
The shards must be readable from every node (shared storage), as the label stage needs anyway.
"""

from collections.abc import Callable, Iterator
from functools import reduce

import numpy as np
import ray
from tqdm import tqdm

from core.clustering.sampling import BoundedSample, patch_priorities, per_image_lowest
from core.errors import UserError
from ray_jobs.streaming import user_errors_raised_as_themselves
from storage.features import features_from_table
from storage.run.feature_sets import FeatureShards
from storage.run.markers import read_verified_parquet

REDUCE_CPUS = 0.1  # a reduction node only adds arrays: it must not queue behind the readers for a whole CPU


def tree_add(level: list, add: Callable, fan_in: int = 8):
    """The ref of add(...) over object refs, `fan_in` at a time in their order (a fixed tree); each
    node is submitted as soon as its children are, so the driver only ever holds refs."""
    if fan_in < 2:
        raise ValueError(f"fan_in={fan_in} must be >= 2")
    while len(level) > 1:
        level = [
            _add_results.options(num_cpus=REDUCE_CPUS).remote(add, *level[i : i + fan_in])
            for i in range(0, len(level), fan_in)
        ]
    return level[0]


class ShardDataError(UserError, ValueError):
    """A shard whose contents cannot be used (NaN features, say); the message names the file."""


@ray.remote
def _shard_result(root, marker: dict, path, fix: str, columns: list[str], index: int, fn: Callable, *args):
    table = read_verified_parquet(root, marker, path, fix, columns)
    try:
        return fn(table, index, *args)
    except ValueError as err:
        raise ShardDataError(f"{path}: {err}") from None


@ray.remote
def _add_results(add: Callable, *parts):
    return reduce(add, parts)


def _submit(
    shards: FeatureShards, columns: list[str], fn: Callable, args: tuple, num_cpus: float, only: list[int] | None
) -> list:
    """One task per shard (or per index in `only`): fn(table, shard index, *args). `args` go through
    the object store once (e.g. the centroids), not once per task."""
    markers = list(shards.markers.values())
    arg_refs = [ray.put(a) for a in args]
    return [
        _shard_result.options(num_cpus=num_cpus).remote(
            shards.root, markers[i], shards.paths[i], shards.fix, columns, i, fn, *arg_refs
        )
        for i in (range(len(markers)) if only is None else only)
    ]


def map_reduce_shards(
    shards: FeatureShards,
    columns: list[str],
    fn: Callable,
    add: Callable,
    args: tuple = (),
    desc: str = "shards",
    fan_in: int = 8,
    num_cpus: float = 1.0,
):
    """add(fn(table_0, 0, *args), fn(table_1, 1, *args), ...) over the shards' `columns`; None
    when there are no shards."""
    leaves = _submit(shards, columns, fn, args, num_cpus, None)
    if not leaves:
        return None
    with user_errors_raised_as_themselves():  # a changed file names itself and the fix
        root = tree_add(leaves, add, fan_in)
        pending = leaves
        with tqdm(total=len(leaves), desc=desc, unit="shard") as bar:
            while pending:  # fetch_local=False: the results stay where they are, for the tree
                done, pending = ray.wait(
                    pending, num_returns=min(len(pending), max(1, len(leaves) // 100)), fetch_local=False
                )
                bar.update(len(done))
        return ray.get(root)


def map_shards(
    shards: FeatureShards,
    columns: list[str],
    fn: Callable,
    args: tuple = (),
    desc: str = "shards",
    num_cpus: float = 1.0,
    only: list[int] | None = None,
) -> Iterator:
    """fn(table_i, i, *args) for every shard i (or every i in `only`), yielded in that order, one
    result fetched at a time."""
    leaves = _submit(shards, columns, fn, args, num_cpus, only)
    with user_errors_raised_as_themselves():
        for ref in tqdm(leaves, desc=desc, unit="shard"):
            yield ray.get(ref)


def add_arrays(a, b):
    """Two nested dicts / tuples of arrays and numbers, added leaf by leaf."""
    if isinstance(a, dict):
        return {key: add_arrays(value, b[key]) for key, value in a.items()}
    if isinstance(a, tuple):
        return tuple(add_arrays(x, y) for x, y in zip(a, b, strict=True))
    return a + b


# The fit sample: the rows of lowest priority (`core.clustering.sampling`), as (shard << 32 | row) ids first.


def _shard_candidates(table, index: int, seed: int, cap: int, max_rows: int) -> BoundedSample:
    priorities, image_index = patch_priorities(table.column("image_id").to_numpy(zero_copy_only=False), seed)
    rows = per_image_lowest(priorities, image_index, cap)
    candidates = BoundedSample(max_rows)
    candidates.add(priorities[rows], (np.int64(index) << 32) | rows.astype(np.int64))
    return candidates


def _merge_candidates(a: BoundedSample, b: BoundedSample) -> BoundedSample:
    a.add(b.priorities, b.rows)
    return a


def _chosen_rows(table, index: int, shard_of: np.ndarray, row_of: np.ndarray) -> np.ndarray:
    return features_from_table(table.take(row_of[shard_of == index]))


def sample_patches(shards: FeatureShards, seed: int, cap: int, max_rows: int, desc: str) -> np.ndarray:
    """(n, D) float32: at most `cap` rows per image and `max_rows` in all, those of lowest priority,
    in priority order, in two passes of tasks. The first chooses the rows: each shard sends only
    its candidates' priorities and ids up the tree, so a reduction node holds at most `fan_in` x
    max_rows ids, not features. The second reads each shard's chosen rows, one shard's at a time
    into the driver, which holds the sample alone."""
    chosen = map_reduce_shards(
        shards, ["image_id"], _shard_candidates, _merge_candidates, (seed, cap, max_rows), desc=desc + " (choosing)"
    )
    ids = np.zeros(0, np.int64) if chosen is None else chosen.result()
    if len(ids) == 0:
        return np.zeros((0, 0), np.float32)
    shard_of, row_of = ids >> 32, ids & 0xFFFFFFFF
    by_shard = np.argsort(shard_of, kind="stable")  # places in the sample, shard by shard, each in priority order
    sample, offset = None, 0
    for rows in map_shards(
        shards, ["feature"], _chosen_rows, (shard_of, row_of), desc + " (reading)", only=np.unique(shard_of).tolist()
    ):
        sample = np.empty((len(ids), rows.shape[1]), np.float32) if sample is None else sample
        sample[by_shard[offset : offset + len(rows)]] = rows
        offset += len(rows)
    return sample
