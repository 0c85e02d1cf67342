"""Apply stage actor: a saved fit labels unlabelled images (local folder or object store).

Per image: dense features, nearest centroid of every pixel, the fit's cluster -> class mapping,
things by connected components; writes the Cityscapes-format pseudo-labels and keeps the image's
cluster histogram (pixels per cluster), e.g. for mining rare clusters across millions of frames.
"""

from pathlib import Path

import numpy as np
import pyarrow as pa
import ray

from actors.model_setup import build_dense_extractor
from actors.shard_actor import ShardActor
from configs.schema import parse_config
from core.labelling import PixelAssigner, clusters_to_train_ids
from core.panoptic import panoptic_from_train_ids
from storage.cityscapes_outputs import prediction_paths, write_image_predictions
from storage.images import InputError, read_rgb
from storage.shards import mark_done, shard_records, write_json_atomic, write_parquet_atomic


def histogram_schema(k: int) -> pa.Schema:
    return pa.schema([("image_id", pa.string()), ("source", pa.string()),
                      ("height", pa.int32()), ("width", pa.int32()),
                      ("cluster_pixels", pa.list_(pa.int64(), k))])


class PseudoLabeler(ShardActor):
    """Ray Data actor; `fit` is an ObjectRef to {"name", "centroids", "mapping"}."""

    def __init__(self, config: dict, fit, stage_dir: str, labels_dir: str):
        self.cfg = parse_config(config, "apply actor config")
        self.fit = ray.get(fit) if isinstance(fit, ray.ObjectRef) else fit
        self.stage_dir, self.labels_dir = Path(stage_dir), Path(labels_dir)
        self.dense = build_dense_extractor(self.cfg, self.cfg.label_workers)
        self.assigner = PixelAssigner([self.fit["centroids"]], device=self.dense.device)
        self.k = len(self.fit["mapping"])

    def process_shard(self, shard: str, shard_row: dict) -> None:
        rows = {name: [] for name in histogram_schema(self.k).names}
        annotations, failed = [], []
        pan = self.cfg.panoptic
        for record in shard_records(shard_row):
            try:
                # names from data: an unsafe one is this image's failure
                prediction_paths(self.labels_dir, record.group, record.image_id, self.cfg.dataset.split)
                image = read_rgb(record.image_path)
            except InputError as err:
                failed.append({"image_id": record.image_id, "path": record.image_path, "stage": "apply", "error": str(err)})
                continue
            grids = self.dense.at_scales(image, self.cfg.inference.scales)
            (cluster_map,), _ = self.assigner.assign(grids, self.dense.patch, image.shape[:2])
            train_ids = clusters_to_train_ids(cluster_map, self.fit["mapping"])
            panoptic = panoptic_from_train_ids(train_ids, None, min_area=pan.thing_min_area,
                                               stuff_min_area=pan.stuff_min_area, connectivity=pan.connectivity)
            annotations.append(write_image_predictions(self.labels_dir, record.group, record.image_id, train_ids, panoptic,
                                                       split=self.cfg.dataset.split))
            for name, value in (("image_id", record.image_id), ("source", record.image_path),
                                ("height", image.shape[0]), ("width", image.shape[1]),
                                ("cluster_pixels", np.bincount(cluster_map.ravel(), minlength=self.k).tolist())):
                rows[name].append(value)
        write_parquet_atomic(pa.table(rows, schema=histogram_schema(self.k)), self.stage_dir / f"{shard}.parquet")
        write_json_atomic(annotations, self.stage_dir / "_panoptic" / f"{shard}.json")
        mark_done(self.stage_dir, shard, {"num_images": len(rows["image_id"]), "failed": failed})
