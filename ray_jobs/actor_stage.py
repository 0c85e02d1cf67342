"""Runs one actor stage over the shards that have no completion marker yet."""

import json
import logging
import traceback
from pathlib import Path

import ray

from configs.schema import WorkersConfig
from core.models import CheckpointError
from storage.shards import read_done, write_json_atomic

log = logging.getLogger(__name__)


class StageIncomplete(RuntimeError):
    pass


class ActorSetupError(StageIncomplete):
    """The stage's actors could not be built (a bug or an environment problem, not a config one)."""


# Setup errors that say what to fix in the config: re-raised in the driver as themselves.
SETUP_ERRORS = {cls.__name__: cls for cls in (CheckpointError,)}


def guarded(actor_cls):
    """`actor_cls` as a Ray Data UDF whose constructor never raises.

    An exception in an actor's `__init__` (a missing or mismatched checkpoint, no CUDA device)
    kills the actor, and Ray Data then reports an ActorDiedError holding the original error only
    as text. The guard keeps the error instead and returns it with every batch, so the driver can
    raise it as itself (CheckpointError -> `submit.py` exits 2 with its message).
    """

    class Guarded:
        def __init__(self, **kwargs):
            self.actor, self.error = None, None
            try:
                self.actor = actor_cls(**kwargs)
            except Exception as err:  # noqa: BLE001 - reported to the driver below
                self.error = {"type": type(err).__name__, "message": str(err), "traceback": traceback.format_exc()}

        def __call__(self, batch: dict) -> dict:
            if self.error is not None:
                shards = list(batch["shard"])
                return {"shard": shards, "setup_error": [json.dumps(self.error)] * len(shards)}
            out = self.actor(batch)
            return {**out, "setup_error": [""] * len(out["shard"])}

    Guarded.__name__ = Guarded.__qualname__ = actor_cls.__name__  # Ray names the actors after it
    return Guarded


def raise_setup_error(name: str, actor_cls, encoded: str) -> None:
    error = json.loads(encoded)
    if error["type"] in SETUP_ERRORS:  # its message says what to fix; the traceback would only bury it
        log.debug("%s: a %s actor failed to start:\n%s", name, actor_cls.__name__, error["traceback"])
        raise SETUP_ERRORS[error["type"]](error["message"])
    log.error("%s: a %s actor failed to start:\n%s", name, actor_cls.__name__, error["traceback"])
    raise ActorSetupError(f"{name}: the {actor_cls.__name__} actors could not start: {error['type']}: {error['message']} "
                          "(the driver log has the worker's traceback)")


def run_actor_stage(name: str, shards: list[dict], actor_cls, constructor_kwargs: dict,
                    workers: WorkersConfig, stage_dir: Path, plan_key: str) -> dict[str, dict]:
    """Map `actor_cls` (an actor pool, one shard per call) over the shards not yet done.

    Actors write each shard's output and marker themselves, under names derived from the shard,
    so a retried task (restarted actor) or a re-run of the job rewrites nothing twice.
    `plan_key` identifies the inputs and settings; markers from a run with another key would
    be wrong to reuse, so that is refused rather than mixed. Returns every shard's summary.

    Fault tolerance is Ray Data's: a dead actor is restarted (max_restarts=-1) and its task runs
    again there (max_task_retries=-1); the shard's marker makes a repeat a no-op. An actor that
    cannot even be built (bad checkpoint) raises its own error here, not a retry loop.
    """
    check_plan(stage_dir, plan_key)
    done = read_done(stage_dir)
    todo = [s for s in shards if s["shard"] not in done]
    log.info("%s: %d shards, %d already done, %d to run", name, len(shards), len(shards) - len(todo), len(todo))
    if todo:
        ds = ray.data.from_items(todo, override_num_blocks=len(todo))
        ds = ds.map_batches(
            guarded(actor_cls), batch_size=1, fn_constructor_kwargs=constructor_kwargs,
            compute=ray.data.ActorPoolStrategy(size=min(workers.num_actors, len(todo))),
            num_cpus=workers.cpus_per_actor, num_gpus=workers.gpus_per_actor or None,
        )
        setup_error = None
        for row in ds.iter_rows():  # drives the plan; outputs are on disk already
            setup_error = setup_error or row["setup_error"]
        if setup_error:
            raise_setup_error(name, actor_cls, setup_error)
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
