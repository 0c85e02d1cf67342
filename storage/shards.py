"""Shards of work, their Arrow/Parquet outputs, and the completion markers that make re-runs resume.

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
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from core.errors import UserError
from storage.datasets import ImageRecord

DONE_DIR = "_done"
STAGE_COMPLETE = "_complete.json"  # a stage folder's record that every shard it planned is done: {"plan_key", "shards"}
log = logging.getLogger(__name__)


def plan_shards(records: list[ImageRecord], images_per_shard: int) -> list[dict]:
    """Consecutive slices of the sorted records -> [{"shard": "shard-00000", "records": "<json>"}]."""
    return [
        {"shard": f"shard-{i // images_per_shard:05d}",
         "records": json.dumps([r.to_dict() for r in records[i:i + images_per_shard]])}
        for i in range(0, len(records), images_per_shard)
    ]


def restrict_shards(shards: list[dict], keep_ids: set[str]) -> list[dict]:
    """The same shards (names and order) holding only the records whose id is in `keep_ids`."""
    return [{"shard": s["shard"], "records": json.dumps([r.to_dict() for r in shard_records(s) if r.image_id in keep_ids])}
            for s in shards]


def shard_records(shard_row: dict) -> list[ImageRecord]:
    return [ImageRecord(**d) for d in json.loads(shard_row["records"])]


def dataset_fingerprint(records: list[ImageRecord], root: Path | str) -> str:
    """Identifies the image set: ids, files (relative to the dataset's root), and their sizes and
    modification times (`stamp`), so an image replaced under the same name is a different dataset,
    while the same folder spelt another way (relative, absolute, mounted elsewhere) is the same."""
    prefix = (str(root) if "://" in str(root) else str(Path(root))).rstrip("/") + "/"  # as the listing spells it

    def within(path: str | None) -> str | None:
        return path[len(prefix):] if path is not None and path.startswith(prefix) else path

    digest = hashlib.sha256()
    for r in records:
        digest.update(f"{r.image_id}\t{within(r.image_path)}\t{within(r.label_ids_path)}\t{within(r.instance_ids_path)}"
                      f"\t{r.stamp}\n".encode())
    return digest.hexdigest()[:16]


# Bumped when the patch rows, their markers or their plan change (2: image height and width, other scales in
# _scales/): a features folder of another format is then refused by the plan check rather than misread.
PATCH_FORMAT = 4  # 3: markers list their files with sizes and checksums; 4: the dataset fingerprint is root-relative


def patch_schema(feature_dim: int, feature_dtype: str = "float16") -> pa.Schema:
    """One row per patch. float16 halves the bytes; k-means runs on float32 copies."""
    return pa.schema([
        ("image_id", pa.string()),
        ("row", pa.int16()),
        ("col", pa.int16()),
        ("feature", pa.list_(pa.float16() if feature_dtype == "float16" else pa.float32(), feature_dim)),
        ("label", pa.uint8()),  # patch majority trainId, 255 = ignore / unlabelled
        ("height", pa.uint16()),  # the image's size, which places the grid on its pixels (constant per image)
        ("width", pa.uint16()),
    ])


def patch_table(image_ids: list[str], features: list[np.ndarray], labels: list[np.ndarray], schema: pa.Schema,
                image_sizes: list[tuple[int, int]]) -> pa.Table:
    """Per image (D, h, w) features, (h, w) labels and its (H, W) -> one Arrow table of patch rows, row-major."""
    value_type = schema.field("feature").type.value_type.to_pandas_dtype()
    feature_dim = schema.field("feature").type.list_size
    ids, rows, cols, flat, labs, heights, widths = [], [], [], [], [], [], []
    for image_id, feat, lab, (height, width) in zip(image_ids, features, labels, image_sizes):
        d, h, w = feat.shape
        rr, cc = np.meshgrid(np.arange(h, dtype=np.int16), np.arange(w, dtype=np.int16), indexing="ij")
        ids.extend([image_id] * (h * w))
        rows.append(rr.ravel())
        cols.append(cc.ravel())
        flat.append(feat.reshape(d, h * w).T.astype(value_type).ravel())
        labs.append(lab.ravel().astype(np.uint8))
        heights.append(np.full(h * w, height, np.uint16))
        widths.append(np.full(h * w, width, np.uint16))
    if not ids:
        return schema.empty_table()
    values = pa.array(np.concatenate(flat))
    return pa.table({
        "image_id": pa.array(ids, pa.string()),
        "row": pa.array(np.concatenate(rows)),
        "col": pa.array(np.concatenate(cols)),
        "feature": pa.FixedSizeListArray.from_arrays(values, feature_dim),
        "label": pa.array(np.concatenate(labs)),
        "height": pa.array(np.concatenate(heights)),
        "width": pa.array(np.concatenate(widths)),
    }, schema=schema)


def image_grids(table: pa.Table) -> dict[str, tuple[np.ndarray, tuple[int, int]]]:
    """A features table -> per image (features (D, gh, gw) float32, image (H, W)); rows of an image
    are consecutive and row-major, as `patch_table` writes them."""
    ids = table.column("image_id").to_numpy(zero_copy_only=False)
    if not len(ids):
        return {}
    starts = np.flatnonzero(np.r_[True, ids[1:] != ids[:-1]])
    ends = np.r_[starts[1:], len(ids)]
    feats = features_from_table(table)
    rows, cols = table.column("row").to_numpy(), table.column("col").to_numpy()
    heights, widths = table.column("height").to_numpy(), table.column("width").to_numpy()
    grids = {}
    for a, b in zip(starts, ends):
        gh, gw = int(rows[b - 1]) + 1, int(cols[b - 1]) + 1
        grids[str(ids[a])] = (np.ascontiguousarray(feats[a:b].reshape(gh, gw, -1).transpose(2, 0, 1)),
                              (int(heights[a]), int(widths[a])))
    return grids


def feature_path(features_dir: Path, shard: str, scale: float = 1.0) -> Path:
    """A shard's patch rows at one inference scale: scale 1 (the one the fit uses) at the top level,
    others in `_scales/<s>/`, which dataset readers skip (a leading '_'), so `features/` read as one
    Parquet dataset holds scale 1 only."""
    folder = Path(features_dir) if scale == 1.0 else Path(features_dir) / "_scales" / f"{scale:g}"
    return folder / f"{shard}.parquet"


def window_path(features_dir: Path, shard: str) -> Path:
    """A shard's window features (the seed protocol's: each image's base-scale windows side by side,
    then the seed baseline's own windows where they differ from them)."""
    return Path(features_dir) / "_windows" / f"{shard}.parquet"


def backbone_path(features_dir: Path, shard: str) -> Path:
    """A shard's raw backbone patch features beside the head's (model.compare_backbone), base scale."""
    return Path(features_dir) / "_backbone" / f"{shard}.parquet"


def cause_path(features_dir: Path, shard: str) -> Path:
    """A shard's features of CAUSE's one 322 centre-crop window per image (the cause protocol's):
    its unflipped pass and its flip-averaged pass side by side, (D, g, 2g) per image."""
    return Path(features_dir) / "_cause" / f"{shard}.parquet"


def features_from_table(table: pa.Table) -> np.ndarray:
    """The `feature` column as an (n, D) float32 array, without a per-row Python loop."""
    column = table.column("feature").combine_chunks()
    dim = column.type.list_size
    return column.flatten().to_numpy(zero_copy_only=False).astype(np.float32).reshape(-1, dim)


def write_parquet_atomic(table: pa.Table, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    pq.write_table(table, tmp)
    os.replace(tmp, path)


def write_text_atomic(text: str, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_json_atomic(obj, path: Path) -> None:
    write_text_atomic(json.dumps(obj, indent=2), path)


def write_npz_atomic(arrays: dict[str, np.ndarray], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}.npz")
    np.savez(tmp, **arrays)
    os.replace(tmp, path)


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
        raise OutputChanged(f"{path} changed since its shard was written ({len(data)} bytes, {record['bytes']} then; "
                            f"the checksum differs); {fix}")
    return data


def read_verified_parquet(root: Path, marker: dict, path: Path, fix: str, columns: list[str] | None = None) -> pa.Table:
    return pq.read_table(pa.BufferReader(read_verified(root, marker, str(Path(path).relative_to(root)), fix)), columns=columns)


def read_verified_npz(root: Path, marker: dict, path: Path, fix: str) -> dict[str, np.ndarray]:
    data = read_verified(root, marker, str(Path(path).relative_to(root)), fix)
    with np.load(io.BytesIO(data), allow_pickle=False) as npz:
        return {k: npz[k] for k in npz.files}


def content_key(markers: dict[str, dict]) -> str:
    """A stage's results as a short hash of their content: every file its markers list (path relative to
    the output dir, size, SHA-256), never when it was written (`mtime_ns`, `images_written_at`), so
    byte-identical results written again, or copied, have the same key. What a later stage was made from."""
    files = {shard: {rel: [record["bytes"], record["sha256"]] for rel, record in (marker.get("outputs") or {}).items()}
             for shard, marker in markers.items()}
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
