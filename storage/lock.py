"""One job at a time per output folder: `output_dir/.lock` holds the owner's pid, host and command.

Created with O_EXCL, so two jobs cannot both take it. A lock left by a process that has died on
this host is taken over (and said so); one held from another host cannot be checked from here,
so the message says how to remove it once that job is known to be gone.
"""

import json
import logging
import os
import socket
import sys
import time
from pathlib import Path

from core.errors import UserError

log = logging.getLogger(__name__)
LOCK_FILE = ".lock"


class OutputLocked(UserError):
    pass


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, owned by another user
        return True
    return True


class OutputLock:
    def __init__(self, output_dir: Path, command: str):
        self.path = Path(output_dir) / LOCK_FILE
        self.owner = {"pid": os.getpid(), "host": socket.gethostname(), "command": command,
                      "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}

    def __enter__(self) -> "OutputLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._holder()
                if holder is not None and holder.get("host") == self.owner["host"] and not _alive(int(holder.get("pid", -1))):
                    log.warning("%s was left by process %s, which has ended; taking it over", self.path, holder.get("pid"))
                    self.path.unlink(missing_ok=True)
                    continue
                raise OutputLocked(
                    f"{self.path.parent} is in use by {self._describe(holder)}: wait for that job to end, or use another "
                    f"output_dir; if it is gone (its host crashed), delete {self.path}") from None
            with os.fdopen(fd, "w") as f:
                json.dump(self.owner, f)
            return self
        raise OutputLocked(f"could not take {self.path}: another job keeps taking it")

    def __exit__(self, *exc) -> None:
        if self._holder() == self.owner:
            self.path.unlink(missing_ok=True)

    def _holder(self) -> dict | None:
        try:
            return json.loads(self.path.read_text())
        except (FileNotFoundError, ValueError):
            return None  # gone, or half-written by a job that is taking it now

    @staticmethod
    def _describe(holder: dict | None) -> str:
        if holder is None:
            return "another job (its lock file is being written)"
        return (f"pid {holder.get('pid')} on host {holder.get('host')} since {holder.get('started')} "
                f"({holder.get('command')})")


def command_line() -> str:
    return " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])
