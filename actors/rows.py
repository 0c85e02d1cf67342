"""The row every streaming stage passes on: which image, where it came from, and how it went.

Heavy columns (windows, features) travel beside these; each step drops what the next does not
need, and the last step returns only these five, which the driver reads to finish shards.
"""

import logging

from storage.images import InputError

log = logging.getLogger(__name__)

STATUS = ("shard", "image_id", "path", "error", "setup_error")


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


def skipped(row: dict) -> bool:
    """A row that failed earlier, or whose stage could not start: passed on untouched."""
    return bool(row["error"]) or bool(row["setup_error"])
