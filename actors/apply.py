"""The apply stage's steps: extract's `image_windows` and `WindowFeatures`, then

PseudoLabelImages  actor (CPU, or the assignment on CUDA): stitch one image's windows, label it
                   with the saved fit, write its pseudo-labels and its part (cluster histogram,
                   and its features when apply.write_features is set)
finish_apply       per shard, when every image is out: parts -> histogram Parquet (+ features
                   Parquet) + panoptic JSON + marker
"""

from pathlib import Path

import numpy as np
import pyarrow as pa
import ray

from actors.extract import extra_view_arrays, feature_arrays, stitched_grids, write_feature_shards
from actors.model_setup import device_for
from actors.rows import run_on_image, step
from configs.geometry import (
    extracted_scales,
    label_scales,
    pack_windows,
    stored_window_count,
    stores_windows,
    unpack_windows,
)
from configs.schema import RunConfig
from configs.specs import panoptic_rules
from core.evaluation.base import Segmenter
from core.labelling.image import ImageLabeller, LabelFit
from core.labelling.variants import RefineSettings
from core.presets import protocol_steps
from storage.cityscapes_outputs import label_pngs, prediction_paths, write_image_predictions
from storage.run.atomic import write_json_atomic, write_parquet_atomic
from storage.run.parts import complete_shard, read_shard_parts, write_part


def histogram_schema(k: int) -> pa.Schema:
    return pa.schema(
        [
            ("image_id", pa.string()),
            ("source", pa.string()),
            ("height", pa.int32()),
            ("width", pa.int32()),
            ("cluster_pixels", pa.list_(pa.int64(), k)),
        ]
    )


@step(resources="label.workers")
class PseudoLabelImages:
    """Actor; `fit` is an ObjectRef to {"name", "centroids", "mapping"} (put once by the driver), taken
    by `setup`; a call labels one image with it and writes its pseudo-labels and cluster histogram."""

    def __init__(self, cfg: RunConfig, fit, stage_dir: str, labels_dir: str, plan_key: str):
        self.cfg, self.fit_ref = cfg, fit
        self.stage_dir, self.labels_dir, self.plan_key = Path(stage_dir), Path(labels_dir), plan_key

    def setup(self) -> None:
        fit = ray.get(self.fit_ref) if isinstance(self.fit_ref, ray.ObjectRef) else self.fit_ref
        self.fit = LabelFit(fit["name"], fit["centroids"], fit["mapping"])
        self.labeller = ImageLabeller(
            [self.fit],
            ["plain"],
            RefineSettings(),
            device=device_for(self.cfg.label.workers),
            labelling=protocol_steps(self.cfg.protocol).label_resolution,
        )
        self.rules = panoptic_rules(self.cfg)
        order = extracted_scales(self.cfg)
        self.scale_order = [order.index(s) for s in label_scales(self.cfg)]

    def __call__(self, row: dict) -> dict:
        return run_on_image("apply", row, lambda: self._label(row))

    def _label(self, row: dict) -> None:
        image_id, group = row["image_id"], row["group"]
        prediction_paths(self.labels_dir, group, image_id, self.cfg.dataset.split)  # names from data
        # rounded as stored, so a saved fit labels an image here exactly as the label stage does
        grids = [(f.astype(np.float16).astype(np.float32), r) for f, r in stitched_grids(row, self.cfg)]
        hw = (int(row["height"]), int(row["width"]))
        extra = self.cfg.apply.write_features  # the paper baseline's windows are cut only to be written
        packed = (
            pack_windows(row["window_features"], stored_window_count(self.cfg, row, paper_scales=extra))
            if stores_windows(self.cfg)
            else None
        )
        labels = self.labeller.label(
            [grids[i] for i in self.scale_order],
            self.cfg.model.vit.patch_size,
            hw,
            windows=None if packed is None else unpack_windows(self.cfg, packed, hw, paper_scales=extra),
        )
        written, cluster_map = labels.variant("plain"), labels.clusters[self.fit.name]
        annotation = write_image_predictions(
            self.labels_dir,
            group,
            image_id,
            written.train_ids,
            Segmenter(self.rules)(written),
            split=self.cfg.dataset.split,
        )
        arrays = {"cluster_pixels": np.bincount(cluster_map.ravel(), minlength=len(self.fit.mapping))}
        if self.cfg.apply.write_features:
            arrays |= feature_arrays(self.cfg, grids, None) | extra_view_arrays(self.cfg, row, None)
        write_part(
            self.stage_dir,
            row["shard"],
            image_id,
            arrays,
            {"annotation": annotation, "hw": hw, "source": row["path"], "model": str(row["model"])},
            self.plan_key,
        )


def finish_apply(
    stage_dir: str,
    shard_row: dict,
    written: list[str],
    failed: list[dict],
    plan_key: str,
    cfg: RunConfig,
    k: int,
    features_dir: str,
    labels_dir: str,
) -> None:
    """The parts of a shard (in shard order) -> histogram Parquet, features Parquet if asked, annotations, marker."""
    stage_dir, shard = Path(stage_dir), shard_row["shard"]
    order, parts, written_at = read_shard_parts(stage_dir, shard_row, written, plan_key)
    columns = {
        "image_id": order,
        "source": [m["source"] for _, m in parts],
        "height": [m["hw"][0] for _, m in parts],
        "width": [m["hw"][1] for _, m in parts],
        "cluster_pixels": [a["cluster_pixels"].tolist() for a, _ in parts],
    }
    outputs = [stage_dir / f"{shard}.parquet", stage_dir / "_panoptic" / f"{shard}.json"]
    write_parquet_atomic(pa.table(columns, schema=histogram_schema(k)), outputs[0])
    summary = {}
    if cfg.apply.write_features:
        paths, summary = write_feature_shards(cfg, Path(features_dir), shard, order, parts)
        outputs += paths
    write_json_atomic([meta["annotation"] for _, meta in parts], outputs[1])
    outputs += label_pngs(Path(labels_dir), shard_row, order, cfg.dataset.split)
    complete_shard(stage_dir, shard, order, written_at, failed, outputs, plan_key, **summary)
