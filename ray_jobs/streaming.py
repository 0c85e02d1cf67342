"""Runs one stage as a streaming Ray Data plan over images, and finishes its shards exactly once.

The plan's rows are images, each carrying its id and its shard (the output partition). Its last
step writes each image's part (`storage.run.parts`) and returns the image's status row
(`actors.rows.STATUS`). The driver reads only those rows: when every image of a shard has come
out, it starts the shard's finish task (parts -> shard files -> completion marker). Nothing big
reaches the driver, and Ray Data's backpressure bounds what is in flight between the steps.

Fault tolerance:
  - a lost task or actor (killed worker, lost node) is retried by Ray Data; its images' parts are
    rewritten with the same content under the same names, and an image seen twice is counted once;
  - a killed driver leaves parts and markers: a re-run skips marked shards and, in the others,
    every image whose part exists, then finishes the shards;
  - a run whose settings differ from the stage directory's `_plan.json` is refused, never mixed
    (`storage.run.plans`);
  - a marker whose files vanished or changed size is dropped and its shard done again.

Why not Ray Data's own checkpointing (`DataContext.checkpoint_config`, Ray 2.60): it records the
ids of rows a *write* sink has written and filters them out of the *read* on a re-run. The
stages' outputs are shard files the next stage reads shard by shard (fit, label, report), which a
sink that writes one file per block under generated names cannot give; a sink write that lands
before its checkpoint is written is repeated on retry (ray-project/ray #55008), duplicating rows;
every checkpointed id is loaded into memory on restore (#65891); and on this project's 2-CPU
machine a re-run with an actor-pool map over fully checkpointed input hung, its checkpoint filter
being one more actor pool competing for the CPUs. Shard markers plus per-image
parts give exactly-once shard files, image-level resume and no id set in memory.
"""

import json
import logging
import traceback
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import ray
from ray.data import Dataset
from tqdm import tqdm

from actors.rows import STATUS, resources_of
from core.errors import UserError
from core.models import CheckpointError
from storage.run.atomic import write_json_atomic
from storage.run.markers import STAGE_COMPLETE, marker_path, marker_problems, read_done
from storage.run.parts import PARTS_DIR, clear_parts, staged_ids
from storage.run.plans import Plan, StageIncomplete, check_plan
from storage.run.shards import shard_records

log = logging.getLogger(__name__)


class ActorSetupError(StageIncomplete):
    """The stage's actors could not be built (a bug or an environment problem, not a config one)."""


def guarded(actor_cls, per_row: bool):
    """`actor_cls` as a Ray Data UDF whose constructor never raises.

    An exception in an actor's `__init__` (a missing or mismatched checkpoint, no CUDA device)
    kills the actor, and Ray Data then reports an ActorDiedError holding the original error only
    as text. The guard keeps the error and returns it in the status of every row it is given
    (later steps pass such rows on), so the driver raises it as itself (CheckpointError ->
    `submit.py` exits 2 with its message). `per_row`: the UDF takes rows (`map`), else batches.
    """

    class Guarded:
        def __init__(self, **kwargs):
            self.actor, self.error = None, None
            try:
                self.actor = actor_cls(**kwargs)
                if hasattr(self.actor, "setup"):  # the step's expensive one-time work (a model, the fits)
                    self.actor.setup()
            except Exception as err:  # noqa: BLE001 - reported to the driver below
                self.error = json.dumps(
                    {
                        "type": type(err).__name__,
                        "message": str(err),
                        "user": isinstance(err, UserError),
                        "traceback": traceback.format_exc(),
                    }
                )

        def __call__(self, rows: dict) -> dict:
            if self.error is None:
                return self.actor(rows)
            out = {k: rows[k] for k in STATUS}
            out["setup_error"] = self.error if per_row else [self.error] * len(rows["shard"])
            return out

    Guarded.__name__ = Guarded.__qualname__ = actor_cls.__name__  # Ray names the actors after it
    Guarded.resources = actor_cls.resources
    return Guarded


def raise_setup_error(name: str, encoded: str) -> None:
    error = json.loads(encoded)
    if error["user"]:  # its message says what to fix (a checkpoint, a device); the traceback would only bury it
        log.debug("%s: an actor failed to start:\n%s", name, error["traceback"])
        raise (CheckpointError if error["type"] == CheckpointError.__name__ else UserError)(error["message"])
    log.error("%s: an actor failed to start:\n%s", name, error["traceback"])
    raise ActorSetupError(
        f"{name}: the stage's actors could not start: {error['type']}: {error['message']} "
        "(the driver log has the worker's traceback)"
    )


