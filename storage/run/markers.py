"""Completion markers: what makes re-runs resume and readers trust what they read.

A stage's work is split into shards of consecutive images (deterministic: records are sorted).
Each shard's output is written under a name derived from the shard alone and renamed into place;
a completion marker (`_done/<shard>.json`, also atomic) is written after it. The marker lists
every file the shard wrote with its size and SHA-256 (`outputs`, paths relative to the output
dir), so a reader can tell a shard's files from files that vanished, were truncated or were
replaced since: `marker_problems` checks sizes (a stat per file), `read_verified` the content
of a file a stage reads whole. A re-run skips every shard whose marker holds, so work already
written is never lost or duplicated.
"""

import hashlib
import io
import json
import logging
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from core.errors import UserError
from storage.run.atomic import write_json_atomic

DONE_DIR = "_done"

STAGE_COMPLETE = "_complete.json"  # a stage folder's record that every shard it planned is done: {"plan_key", "shards"}

log = logging.getLogger(__name__)


class OutputChanged(UserError):
    """A file a completion marker lists is missing, or differs from what the shard wrote."""


def file_sha256(path: Path) -> str:
    """SHA-256 of a file, read in 4 MiB blocks (checkpoints are hundreds of MB)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def file_record(path: Path) -> dict:
    """What a marker records of one written file."""
    st = Path(path).stat()
    return {"bytes": st.st_size, "sha256": file_sha256(path), "mtime_ns": st.st_mtime_ns}


def output_records(root: Path, paths: list[Path]) -> dict[str, dict]:
    """{path relative to `root` (the output dir): file_record} of files a shard wrote."""
    return {str(Path(p).relative_to(root)): file_record(p) for p in paths}


def marker_problems(root: Path, marker: dict, plan_key: str) -> list[str]:
    """Why a marker does not stand for this plan's finished work: written under another plan, or
    its files missing, of another size, or of other content; [] when it holds. Content is hashed
    only for a file whose modification time moved (a copy that kept the bytes is fine), so
    checking a finished stage costs a stat per file."""
    if marker.get("plan_key") != plan_key:
        return [f"its marker was written under another plan ({marker.get('plan_key')}, now {plan_key})"]
    if "outputs" not in marker:
        return ["the marker lists no files (written by an older version)"]
    problems = []
    for rel, record in marker["outputs"].items():
        path = Path(root) / rel
        try:
            st = path.stat()
        except FileNotFoundError:
            problems.append(f"{path} is missing")
            continue
        if st.st_size != record["bytes"]:
            problems.append(f"{path} is {st.st_size} bytes, {record['bytes']} when written")
        elif st.st_mtime_ns != record["mtime_ns"] and file_sha256(path) != record["sha256"]:
            problems.append(f"{path} has other content than when written (its checksum differs)")
    return problems


def read_verified(root: Path, marker: dict, rel: str, fix: str) -> bytes:
    """A file a marker lists, whole, after checking its size and checksum; else OutputChanged
    naming the file and `fix` (which stage to run)."""
    path, record = Path(root) / rel, marker.get("outputs", {}).get(rel)
    if record is None:
        raise OutputChanged(f"{path} is not among the files its shard's marker lists; {fix}")
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise OutputChanged(f"{path} is missing since its shard was written; {fix}") from None
    if len(data) != record["bytes"] or hashlib.sha256(data).hexdigest() != record["sha256"]:
        raise OutputChanged(
            f"{path} changed since its shard was written ({len(data)} bytes, {record['bytes']} then; "
            f"the checksum differs); {fix}"
        )
    return data


def read_verified_parquet(root: Path, marker: dict, path: Path, fix: str, columns: list[str] | None = None) -> pa.Table:
    return pq.read_table(
        pa.BufferReader(read_verified(root, marker, str(Path(path).relative_to(root)), fix)), columns=columns
    )


def read_verified_npz(root: Path, marker: dict, path: Path, fix: str) -> dict[str, np.ndarray]:
    data = read_verified(root, marker, str(Path(path).relative_to(root)), fix)
    with np.load(io.BytesIO(data), allow_pickle=False) as npz:
        return {k: npz[k] for k in npz.files}


def content_key(markers: dict[str, dict]) -> str:
    """A stage's results as a short hash of their content: every file its markers list (path relative to
    the output dir, size, SHA-256), never when it was written (`mtime_ns`, `images_written_at`), so
    byte-identical results written again, or copied, have the same key. What a later stage was made from."""
    files = {
        shard: {rel: [record["bytes"], record["sha256"]] for rel, record in (marker.get("outputs") or {}).items()}
        for shard, marker in markers.items()
    }
    return hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()[:16]


def marker_path(stage_dir: Path, shard: str) -> Path:
    return stage_dir / DONE_DIR / f"{shard}.json"


def mark_done(stage_dir: Path, shard: str, summary: dict) -> None:
    write_json_atomic(summary, marker_path(stage_dir, shard))


def read_json(path: Path):
    """A small JSON record, or None where it is missing or damaged (it is written whole, so it was damaged since)."""
    try:
        return json.loads(Path(path).read_text())
    except (FileNotFoundError, ValueError):
        return None


def read_done(stage_dir: Path) -> dict[str, dict]:
    """shard name -> its completion summary. A marker that does not parse (it is written whole, so
    it was damaged since) is deleted, and its shard is done again."""
    done = {}
    for path in sorted((stage_dir / DONE_DIR).glob("shard-*.json")):
        try:
            done[path.stem] = json.loads(path.read_text())
        except ValueError:
            log.warning("%s is damaged; deleting it, its shard runs again", path)
            path.unlink()
    return done
