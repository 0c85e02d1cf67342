"""One job at a time per output folder: an exclusive `flock` on `output_dir/.lock`.

The kernel drops the lock when its process ends, however it ends, so a killed job never leaves a
stale lock and no two jobs can both take one over. The file holds the owner's pid, host and
command, for the message a second job gets. (On a shared filesystem the lock is only as good as
its `flock`: NFSv4 and Lustre honour it.) The file stays in place between jobs.
"""

import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path

from core.errors import UserError

LOCK_FILE = ".lock"


class OutputLocked(UserError):
    pass


class OutputLock:
    def __init__(self, output_dir: Path, command: str):
        self.path = Path(output_dir) / LOCK_FILE
        self.owner = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "command": command,
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        self.fd: int | None = None

    def __enter__(self) -> "OutputLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 4096, 0).decode(errors="replace")
            os.close(fd)
            raise OutputLocked(
                f"{self.path.parent} is in use by {_describe(holder)}: wait for that job to end, "
                "or use another output_dir"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(self.owner).encode(), 0)
        self.fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self.fd is not None:
            os.close(self.fd)  # releases the lock
            self.fd = None


def _describe(holder: str) -> str:
    try:
        h = json.loads(holder)
    except ValueError:
        return "another job"
    return f"pid {h.get('pid')} on host {h.get('host')} since {h.get('started')} ({h.get('command')})"


def command_line() -> str:
    return " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])
