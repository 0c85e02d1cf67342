"""Label-and-score stage: per image, dense features once, then the nearest centroid of every pixel
for every fit (k sweep + baseline).

Per shard it keeps, for each fit, the (cluster, class) pixel counts per cross-validation fold and
the cluster win counts: enough to score any mapping protocol in the driver. For the main fit's
label variants (the seed's labels, each enabled refinement) and the baseline it keeps the
confusion matrix, panoptic match statistics and seconds per image. The written variant of the
main fit goes out in the Cityscapes formats (labelIds, trainIds, instanceIds, panoptic).
"""

import logging
import time
from pathlib import Path

import numpy as np
import ray

from actors.model_setup import build_dense_extractor
from actors.shard_actor import ShardActor
from configs.schema import parse_config
from core.labelling import PixelAssigner, clusters_to_train_ids
from core.labels import NUM_CLASSES, colorize_train_ids
from core.mapping import cluster_class_counts
from core.metrics import confusion_matrix
from core.panoptic import gt_panoptic, panoptic_from_train_ids, pq_stats
from core.sampling import image_fold
from core.variants import ImageEvidence, enabled_variants, run_variant
from storage.cityscapes_outputs import prediction_paths, write_image_predictions
from storage.images import InputError, read_instance_ids, read_rgb, read_train_ids, safe_path, write_png_atomic
from storage.shards import mark_done, shard_records, write_json_atomic, write_npz_atomic

log = logging.getLogger(__name__)


