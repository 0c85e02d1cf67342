"""Runs one actor stage over the shards that have no completion marker yet."""

import json
import logging
from pathlib import Path

import ray

from configs.schema import WorkersConfig
from storage.shards import read_done, write_json_atomic

log = logging.getLogger(__name__)


class StageIncomplete(RuntimeError):
    pass


def run_actor_stage(name: str, shards: list[dict], actor_cls, constructor_kwargs: dict,
                    workers: WorkersConfig, stage_dir: Path, plan_key: str) -> dict[str, dict]:
    """Map `actor_cls` (an actor pool, one shard per call) over the shards not yet done.

    Actors write each shard's output and marker themselves, under names derived from the shard,
    so a retried task (restarted actor) or a re-run of the job rewrites nothing twice.
    `plan_key` identifies the inputs and settings; markers from a run with another key would
    be wrong to reuse, so that is refused rather than mixed. Returns every shard's summary.
    """
    check_plan(stage_dir, plan_key)
    done = read_done(stage_dir)
    todo = [s for s in shards if s["shard"] not in done]
    log.info("%s: %d shards, %d already done, %d to run", name, len(shards), len(shards) - len(todo), len(todo))
    if todo:
        ds = ray.data.from_items(todo, override_num_blocks=len(todo))
        ds = ds.map_batches(
            actor_cls, batch_size=1, fn_constructor_kwargs=constructor_kwargs,
            compute=ray.data.ActorPoolStrategy(size=min(workers.num_actors, len(todo))),
            num_cpus=workers.cpus_per_actor, num_gpus=workers.gpus_per_actor or None,
        )
        for _ in ds.iter_rows():  # drives the plan; outputs are on disk already
            pass
    done = read_done(stage_dir)
    missing = [s["shard"] for s in shards if s["shard"] not in done]
    if missing:
        raise StageIncomplete(f"{name}: shards {missing[:5]}{'...' if len(missing) > 5 else ''} did not finish; run the stage again to resume")
    return {s["shard"]: done[s["shard"]] for s in shards}


def check_plan(stage_dir: Path, plan_key: str) -> None:
    """Record the plan of a new stage directory; refuse to resume one made with another plan."""
    plan_file = stage_dir / "_plan.json"
    if plan_file.exists():
        old = json.loads(plan_file.read_text())["plan_key"]
        if old != plan_key:
            raise StageIncomplete(
                f"{stage_dir} holds results of another dataset or settings (plan {old}, now {plan_key}); "
                "use a new output_dir, or delete that folder to recompute it")
    else:
        write_json_atomic({"plan_key": plan_key}, plan_file)
