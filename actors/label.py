"""The label stage's steps; no model anywhere (extract wrote every scale's features):

  image_features  (actors.feature_reader) CPU task per shard: its features -> one row per image
  LabelImages     actor (CPU, or the assignment on CUDA): label + score one image, write its
                  Cityscapes-format pseudo-labels and its part
  finish_scores   per shard, when every image is out: parts -> scores npz + panoptic JSON + marker
"""

from pathlib import Path

import numpy as np
import ray

from actors.geometry import label_scales, label_short_sides, seed_baseline_scales, unpack_windows
from actors.model_setup import device_for
from actors.rows import run_on_image
from configs.schema import RunConfig, parse_config
from core.cause_eval import cause_counts
from core.labels import NUM_CLASSES_27
from core.windows import cause_view, resized_size
from core.label_image import ImageLabeller, LabelFit, baseline_labellings, image_scores, sensitivity_scores, shard_scores
from core.presets import protocol_steps
from core.labels import colorize_train_ids
from core.sampling import image_fold
from core.variants import enabled_variants
from storage.cityscapes_outputs import label_pngs, prediction_paths, write_image_predictions
from storage.images import InputError, read_ground_truth, read_label_ids, read_rgb, safe_path, write_png_atomic
from storage.parts import complete_shard, read_shard_parts, write_part
from storage.shards import write_json_atomic, write_npz_atomic


def label_fits(fits: list[dict]) -> list[LabelFit]:
    """The broadcast fits (main first, baseline last), each at its pixel stride (`ray_jobs.fit.fit_pixel_stride`)."""
    return [LabelFit(f["name"], f["centroids"], f["mapping"], f["stride"], f.get("prototypes")) for f in fits]


def label_variants(cfg: RunConfig, fits: list[dict]) -> list[str]:
    return [*enabled_variants(cfg.refine, len(label_scales(cfg)) > 1), fits[-1]["name"]]


def extra_baseline_labellings(cfg: RunConfig) -> list[str]:
    return baseline_labellings(cfg.protocol, bool(seed_baseline_scales(cfg)), cfg.refine.crf)


