"""The label stage's first step: a shard's extracted features (every label scale) -> one row per
image. A CPU task that imports no torch."""

import json
from pathlib import Path

import numpy as np

from actors.rows import step
from configs.geometry import label_scales, stores_windows
from configs.schema import RunConfig
from core.presets import protocol_steps
from storage.features import cause_path, feature_path, image_grids, window_path
from storage.run.markers import marker_path, read_verified_parquet
from storage.run.shards import shard_records


@step(resources="label.read")
def image_features(shard_row: dict, cfg: RunConfig, features_dir: str):
    """One shard row -> one row per image to do, with its features at every label scale (each file
    checked against extract's marker: a changed one stops the stage, naming it)."""
    features_dir = Path(features_dir)
    marker = json.loads(marker_path(features_dir, shard_row["shard"]).read_text())
    fix = "run `python submit.py extract` with this config (it redoes that shard), then label"
    tables = [
        read_verified_parquet(features_dir.parent, marker, feature_path(features_dir, shard_row["shard"], s), fix)
        for s in label_scales(cfg)
    ]
    if stores_windows(cfg):  # the paper protocol's windows, for its pixel labels
        path = window_path(features_dir, shard_row["shard"])
        tables.append(read_verified_parquet(features_dir.parent, marker, path, fix))
    if protocol_steps(cfg.protocol).cause_crop:  # CAUSE's crop, for the baseline's cause scores
        tables.append(
            read_verified_parquet(features_dir.parent, marker, cause_path(features_dir, shard_row["shard"]), fix)
        )
    grids = [image_grids(t) for t in tables]
    columns = (
        [f"grid_{i}" for i in range(len(label_scales(cfg)))]
        + (["grid_windows"] if stores_windows(cfg) else [])
        + (["grid_cause"] if protocol_steps(cfg.protocol).cause_crop else [])
    )
    for record in shard_records(shard_row):
        row = {
            "shard": shard_row["shard"],
            "image_id": record.image_id,
            "path": record.image_path,
            "error": "",
            "setup_error": "",
            "group": record.group,
            "label_ids_path": record.label_ids_path or "",
            "instance_ids_path": record.instance_ids_path or "",
            "height": 0,
            "width": 0,
        }
        if not all(record.image_id in g for g in grids):
            yield (
                row
                | {name: np.zeros((0, 1, 1), np.float16) for name in columns}
                | {  # same columns, one rank
                    "error": f"{record.image_id}: no features in "
                    f"{feature_path(Path(features_dir), shard_row['shard'])} "
                    "(or a scale's file beside it); run the extract stage again on a new output_dir"
                }
            )
            continue
        row["height"], row["width"] = grids[0][record.image_id][1]
        yield row | {name: g[record.image_id][0].astype(np.float16) for name, g in zip(columns, grids)}
