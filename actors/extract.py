"""The extract stage's CPU steps (the model step is `actors.window_features.WindowFeatures`):

  image_windows   CPU task per shard: read + decode each image, resize, cut uint8 windows
  write_features  CPU task per image: stitch windows, patch labels, write the image's part
  finish_features per shard, when every image is out: parts -> Parquet shards + marker

None of them imports torch: their workers start in a fraction of the time.
"""

import json
from pathlib import Path

import numpy as np

from actors.rows import failure_message, run_on_image, step
from configs.geometry import (
    extra_paper_layouts,
    extracted_scales,
    extracted_short_sides,
    feature_dim,
    image_limits,
    pack_windows,
    stored_window_count,
    stores_windows,
    window_spec,
)
from configs.schema import RunConfig
from core.classes import IGNORE, NUM_CLASSES
from core.evaluation.metrics import patch_majority_labels, patch_nearest_labels
from core.inference.paper_windows import paper_scale_windows
from core.inference.windows import ScaleLayout, cause_view, cut_windows, stitch_windows
from core.presets import protocol_steps
from storage.features import backbone_path, cause_path, feature_path, patch_schema, patch_table, window_path
from storage.images import InputError, read_rgb, read_train_ids
from storage.run.atomic import write_parquet_atomic
from storage.run.parts import complete_shard, read_shard_parts, write_part
from storage.run.shards import shard_records


@step(resources="extract.read")
def image_windows(shard_row: dict, cfg: RunConfig, extra_views: bool = True, stage: str = "extract"):
    """One shard row -> one row per image to do: uint8 windows of every extracted scale, then (with
    extra_views: extract, or apply writing features) the paper's baseline windows or CAUSE's crop.
    Each image's size is checked (`configs.geometry.image_limits`) before it is decoded; `stage`
    names the stage in what a failure logs."""
    spec, patch, short_sides = window_spec(cfg), cfg.model.vit.patch_size, extracted_short_sides(cfg)
    limits = image_limits(cfg, extra_views)
    for record in shard_records(shard_row):
        row = {
            "shard": shard_row["shard"],
            "image_id": record.image_id,
            "path": record.image_path,
            "group": record.group,
            "label_ids_path": record.label_ids_path or "",
            "error": "",
            "setup_error": "",
            "windows": np.zeros((0, spec.crop, spec.crop, 3), np.uint8),
            "layouts": "[]",
            "height": 0,
            "width": 0,
        }
        try:
            image = read_rgb(record.image_path, limits)  # a path or an object-store URI
            windows, layouts = cut_windows(image, spec, patch, short_sides)
            extra = extra_paper_layouts(cfg, image.shape[:2]) if extra_views else []
            if extra:  # the paper baseline's windows follow the base scale's
                windows = np.concatenate([windows, paper_scale_windows(image, extra, spec.crop)])
            if (
                protocol_steps(cfg.protocol).cause_crop and extra_views
            ):  # CAUSE's test window goes last, twice (its two test passes)
                windows = np.concatenate(
                    [windows, np.repeat(cause_view(image, spec.short_side, spec.crop)[None], 2, axis=0)]
                )
            row.update(
                windows=windows,
                layouts=json.dumps([lay.to_dict() for lay in layouts]),
                height=image.shape[0],
                width=image.shape[1],
            )
        except Exception as err:  # noqa: BLE001 - one image's failure must not end the stage
            row["error"] = failure_message(stage, record.image_id, err)
        yield row


def stitched_grids(row: dict, cfg, column: str = "window_features") -> list[tuple[np.ndarray, tuple[int, int]]]:
    """A row's window features -> per extracted scale (features (D, gh, gw) float32, resized (h, w));
    column "backbone_window_features": the backbone's, at the base scale only (model.compare_backbone)."""
    spec = window_spec(cfg)
    layouts = [ScaleLayout.from_dict(d) for d in json.loads(row["layouts"])]
    layouts = layouts if column == "window_features" else layouts[:1]
    scale_windows = sum(len(layout.origins) for layout in layouts)  # the paper's or CAUSE's windows may follow them
    grids = stitch_windows(
        row[column][:scale_windows], layouts, spec.crop, spec.stride, cfg.model.vit.patch_size, spec.merge
    )
    if not all(np.isfinite(f).all() for f, _ in grids):  # NaN/inf would poison k-means
        raise InputError(
            f"{row['image_id']}: the model produced NaN/inf features; check the checkpoint and inference.precision"
        )
    return grids


def patch_labels(cfg, train_ids: np.ndarray, grid_hw: tuple[int, int]) -> np.ndarray:
    """The protocol's patch labels: the majority of each patch's pixels, or the paper's NEAREST sample."""
    if protocol_steps(cfg.protocol).patch_labels == "nearest":
        return patch_nearest_labels(train_ids, *grid_hw)
    return patch_majority_labels(train_ids, *grid_hw, NUM_CLASSES)


def feature_arrays(cfg, grids, train_ids: np.ndarray | None) -> dict[str, np.ndarray]:
    """A part's features and patch labels at every extracted scale."""
    arrays = {}
    for scale, (features, _) in zip(extracted_scales(cfg), grids):
        arrays[f"features_{scale:g}"] = features.astype(np.float16)
        arrays[f"labels_{scale:g}"] = (
            patch_labels(cfg, train_ids, features.shape[1:])
            if train_ids is not None
            else np.full(features.shape[1:], IGNORE, np.uint8)
        )
    return arrays