class LabelImages:
    """Actor: `__init__` takes the fits from the object store once; a call labels and scores one image."""

    def __init__(self, config: dict, fits, stage_dir: str, labels_dir: str, overlay_ids: list[str], plan_key: str):
        self.cfg = parse_config(config, "label actor config")
        fits = ray.get(fits) if isinstance(fits, ray.ObjectRef) else fits  # refs in constructor args arrive undereferenced
        self.fits, self.variants = label_fits(fits), label_variants(self.cfg, fits)
        self.stage_dir, self.labels_dir, self.overlay_ids = Path(stage_dir), Path(labels_dir), set(overlay_ids)
        self.plan_key = plan_key
        self.labeller = ImageLabeller(self.fits, self.variants[:-1], self.cfg.refine, self.cfg.panoptic, baseline=True,
                                      device=device_for(self.cfg.label.workers),
                                      labelling=protocol_steps(self.cfg.protocol).label_resolution,
                                      extra_baseline=extra_baseline_labellings(self.cfg))
        # the steps that look at colour: the CRFs (also the seed baseline's), superpixels, CAUSE's crop (its CRF)
        self.cause_crop = protocol_steps(self.cfg.protocol).cause_crop
        self.colour = (self.cfg.refine.crf or self.cfg.refine.superpixels or self.cause_crop
                       or any(name.endswith("+crf") for name in self.labeller.extra_baseline))
        self.short_sides = label_short_sides(self.cfg)

    def __call__(self, row: dict) -> dict:
        return run_on_image("label", row, lambda: self._label(row))

    def _label(self, row: dict) -> None:
        image_id, group, split = row["image_id"], row["group"], self.cfg.dataset.split
        prediction_paths(self.labels_dir, group, image_id, split)  # names from data: an unsafe one fails here
        hw = (int(row["height"]), int(row["width"]))
        image = None
        if self.colour or image_id in self.overlay_ids:
            image = read_rgb(row["path"])
            if image.shape[:2] != hw:
                raise InputError(f"{row['path']}: the image is now {image.shape[0]}x{image.shape[1]} but its features were "
                                 f"extracted at {hw[0]}x{hw[1]}; re-run extract on a new output_dir")
        gt = gt_pan = gt_instances = None
        if row["label_ids_path"]:
            gt, gt_pan, gt_instances = read_ground_truth(Path(row["label_ids_path"]), Path(row["instance_ids_path"]), hw)
        grids = [(row[f"grid_{i}"].astype(np.float32), resized_size(*hw, s)) for i, s in enumerate(self.short_sides)]
        windows = unpack_windows(self.cfg, row["grid_windows"], hw) if "grid_windows" in row else None
        labels = self.labeller.label(grids, self.cfg.model.vit.patch_size, hw, image, windows)
        scores = image_scores(labels, self.fits, gt, gt_pan) | sensitivity_scores(self.labeller, labels, gt, gt_pan, gt_instances)
        if self.cause_crop:
            scores["cause_counts"] = self._cause_counts(row, hw, image)
        written = labels.variants[self.variants.index(self.cfg.refine.write_variant)]
        annotation = (write_image_predictions(self.labels_dir, group, image_id, *written[:2], split=split)
                      if self.cfg.label.write_label_pngs else None)
        if image_id in self.overlay_ids:
            self._write_overlay_panels(group, image_id, image, gt, written[0], labels.variants[-1][0])
        write_part(self.stage_dir, row["shard"], image_id, scores,
                   {"fold": image_fold(image_id, self.cfg.fit.heldout_folds, self.cfg.seed), "annotation": annotation},
                   self.plan_key)

    def _cause_counts(self, row: dict, hw: tuple[int, int], image: np.ndarray) -> np.ndarray:
        """The baseline on CAUSE's crop: (2, k, 27) pixel counts without and with CAUSE's CRF."""
        baseline, inference = self.fits[-1], self.cfg.inference
        if not row["label_ids_path"]:
            return np.zeros((2, len(baseline.mapping), NUM_CLASSES_27), np.int64)
        crop_ids = cause_view(read_label_ids(Path(row["label_ids_path"]), hw), inference.short_side, inference.crop)
        crop_rgb = cause_view(image, inference.short_side, inference.crop)
        plain, flipped = np.split(row["grid_cause"].astype(np.float32), 2, axis=2)  # extract's two passes, side by side
        return cause_counts(plain, flipped, baseline.centroids, crop_ids, crop_rgb)

    def _write_overlay_panels(self, group: str, image_id: str, image: np.ndarray, gt: np.ndarray | None,
                              labels: np.ndarray, baseline: np.ndarray) -> None:
        """Colour maps of a few images for the report's overlay grid and for a quick look."""
        folder = safe_path(self.labels_dir, "overlays", group)
        write_png_atomic(image, safe_path(folder, f"{image_id}_image.png"))
        write_png_atomic((0.5 * image + 0.5 * colorize_train_ids(labels)).astype(np.uint8), safe_path(folder, f"{image_id}_overlay.png"))
        write_png_atomic(colorize_train_ids(labels), safe_path(folder, f"{image_id}_labels_color.png"))
        write_png_atomic(colorize_train_ids(baseline), safe_path(folder, f"{image_id}_baseline_color.png"))
        if gt is not None:
            write_png_atomic(colorize_train_ids(gt), safe_path(folder, f"{image_id}_gt_color.png"))


def finish_scores(stage_dir: str, shard_row: dict, written: list[str], failed: list[dict], plan_key: str, config: dict,
                  fits: list[dict], labels_dir: str) -> None:
    """The parts of a shard (in shard order) -> its scores npz and COCO annotations, the marker
    (listing these and the images' label PNGs), no parts."""
    cfg = parse_config(config, "label finish config")
    stage_dir, shard = Path(stage_dir), shard_row["shard"]
    order, parts, written_at = read_shard_parts(stage_dir, shard_row, written, plan_key)
    arrays = shard_scores(order, [meta["fold"] for _, meta in parts], [a for a, _ in parts], label_fits(fits),
                          label_variants(cfg, fits), cfg.fit.heldout_folds, cause=protocol_steps(cfg.protocol).cause_crop,
                          extra_baseline=extra_baseline_labellings(cfg))
    outputs = [stage_dir / f"{shard}.npz", stage_dir / "_panoptic" / f"{shard}.json"]
    write_npz_atomic(arrays, outputs[0])
    write_json_atomic([meta["annotation"] for _, meta in parts if meta["annotation"]], outputs[1])
    if cfg.label.write_label_pngs:
        outputs += label_pngs(Path(labels_dir), shard_row, order, cfg.dataset.split)
    complete_shard(stage_dir, shard, order, written_at, failed, outputs, plan_key)
