"""Label-and-score stage: per image, dense features once, then the nearest centroid of every pixel
for every fit (k sweep + baseline). Per shard it keeps, for each fit, the (cluster, class) pixel
counts per cross-validation fold and the cluster win counts: enough to score any mapping
protocol in the driver. Pseudo-label PNGs are written for the main fit."""

from pathlib import Path

import numpy as np
import ray

from actors.model_setup import build_dense_extractor
from configs.schema import parse_config
from core.dense import resized_size
from core.labelling import PixelAssigner, cluster_class_pixel_counts, clusters_to_train_ids
from core.labels import NUM_CLASSES, colorize_train_ids, train_ids_to_label_ids
from core.sampling import image_fold
from storage.images import InputError, read_rgb, read_train_ids, safe_path, write_png_atomic
from storage.shards import mark_done, marker_path, shard_records, write_npz_atomic


class LabelScorer:
    """Ray Data actor. `fits` is an ObjectRef (put once by the driver) to a list of
    {"name", "centroids", "mapping"}; the first one is the main fit whose labels are written."""

    def __init__(self, config: dict, fits, stage_dir: str, labels_dir: str, overlay_ids: list[str]):
        self.cfg = parse_config(config, "label actor config")
        self.fits = ray.get(fits) if isinstance(fits, ray.ObjectRef) else fits  # refs in constructor args arrive undereferenced
        self.stage_dir, self.labels_dir = Path(stage_dir), Path(labels_dir)
        self.overlay_ids = set(overlay_ids)
        self.dense = build_dense_extractor(self.cfg, self.cfg.label_workers)
        self.assigner = PixelAssigner([f["centroids"] for f in self.fits])

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        shards = list(batch["shard"])
        for shard, records in zip(shards, batch["records"]):
            if not marker_path(self.stage_dir, shard).exists():
                self._score_shard(shard, {"shard": shard, "records": records})
        return {"shard": shards}

    def _score_shard(self, shard: str, shard_row: dict) -> None:
        folds, seed = self.cfg.fit.heldout_folds, self.cfg.seed
        image_ids, failed = [], []
        wins = [np.zeros(len(f["mapping"]), np.int64) for f in self.fits]
        pixel_counts = [np.zeros((folds, len(f["mapping"]), NUM_CLASSES), np.int64) for f in self.fits]
        for record in shard_records(shard_row):
            try:
                image = read_rgb(Path(record.image_path))
                gt = read_train_ids(Path(record.label_ids_path), image.shape[:2]) if record.label_ids_path else None
                cluster_maps = self._assign(image)
                if self.cfg.label.write_label_pngs:
                    self._write_outputs(record, image, clusters_to_train_ids(cluster_maps[0], self.fits[0]["mapping"]))
            except InputError as err:
                failed.append({"image_id": record.image_id, "path": record.image_path, "stage": "label", "error": str(err)})
                continue
            image_ids.append(record.image_id)
            fold = image_fold(record.image_id, folds, seed)
            for i, cluster_map in enumerate(cluster_maps):
                k = len(wins[i])
                wins[i] += np.bincount(cluster_map.ravel(), minlength=k)
                if gt is not None:
                    pixel_counts[i][fold] += cluster_class_pixel_counts(cluster_map, gt, k, NUM_CLASSES)
        arrays = {"image_ids": np.array(image_ids, dtype=np.str_)}
        for f, w, c in zip(self.fits, wins, pixel_counts):
            arrays[f"wins_{f['name']}"] = w
            arrays[f"pixel_counts_{f['name']}"] = c
        write_npz_atomic(arrays, self.stage_dir / f"{shard}.npz")
        mark_done(self.stage_dir, shard, {"num_images": len(image_ids), "failed": failed})

    def _assign(self, image: np.ndarray) -> list[np.ndarray]:
        """Nearest centroid of every pixel, one (H, W) map per fit; scores averaged over scales."""
        h, w = image.shape[:2]
        grids = []
        for scale in self.cfg.inference.scales:
            short = max(self.dense.patch, round(self.cfg.inference.short_side * scale))
            (features,) = self.dense([image], short_side=short)
            grids.append((features, resized_size(h, w, short)))
        return self.assigner.assign(grids, self.dense.patch, (h, w))

    def _write_outputs(self, record, image: np.ndarray, train_ids: np.ndarray) -> None:
        group = safe_path(self.labels_dir, record.group)
        write_png_atomic(train_ids, safe_path(group, f"{record.image_id}_pseudo_trainIds.png"))
        write_png_atomic(train_ids_to_label_ids(train_ids), safe_path(group, f"{record.image_id}_pseudo_labelIds.png"))
        if record.image_id in self.overlay_ids:
            overlay = (0.5 * image + 0.5 * colorize_train_ids(train_ids)).astype(np.uint8)
            write_png_atomic(overlay, safe_path(group, f"{record.image_id}_pseudo_overlay.png"))
