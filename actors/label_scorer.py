"""Label-and-score stage: per image, dense features once, then every fit (k sweep + baseline):
pseudo-labels, per-image confusion matrices and cluster win counts; PNGs for the main fit."""

from pathlib import Path

import numpy as np
import ray

from actors.model_setup import build_dense_extractor
from configs.schema import parse_config
from core.dense import resized_size
from core.labelling import class_logit_grid, logits_to_train_ids, upsample_logits
from core.labels import NUM_CLASSES, colorize_train_ids, train_ids_to_label_ids
from core.metrics import confusion_matrix
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

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        shards = list(batch["shard"])
        for shard, records in zip(shards, batch["records"]):
            if not marker_path(self.stage_dir, shard).exists():
                self._score_shard(shard, {"shard": shard, "records": records})
        return {"shard": shards}

    def _score_shard(self, shard: str, shard_row: dict) -> None:
        n_fits = len(self.fits)
        image_ids, failed = [], []
        confusions = []  # per image: (n_fits, C, C+1)
        wins = [np.zeros(len(f["mapping"]), np.int64) for f in self.fits]
        for record in shard_records(shard_row):
            try:
                image = read_rgb(Path(record.image_path))
                gt = read_train_ids(Path(record.label_ids_path), image.shape[:2]) if record.label_ids_path else None
                predictions = self._predict(image, wins)
                if self.cfg.label.write_label_pngs:
                    self._write_outputs(record, image, predictions[0])
            except InputError as err:
                failed.append({"image_id": record.image_id, "path": record.image_path, "stage": "label", "error": str(err)})
                continue
            image_ids.append(record.image_id)
            conf = np.zeros((n_fits, NUM_CLASSES, NUM_CLASSES + 1), np.int64)
            if gt is not None:
                for i, pred in enumerate(predictions):
                    conf[i] = confusion_matrix(gt, pred, NUM_CLASSES)
            confusions.append(conf)
        arrays = {
            "image_ids": np.array(image_ids, dtype=np.str_),
            "confusion": np.stack(confusions) if confusions else np.zeros((0, n_fits, NUM_CLASSES, NUM_CLASSES + 1), np.int64),
        }
        arrays.update({f"wins_{f['name']}": w for f, w in zip(self.fits, wins)})
        write_npz_atomic(arrays, self.stage_dir / f"{shard}.npz")
        mark_done(self.stage_dir, shard, {"num_images": len(image_ids), "failed": failed})

    def _predict(self, image: np.ndarray, wins: list[np.ndarray]) -> list[np.ndarray]:
        """One trainId map per fit; multi-scale averages the upsampled logits over scales."""
        h, w = image.shape[:2]
        summed = [None] * len(self.fits)
        for scale in self.cfg.inference.scales:
            short = max(self.dense.patch, round(self.cfg.inference.short_side * scale))
            (features,) = self.dense([image], short_side=short)
            resized = resized_size(h, w, short)
            for i, fit in enumerate(self.fits):
                logits, winners = class_logit_grid(features, fit["centroids"], fit["mapping"], NUM_CLASSES)
                if scale == 1.0:  # dead-centroid statistics at the base scale
                    wins[i] += np.bincount(winners.ravel(), minlength=len(fit["mapping"]))
                up = upsample_logits(logits, resized, self.dense.patch, (h, w))
                summed[i] = up if summed[i] is None else summed[i] + up
        return [logits_to_train_ids(s, NUM_CLASSES) for s in summed]

    def _write_outputs(self, record, image: np.ndarray, train_ids: np.ndarray) -> None:
        group = safe_path(self.labels_dir, record.group)
        write_png_atomic(train_ids, safe_path(group, f"{record.image_id}_pseudo_trainIds.png"))
        write_png_atomic(train_ids_to_label_ids(train_ids), safe_path(group, f"{record.image_id}_pseudo_labelIds.png"))
        if record.image_id in self.overlay_ids:
            overlay = (0.5 * image + 0.5 * colorize_train_ids(train_ids)).astype(np.uint8)
            write_png_atomic(overlay, safe_path(group, f"{record.image_id}_pseudo_overlay.png"))
