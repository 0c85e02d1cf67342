"""Extract stage: the images of a shard -> one Parquet file of patch rows + a completion marker."""

from pathlib import Path

import numpy as np

from actors.model_setup import build_dense_extractor
from actors.shard_actor import ShardActor
from configs.schema import parse_config
from core.labels import IGNORE, NUM_CLASSES
from core.metrics import patch_majority_labels
from storage.images import InputError, read_rgb, read_train_ids
from storage.shards import mark_done, patch_schema, patch_table, shard_records, write_parquet_atomic


class FeatureExtractor(ShardActor):
    """Ray Data actor: `__init__` builds the backbone (+ head) once; each call handles a batch of shards."""

    def __init__(self, config: dict, stage_dir: str):
        self.cfg = parse_config(config, "extract actor config")
        self.stage_dir = Path(stage_dir)
        self.dense = build_dense_extractor(self.cfg, self.cfg.extract)
        self.schema = patch_schema(self.dense.model.feature_dim)

    def process_shard(self, shard: str, shard_row: dict) -> None:
        ids, paths, images, labels, failed = [], [], [], [], []
        for record in shard_records(shard_row):
            try:
                image = read_rgb(Path(record.image_path))
                train_ids = read_train_ids(Path(record.label_ids_path), image.shape[:2]) if record.label_ids_path else None
            except InputError as err:
                failed.append({"image_id": record.image_id, "path": record.image_path, "stage": "extract", "error": str(err)})
                continue
            ids.append(record.image_id)
            paths.append(record.image_path)
            images.append(image)
            labels.append(train_ids)
        features = self.dense(images) if images else []
        patch_labels = [
            patch_majority_labels(lab, f.shape[1], f.shape[2], NUM_CLASSES) if lab is not None
            else np.full(f.shape[1:], IGNORE, np.uint8)
            for f, lab in zip(features, labels)
        ]
        bad = [i for i, f in enumerate(features) if not np.isfinite(f).all()]
        for i in reversed(bad):  # NaN/inf features would poison k-means: drop the image, say why
            failed.append({"image_id": ids[i], "path": paths[i], "stage": "extract",
                           "error": f"{ids[i]}: the model produced NaN/inf features; check the checkpoint and inference.precision"})
            del ids[i], features[i], patch_labels[i]
        table = patch_table(ids, features, patch_labels, self.schema)
        write_parquet_atomic(table, self.stage_dir / f"{shard}.parquet")
        mark_done(self.stage_dir, shard, {
            "num_images": len(ids), "num_patches": table.num_rows, "failed": failed,
            "feature_dim": self.dense.model.feature_dim, "model": self.dense.model.description,
        })