def extra_view_arrays(cfg, row: dict, train_ids: np.ndarray | None) -> dict[str, np.ndarray]:
    """What a protocol keeps beside the patch grids: the paper's windows, CAUSE's crop (+ patch labels);
    and with model.compare_backbone the backbone's base-scale grid."""
    arrays = {}
    if "backbone_window_features" in row:
        arrays["backbone"] = stitched_grids(row, cfg, "backbone_window_features")[0][0].astype(np.float16)
    if stores_windows(cfg):
        arrays["windows"] = pack_windows(row["window_features"], stored_window_count(cfg, row))
    if protocol_steps(cfg.protocol).cause_crop:  # its plain pass, then its flip-averaged one, side by side: (D, g, 2g)
        crops = row["window_features"][-2:].astype(np.float16)
        arrays["cause"] = np.concatenate(list(crops), axis=2)
        labels = (
            patch_majority_labels(
                cause_view(train_ids, cfg.inference.short_side, cfg.inference.crop), *crops.shape[2:], NUM_CLASSES
            )
            if train_ids is not None
            else np.full(crops.shape[2:], IGNORE, np.uint8)
        )
        arrays["cause_labels"] = np.concatenate([labels, labels], axis=1)
    return arrays


@step(resources="extract.write")
def write_features(row: dict, cfg: RunConfig, stage_dir: str, plan_key: str) -> dict:
    """Stitch one image's windows onto each scale's grid, add patch labels, write its part."""
    return run_on_image("extract", row, lambda: _write_features(row, cfg, Path(stage_dir), plan_key))


def _write_features(row: dict, cfg, stage_dir: Path, plan_key: str) -> None:
    grids = stitched_grids(row, cfg)
    hw = (int(row["height"]), int(row["width"]))  # checked against the patch grid as it was read (`image_windows`)
    train_ids = read_train_ids(Path(row["label_ids_path"]), hw) if row["label_ids_path"] else None
    arrays = feature_arrays(cfg, grids, train_ids) | extra_view_arrays(cfg, row, train_ids)
    write_part(stage_dir, row["shard"], row["image_id"], arrays, {"hw": hw, "model": str(row["model"])}, plan_key)


def write_feature_shards(
    cfg, features_dir: Path, shard: str, order: list[str], parts: list[tuple[dict, dict]]
) -> tuple[list[Path], dict]:
    """Parts (in shard order) -> one Parquet file of patch rows per extracted scale; returns the
    files and what the marker records."""
    tables, paths = [], []
    hws = [tuple(meta["hw"]) for _, meta in parts]
    for scale in extracted_scales(
        cfg
    ):  # a shard whose every image failed still gets its (empty) files, of the model's width
        tables.append(
            patch_table(
                order,
                [arrays[f"features_{scale:g}"] for arrays, _ in parts],
                [arrays[f"labels_{scale:g}"] for arrays, _ in parts],
                patch_schema(feature_dim(cfg)),
                hws,
            )
        )
        paths.append(feature_path(features_dir, shard, scale))
        write_parquet_atomic(tables[-1], paths[-1])
    if stores_windows(cfg):
        windows = [arrays["windows"] for arrays, _ in parts]
        table = patch_table(
            order,
            windows,
            [np.full(w.shape[1:], IGNORE, np.uint8) for w in windows],
            patch_schema(feature_dim(cfg)),
            hws,
        )
        paths.append(window_path(features_dir, shard))
        write_parquet_atomic(table, paths[-1])
    if protocol_steps(cfg.protocol).cause_crop:
        table = patch_table(
            order,
            [arrays["cause"] for arrays, _ in parts],
            [arrays["cause_labels"] for arrays, _ in parts],
            patch_schema(feature_dim(cfg)),
            hws,
        )
        paths.append(cause_path(features_dir, shard))
        write_parquet_atomic(table, paths[-1])
    if cfg.model.compare_backbone and all(
        "backbone" in arrays for arrays, _ in parts
    ):  # not in apply, which runs no backbone pass
        table = patch_table(
            order,
            [arrays["backbone"] for arrays, _ in parts],
            [arrays["labels_1"] for arrays, _ in parts],
            patch_schema(cfg.model.vit.embed_dim),
            hws,
        )
        paths.append(backbone_path(features_dir, shard))
        write_parquet_atomic(table, paths[-1])
    labels = tables[0].column("label").to_numpy()
    return paths, {
        "num_patches": tables[0].num_rows,
        "labelled_patches": int((labels != IGNORE).sum()),
        "feature_dim": feature_dim(cfg),
        "model": parts[0][1]["model"] if parts else None,
    }


def finish_features(
    stage_dir: str, shard_row: dict, written: list[str], failed: list[dict], plan_key: str, cfg: RunConfig
) -> None:
    """The parts of a shard (in shard order) -> its Parquet files, then the marker, then no parts."""
    stage_dir, shard = Path(stage_dir), shard_row["shard"]
    order, parts, written_at = read_shard_parts(stage_dir, shard_row, written, plan_key)
    paths, summary = write_feature_shards(cfg, stage_dir, shard, order, parts)
    complete_shard(stage_dir, shard, order, written_at, failed, paths, plan_key, **summary)