class LabelScorer(ShardActor):
    """Ray Data actor. `fits` is an ObjectRef (put once by the driver) to a list of
    {"name", "centroids", "mapping"}: the main fit first, the baseline last."""

    def __init__(self, config: dict, fits, stage_dir: str, labels_dir: str, overlay_ids: list[str]):
        self.cfg = parse_config(config, "label actor config")
        self.fits = ray.get(fits) if isinstance(fits, ray.ObjectRef) else fits  # refs in constructor args arrive undereferenced
        self.stage_dir, self.labels_dir = Path(stage_dir), Path(labels_dir)
        self.overlay_ids = set(overlay_ids)
        self.dense = build_dense_extractor(self.cfg, self.cfg.label_workers)
        self.assigner = PixelAssigner([f["centroids"] for f in self.fits], device=self.dense.device)
        self.variants = [*enabled_variants(self.cfg.refine, len(self.cfg.inference.scales) > 1), self.fits[-1]["name"]]

    def process_shard(self, shard: str, shard_row: dict) -> None:
        folds, n_var = self.cfg.fit.heldout_folds, len(self.variants)
        image_ids, failed, annotations = [], [], []
        wins = [np.zeros(len(f["mapping"]), np.int64) for f in self.fits]
        pixel_counts = [np.zeros((folds, len(f["mapping"]), NUM_CLASSES), np.int64) for f in self.fits]
        variant_confusion = np.zeros((n_var, NUM_CLASSES, NUM_CLASSES + 1), np.int64)
        image_pq = []  # per image, so the sum does not depend on how images were sharded
        variant_seconds = np.zeros(n_var, np.float64)
        for record in shard_records(shard_row):
            try:
                # names from data: an unsafe one is this image's failure, before anything is counted
                prediction_paths(self.labels_dir, record.group, record.image_id, self.cfg.dataset.split)
                image = read_rgb(Path(record.image_path))
                gt, gt_pan = None, None
                if record.label_ids_path:
                    gt = read_train_ids(Path(record.label_ids_path), image.shape[:2])
                    gt_pan = gt_panoptic(read_instance_ids(Path(record.instance_ids_path), image.shape[:2]))
                start = time.perf_counter()
                cluster_maps, evidence = self._assign(image)
                seed_seconds = time.perf_counter() - start
                outcomes = self._variants(evidence, cluster_maps[-1], seed_seconds)
            except InputError as err:
                failed.append({"image_id": record.image_id, "path": record.image_path, "stage": "label", "error": str(err)})
                continue
            except Exception as err:  # noqa: BLE001 - one image's failure must not end a run of thousands
                log.exception("label: %s failed", record.image_id)
                failed.append({"image_id": record.image_id, "path": record.image_path, "stage": "label",
                               "error": f"internal error {type(err).__name__}: {err} (see the worker log; please report it)"})
                continue
            image_ids.append(record.image_id)
            fold = image_fold(record.image_id, folds, self.cfg.seed)
            for i, cluster_map in enumerate(cluster_maps):
                k = len(wins[i])
                wins[i] += np.bincount(cluster_map.ravel(), minlength=k)
                if gt is not None:
                    pixel_counts[i][fold] += cluster_class_counts(cluster_map, gt, k, NUM_CLASSES)
            pq = np.zeros((n_var, NUM_CLASSES, 4), np.float64)
            for v, (labels, panoptic, seconds) in enumerate(outcomes):
                variant_seconds[v] += seconds
                if gt is not None:
                    variant_confusion[v] += confusion_matrix(gt, labels, NUM_CLASSES)
                    pq[v] = pq_stats(gt_pan, panoptic)
            image_pq.append(pq)
            written = outcomes[self.variants.index(self.cfg.refine.write_variant)]
            if self.cfg.label.write_label_pngs:
                annotations.append(write_image_predictions(self.labels_dir, record.group, record.image_id, *written[:2],
                                                           split=self.cfg.dataset.split))
            if record.image_id in self.overlay_ids:
                self._write_overlay_panels(record, image, gt, written[0], outcomes[-1][0])
        arrays = {"image_ids": np.array(image_ids, dtype=np.str_), "variants": np.array(self.variants, dtype=np.str_),
                  "variant_confusion": variant_confusion, "variant_seconds": variant_seconds,
                  "image_pq": np.array(image_pq, np.float64).reshape(-1, n_var, NUM_CLASSES, 4)}
        for f, w, c in zip(self.fits, wins, pixel_counts):
            arrays[f"wins_{f['name']}"] = w
            arrays[f"pixel_counts_{f['name']}"] = c
        write_npz_atomic(arrays, self.stage_dir / f"{shard}.npz")
        write_json_atomic(annotations, self.stage_dir / "_panoptic" / f"{shard}.json")
        mark_done(self.stage_dir, shard, {"num_images": len(image_ids), "failed": failed})

    def _assign(self, image: np.ndarray) -> tuple[list[np.ndarray], ImageEvidence]:
        """Nearest centroid of every pixel, one (H, W) map per fit (scores averaged over scales),
        and what the main fit's variants need."""
        grids = self.dense.at_scales(image, self.cfg.inference.scales)
        main = self.fits[0]
        maps, logits = self.assigner.assign(grids, self.dense.patch, image.shape[:2],
                                            first_fit_mapping=main["mapping"] if self.cfg.refine.crf else None,
                                            num_classes=NUM_CLASSES)
        evidence = ImageEvidence(image=image, grids=grids, patch_size=self.dense.patch,
                                 seed_labels=clusters_to_train_ids(maps[0], main["mapping"]), class_logits=logits)
        return maps, evidence

    def _variants(self, ev: ImageEvidence, baseline_map: np.ndarray, seed_seconds: float) -> list[tuple]:
        """(trainIds, panoptic, seconds) for each variant of the main fit, then for the baseline."""
        pan = self.cfg.panoptic
        outcomes = []
        for name in self.variants[:-1]:
            start = time.perf_counter()
            labels, instances = run_variant(name, ev, self.fits[0]["centroids"], self.fits[0]["mapping"], self.cfg.refine)
            panoptic = panoptic_from_train_ids(labels, instances, min_area=pan.thing_min_area,
                                               stuff_min_area=pan.stuff_min_area, connectivity=pan.connectivity)
            outcomes.append((labels, panoptic, seed_seconds + time.perf_counter() - start))
        baseline = clusters_to_train_ids(baseline_map, self.fits[-1]["mapping"])
        outcomes.append((baseline, panoptic_from_train_ids(baseline, None, min_area=pan.thing_min_area,
                                                           stuff_min_area=pan.stuff_min_area, connectivity=pan.connectivity),
                         seed_seconds))
        return outcomes

    def _write_overlay_panels(self, record, image: np.ndarray, gt: np.ndarray | None, labels: np.ndarray,
                              baseline: np.ndarray) -> None:
        """Colour maps of a few images for the report's overlay grid and for a quick look."""
        folder = safe_path(self.labels_dir, "overlays", record.group)
        write_png_atomic(image, safe_path(folder, f"{record.image_id}_image.png"))
        write_png_atomic((0.5 * image + 0.5 * colorize_train_ids(labels)).astype(np.uint8),
                         safe_path(folder, f"{record.image_id}_overlay.png"))
        write_png_atomic(colorize_train_ids(labels), safe_path(folder, f"{record.image_id}_labels_color.png"))
        write_png_atomic(colorize_train_ids(baseline), safe_path(folder, f"{record.image_id}_baseline_color.png"))
        if gt is not None:
            write_png_atomic(colorize_train_ids(gt), safe_path(folder, f"{record.image_id}_gt_color.png"))