@contextmanager
def user_errors_raised_as_themselves():
    """A UserError raised in a task (a shard's file changed since its marker) reaches the driver
    wrapped in Ray's errors; unwrapped, its message says what to fix."""
    try:
        yield
    except UserError:
        raise
    except Exception as err:
        cause = err
        while cause is not None and not isinstance(cause, UserError):
            cause = getattr(cause, "cause", None) or cause.__cause__
        if cause is None:
            raise
        raise UserError(str(cause).strip().splitlines()[-1]) from err


def run_image_stream(
    name: str,
    stage_dir: Path,
    plan: Plan,
    shards: list[dict],
    build: Callable[[Dataset], Dataset],
    finish: "Finisher",
    inputs: str | None = None,
) -> dict[str, dict]:
    """Stream the images of the unfinished shards through `build(ds)` and finish each shard.

    `shards`: [{"shard", "records"}] (`storage.run.shards.plan_shards`). `build` turns a dataset of
    shard rows (the images still to do) into the dataset of status rows. `finish(shard_row,
    written_ids, failed)` starts the shard's finish and returns its ObjectRef (`Finisher`).
    `inputs`: the content key of what the stage reads (`storage.run.plans.check_plan`).
    Returns every shard's marker.
    """
    check_plan(stage_dir, plan, inputs)
    done = read_done(stage_dir)
    for shard in [s["shard"] for s in shards if s["shard"] in done]:
        if problems := marker_problems(Path(stage_dir).parent, done[shard], plan.key):
            log.warning("%s %s: %s since it was done; doing the shard again", name, shard, "; ".join(problems[:3]))
            marker_path(Path(stage_dir), shard).unlink()
            del done[shard]
    todo = {s["shard"]: s for s in shards if s["shard"] not in done}
    if todo:
        finish.start()
    pending, written, failed = {}, {}, {}
    sources = []
    for shard, row in todo.items():
        records = shard_records(row)
        staged = staged_ids(stage_dir, shard, plan.key) & {r.image_id for r in records}
        remaining = [r for r in records if r.image_id not in staged]
        pending[shard], written[shard], failed[shard] = {r.image_id for r in remaining}, sorted(staged), []
        if remaining:
            sources.append({"shard": shard, "records": json.dumps([r.to_dict() for r in remaining])})
    log.info(
        "%s: %d shards, %d already done, %d images to run",
        name,
        len(shards),
        len(shards) - len(todo),
        sum(len(p) for p in pending.values()),
    )
    finishing = [finish(todo[s], written[s], failed[s]) for s in todo if not pending[s]]
    if sources:
        ds = build(ray.data.from_items(sources, override_num_blocks=len(sources)))
        with (
            tqdm(total=sum(len(p) for p in pending.values()), desc=f"{name}: images", unit="image") as bar,
            user_errors_raised_as_themselves(),
        ):
            for row in ds.iter_rows():  # drives the plan; the parts are on disk already
                if row["setup_error"]:
                    raise_setup_error(name, row["setup_error"])
                shard, image_id = row["shard"], row["image_id"]
                if image_id not in pending[shard]:  # a retried task's repeat
                    continue
                pending[shard].discard(image_id)
                bar.update()
                if row["error"]:
                    failed[shard].append(
                        {"image_id": image_id, "path": row["path"], "stage": name, "error": row["error"]}
                    )
                else:
                    written[shard].append(image_id)
                if not pending[shard]:
                    finishing.append(finish(todo[shard], written[shard], failed[shard]))
                if finishing:
                    finished, finishing = ray.wait(finishing, num_returns=len(finishing), timeout=0)
                    ray.get(finished)  # a failed finish (disk full, ...) stops the stage now
    ray.get(finishing)
    if (stage_dir / PARTS_DIR).is_dir() and not any((stage_dir / PARTS_DIR).iterdir()):
        (stage_dir / PARTS_DIR).rmdir()  # every shard finished: nothing staged is left
    done = read_done(stage_dir)
    missing = [s["shard"] for s in shards if s["shard"] not in done]
    if missing:
        raise StageIncomplete(
            f"{name}: shards {missing[:5]}{'...' if len(missing) > 5 else ''} did not finish; "
            "run the stage again to resume"
        )
    # what another run's fit checks before it reads these shards (`storage.run.feature_sets`)
    write_json_atomic({"plan_key": plan.key, "shards": [s["shard"] for s in shards]}, Path(stage_dir) / STAGE_COMPLETE)
    return {s["shard"]: done[s["shard"]] for s in shards}


