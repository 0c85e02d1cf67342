"""Shared by the cluster-operation tests: a tiny config, one local Ray cluster per module, and the
parts of a run that must not depend on how it was scheduled."""

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import ray

from configs.schema import parse_config

NUM_IMAGES = 12
PATCHES_PER_IMAGE = 8 * 16  # 128x256 -> short side 112 -> 112x224 -> 8x16 patches of 14 px


def tiny_config(data_root, output_dir, images_per_shard=4, num_actors=1, **sections):
    """12 images of 128x256, a random ViT of dim 32 / depth 1, 112 px crops, no refinements."""
    data = {
        "run_name": "tiny",
        "output_dir": str(output_dir),
        "seed": 0,
        "dataset": {"kind": "cityscapes", "root": str(data_root), "split": "val", "images_per_shard": images_per_shard},
        "model": {"vit": {"patch_size": 14, "embed_dim": 32, "depth": 1, "num_heads": 2}, "feature_kind": "backbone"},
        "inference": {"short_side": 112, "crop": 112, "stride": 56, "batch_size": 8},
        "extract": {
            "read": {"num_cpus": 0.25},
            "model": {"num_actors": num_actors, "cpus_per_actor": 0.5, "batch_images": 4},
            "write": {"num_cpus": 0.25},
        },
        "label": {
            "num_overlays": 0,
            "read": {"num_cpus": 0.25},
            "workers": {"num_actors": num_actors, "cpus_per_actor": 0.5},
        },
        "fit": {"k": 16, "k_sweep": [8], "n_iter": 10, "max_patches_per_image": 64},
        "ray": {"local_num_cpus": 2},
        "atlas": {"enabled": False},  # tests/test_atlas.py turns it on
    }
    for section, values in sections.items():
        data[section] = {**data.get(section, {}), **values} if isinstance(values, dict) else values
    return parse_config(data)


def own_ray_cluster() -> None:
    """Called by a module fixture before it starts a cluster of its own settings: the shared one
    (`tests/conftest.py`'s ray_cluster) may still run."""
    if ray.is_initialized():
        ray.shutdown()


def copy_run(cfg, tmp_path: Path, **sections):
    """A finished run copied to tmp_path/out, and its config pointing there (with `sections` changed)."""
    out = Path(tmp_path) / "out"
    shutil.copytree(cfg.output_dir, out)
    data = cfg.model_dump(mode="json")
    data["output_dir"] = str(out)
    for section, values in sections.items():
        data[section] = {**data[section], **values}
    return parse_config(data)


def centroid_bytes(output_dir: Path) -> dict[str, str]:
    """fit name -> sha256 of its centroids.npy."""
    return {
        p.parent.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(Path(output_dir).glob("fits/*/centroids.npy"))
    }


def _without_timings(obj):
    if isinstance(obj, dict):
        # fitted_on / mapped_on: provenance (content keys and shard counts differ with the shard layout)
        return {
            k: _without_timings(v)
            for k, v in obj.items()
            if "seconds" not in k and k not in ("timing", "fitted_on", "mapped_on")
        }
    if isinstance(obj, list):
        return [_without_timings(v) for v in obj]
    return obj


def report_metrics(output_dir: Path) -> dict:
    """report.json without wall-clock timings and output paths: what two equal runs must share."""
    report = json.loads((Path(output_dir) / "report.json").read_text())
    keep = ("dataset", "fits", "variants", "protocol_sensitivity", "baseline_missed", "absorption", "failed_items")
    metrics = {k: report[k] for k in keep}
    metrics["dataset"] = {k: v for k, v in metrics["dataset"].items() if k != "root"}
    return _without_timings(metrics)


def feature_ids(output_dir: Path) -> dict[str, int]:
    """image id -> number of patch rows in features/."""
    ids = (
        pq.read_table(Path(output_dir) / "features", columns=["image_id"])
        .column("image_id")
        .to_numpy(zero_copy_only=False)
    )
    uniq, counts = np.unique(ids, return_counts=True)
    return dict(zip(uniq.tolist(), counts.tolist()))


def scored_ids(output_dir: Path) -> list[str]:
    """Every image id in the label stage's per-shard scores, repeats kept."""
    ids = []
    for path in sorted((Path(output_dir) / "scores").glob("shard-*.npz")):
        with np.load(path, allow_pickle=False) as data:
            ids += [str(i) for i in data["image_ids"]]
    return ids


def extract_stage_plan(cfg, records):
    """Record the extract plan of `records` in cfg's features/ (as the stage does) -> the fit's plan arguments."""
    from storage.run.layout import Layout
    from storage.run.plans import check_plan, extract_plan, fit_plan, model_identity

    extract = extract_plan(cfg, records, model_identity(cfg))
    check_plan(Layout(cfg.output_dir).features, extract)
    return fit_plan(cfg, extract), extract


def write_extracted(cfg, tables) -> tuple:
    """Hand-made patch tables (one per shard) as a finished extract stage: Parquet shards, their
    markers and the stage's plan. Returns `run_fit`'s arguments after cfg."""
    import pyarrow.compute as pc

    from storage.datasets import ImageRecord
    from storage.features import feature_path
    from storage.run.atomic import write_json_atomic, write_parquet_atomic
    from storage.run.layout import Layout
    from storage.run.markers import STAGE_COMPLETE, mark_done, output_records
    from storage.run.shards import dataset_fingerprint

    features = Layout(cfg.output_dir).features
    shard_ids = [list(dict.fromkeys(t.column("image_id").to_pylist())) for t in tables]
    records = [ImageRecord(i, "g", f"/hand-made/{i}.png") for ids in shard_ids for i in ids]
    fit, extract = extract_stage_plan(cfg, records)
    names = [f"shard-{n:05d}" for n in range(len(tables))]
    for name, table, ids in zip(names, tables, shard_ids):
        path = feature_path(features, name)
        write_parquet_atomic(table, path)
        mark_done(
            features,
            name,
            {
                "plan_key": extract.key,
                "num_images": len(ids),
                "image_ids": ids,
                "failed": [],
                "num_patches": table.num_rows,
                "labelled_patches": int(pc.sum(pc.not_equal(table["label"], 255)).as_py() or 0),
                "outputs": output_records(Path(cfg.output_dir), [path]),
            },
        )
    write_json_atomic({"plan_key": extract.key, "shards": names}, features / STAGE_COMPLETE)
    return fit, extract, names, dataset_fingerprint(records, "/hand-made")


def one_colour_png(width: int, height: int) -> bytes:
    """A valid PNG of one colour (1-bit palette), written chunk by chunk: a 14000x14000 one is a few
    tens of kB, a 1x100000 one a few hundred bytes, and neither is ever held decoded here."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    row = bytes(1 + (width + 7) // 8)  # filter byte 0, then the row's bits: palette entry 0
    deflate = zlib.compressobj(9)
    idat = b"".join(deflate.compress(row) for _ in range(height)) + deflate.flush()
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 1, 3, 0, 0, 0))
        + chunk(b"PLTE", bytes([90, 140, 60]))
        + chunk(b"IDAT", idat)
        + chunk(b"IEND", b"")
    )
