"""Per-image parts: how image-level streaming keeps shard-level outputs exactly once.

The stages stream images, not shards, so a shard's images finish on different workers at
different times. Each image's result is written, atomically, as one part
`<stage_dir>/_parts/<shard>/<image_id>.npz`; when the driver has seen every image of a shard
come out of the stream it assembles the parts into the shard's output (renamed into place),
writes the shard's marker and removes the parts. A retried or repeated image rewrites its own
part with the same content; a re-run after a crash skips shards with a marker, and within the
others every image whose part is already there.
"""

import json
import logging
import os
import shutil
from pathlib import Path

import numpy as np

from storage.images import safe_path
from storage.run.markers import mark_done, output_records
from storage.run.shards import shard_records

PARTS_DIR = "_parts"
log = logging.getLogger(__name__)


def part_path(stage_dir: Path, shard: str, image_id: str) -> Path:
    return safe_path(Path(stage_dir) / PARTS_DIR, shard, f"{image_id}.npz")


def write_part(
    stage_dir: Path, shard: str, image_id: str, arrays: dict[str, np.ndarray], meta: dict, plan_key: str
) -> None:
    """One image's arrays (+ a JSON-able `meta`) -> its part, via a temporary file renamed into
    place. The part carries the stage's plan key: a worker of an earlier run that outlived its
    driver can still write, but its parts are never taken for this plan's."""
    path = part_path(stage_dir, shard, image_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}.npz")
    np.savez(tmp, **arrays, _meta=np.array(json.dumps(meta)), _plan=np.array(plan_key))
    os.replace(tmp, path)


def read_part(stage_dir: Path, shard: str, image_id: str) -> tuple[dict[str, np.ndarray], dict, str]:
    """(arrays, meta, plan key) of one part."""
    with np.load(part_path(stage_dir, shard, image_id), allow_pickle=False) as data:
        arrays = {k: data[k] for k in data.files if k not in ("_meta", "_plan")}
        return arrays, json.loads(str(data["_meta"])), str(data["_plan"])


def read_shard_parts(
    stage_dir: Path, shard_row: dict, written: list[str], plan_key: str
) -> tuple[list[str], list[tuple[dict, dict]], list[float]]:
    """The written images of a shard in shard order, their parts, and when each part was written."""
    keep = set(written)
    order = [r.image_id for r in shard_records(shard_row) if r.image_id in keep]
    paths = [part_path(stage_dir, shard_row["shard"], image_id) for image_id in order]
    parts = []
    for image_id, path in zip(order, paths):
        arrays, meta, part_plan = read_part(stage_dir, shard_row["shard"], image_id)
        if part_plan != plan_key:
            raise RuntimeError(
                f"{path} was written under plan {part_plan}, not {plan_key} (a worker of another run); "
                "run the stage again: it redoes that image"
            )
        parts.append((arrays, meta))
    return order, parts, [p.stat().st_mtime for p in paths]


def complete_shard(
    stage_dir: Path,
    shard: str,
    order: list[str],
    written_at: list[float],
    failed: list[dict],
    outputs: list[Path],
    plan_key: str,
    **summary,
) -> None:
    """The marker (after the shard's outputs are in place, each listed with its size and
    checksum), then the parts go."""
    stage_dir = Path(stage_dir)
    mark_done(
        stage_dir,
        shard,
        {
            "plan_key": plan_key,
            "num_images": len(order),
            "image_ids": order,
            "failed": failed,
            "images_written_at": written_at,
            "outputs": output_records(stage_dir.parent, outputs),
            **summary,
        },
    )
    clear_parts(stage_dir, shard)


def staged_ids(stage_dir: Path, shard: str, plan_key: str) -> set[str]:
    """Image ids of the shard whose part is complete and of this plan (temporary files start with
    '.'). Parts are renamed into place whole, so a part that does not open was damaged since; it
    is deleted (its image runs again) and said so, as is a part of another plan."""
    folder = Path(stage_dir) / PARTS_DIR / shard
    ids = set()
    for path in sorted(folder.glob("*.npz")) if folder.is_dir() else []:
        if path.name.startswith("."):
            continue
        try:
            with np.load(path, allow_pickle=False) as data:
                json.loads(str(data["_meta"]))
                part_plan = str(data["_plan"])
            if part_plan != plan_key:
                log.warning(
                    "%s was written under another plan (%s, now %s); deleting it, its image runs again",
                    path,
                    part_plan,
                    plan_key,
                )
                path.unlink()
                continue
            ids.add(path.stem)
        except Exception as err:  # noqa: BLE001 - any damage: the image is simply done again
            log.warning("%s is damaged (%s: %s); deleting it, its image runs again", path, type(err).__name__, err)
            path.unlink()
    return ids


def clear_parts(stage_dir: Path, shard: str) -> None:
    shutil.rmtree(Path(stage_dir) / PARTS_DIR / shard, ignore_errors=True)