def write_failed_items(output_dir: Path, *stages: dict[str, dict]) -> list[dict]:
    """The images that failed in the given stages (their shards' markers, in stage then shard
    order) -> `output_dir/failed_items.json`, each with its stage, file and reason."""
    failed = [f for done in stages for shard in sorted(done) for f in done[shard]["failed"]]
    write_json_atomic(failed, Path(output_dir) / "failed_items.json")
    return failed


def stage_summary(name: str, done: dict[str, dict], output_dir: Path) -> str:
    """One line: how many images the stage did and how many failed, and where they are listed."""
    num_done, num_failed = sum(m["num_images"] for m in done.values()), sum(len(m["failed"]) for m in done.values())
    manifest = Path(output_dir) / "failed_items.json"
    return f"{name}: {num_done} images done, {num_failed} failed (failed-items manifest: {manifest})"


def step_args(cfg, step_fn) -> dict:
    """Ray Data arguments of a step, from the config section it declared (`actors.rows.step`)."""
    resources = resources_of(cfg, step_fn)
    return actor_args(resources) if hasattr(resources, "num_actors") else task_args(resources)


def task_args(tasks) -> dict:
    """Ray Data arguments of a CPU step (`configs.schema.TaskConfig`)."""
    return {"num_cpus": tasks.num_cpus, **({"concurrency": tasks.concurrency} if tasks.concurrency else {})}


def actor_args(workers) -> dict:
    """Ray Data arguments of an actor pool (`configs.schema.WorkersConfig`)."""
    # Up to 4 calls queued per actor: the next batch's inputs arrive while it works on this one.
    pool = ray.data.ActorPoolStrategy(size=workers.num_actors, max_tasks_in_flight_per_actor=4)
    return {"compute": pool, "num_cpus": workers.cpus_per_actor, "num_gpus": workers.gpus_per_actor or None}


@ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=-1)
class ShardFinisher:
    """Runs a stage's finish calls (parts -> shard files -> marker) in one long-lived worker: they
    only move files, and short tasks of their own would each start a worker process (on a small
    machine that start-up, not the work, is the cost). Restarted and retried if its node is lost:
    a retry of a finish that had already written its marker (the node died just after) only
    clears what is left of the shard's parts."""

    def finish(
        self,
        fn: Callable,
        stage_dir: str,
        shard_row: dict,
        written: list[str],
        failed: list[dict],
        plan_key: str,
        **kwargs,
    ) -> None:
        stage_dir, shard = Path(stage_dir), shard_row["shard"]
        if self._finished(stage_dir, shard, set(written), plan_key):
            clear_parts(stage_dir, shard)
            return
        fn(str(stage_dir), shard_row, written, failed, plan_key, **kwargs)

    @staticmethod
    def _finished(stage_dir: Path, shard: str, written: set[str], plan_key: str) -> bool:
        path = marker_path(stage_dir, shard)
        if not path.is_file():
            return False
        marker = json.loads(path.read_text())
        return set(marker["image_ids"]) == written and not marker_problems(stage_dir.parent, marker, plan_key)


class Finisher:
    """`finish` for `run_image_stream`: `fn(stage_dir, shard_row, written, failed, plan_key, **kwargs)` on
    the stage's `ShardFinisher` (it reserves no CPU, so it never waits behind the stage's tasks)."""

    def __init__(self, fn: Callable, stage_dir: Path, plan_key: str, **kwargs):
        self.fn, self.stage_dir, self.plan_key, self.kwargs = fn, str(stage_dir), plan_key, kwargs
        self.actor = None

    def start(self) -> None:
        """Starts the actor once the stage has work: its worker's start-up (about 3 s on 2 cores) then
        overlaps the stage's first images instead of delaying the first finished shard. A stage with
        nothing to do, or one that fails before, starts none (a dropped handle ends the actor)."""
        if self.actor is None:
            self.actor = ShardFinisher.options(max_concurrency=2).remote()

    def __call__(self, shard_row: dict, written: list[str], failed: list[dict]):
        self.start()
        return self.actor.finish.remote(
            self.fn, self.stage_dir, shard_row, sorted(written), failed, self.plan_key, **self.kwargs
        )
