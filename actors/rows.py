"""The row every streaming stage passes on: which image, where it came from, and how it went.

Heavy columns (windows, features) travel beside these; each step drops what the next does not
need, and the last step returns only these five, which the driver reads to finish shards.
"""

import logging
from collections.abc import Callable

from storage.images import InputError

log = logging.getLogger(__name__)

STATUS = ("shard", "image_id", "path", "error", "setup_error")


def step(resources: str):
    """Declares, beside a step, the config section that sizes it on the cluster: a `TaskConfig`
    (`num_cpus`, `concurrency`) for a task, a `WorkersConfig` (`num_actors`, `cpus_per_actor`,
    `gpus_per_actor`) for an actor pool. An actor step's class builds what is expensive in
    `setup()`, once per actor, and handles one row or batch per call."""

    def declare(fn):
        fn.resources = resources
        return fn

    return declare


def resources_of(cfg, step_fn):
    """The config section a step declared (`step`), read off the run's config."""
    section = cfg
    for key in step_fn.resources.split("."):
        section = getattr(section, key)
    return section


def status(row: dict, error: str | None = None) -> dict:
    """The row's status columns; `error` replaces its error."""
    out = {k: row[k] for k in STATUS}
    if error is not None:
        out["error"] = error
    return out


def failure_message(stage: str, image_id: str, err: Exception) -> str:
    """What the failed-items manifest says: an input error names its file and fix; anything else is ours."""
    if isinstance(err, InputError):
        return str(err)
    log.exception("%s: %s failed", stage, image_id)
    return f"internal error {type(err).__name__}: {err} (see the worker log; please report it)"


def run_on_image(stage: str, row: dict, work: Callable[[], None]) -> dict:
    """The status row after `work()` on one image. A row that failed earlier, or whose stage could
    not start, is passed on untouched; a failure here is recorded in its status, never raised: one
    image must not end a run of thousands."""
    if row["error"] or row["setup_error"]:
        return status(row)
    try:
        work()
    except Exception as err:  # noqa: BLE001 - goes to the failed-items manifest
        return status(row, failure_message(stage, row["image_id"], err))
    return status(row)
