"""The label stage's steps; no model anywhere (extract wrote every scale's features):

image_features  (actors.feature_reader) CPU task per shard: its features -> one row per image
LabelImages     actor (CPU, or the assignment on CUDA): every label map the run asks for
                (`core.labelling.image`); writes the Cityscapes-format pseudo-labels, passes the
                maps on; knows no evaluator
score_image     (actors.score) CPU task per image: the run's evaluators, the image's part
finish_scores   (actors.score) per shard, when every image is out: parts -> scores npz + marker
"""

import dataclasses
import json
from pathlib import Path

import numpy as np
import ray

from actors.model_setup import device_for
from actors.rows import run_on_image, step
from configs.geometry import image_limits, label_short_sides, unpack_windows
from configs.schema import RunConfig
from configs.specs import label_request, label_variants, panoptic_rules, refine_settings
from core.classes import colorize_train_ids
from core.evaluation.base import Segmenter
from core.inference.windows import cause_view, resized_size
from core.labelling.image import ImageLabeller, label_fits
from core.presets import protocol_steps
from storage.cityscapes_outputs import prediction_paths, write_image_predictions
from storage.images import read_rgb, read_train_ids, safe_path, write_png_atomic


@step(resources="label.workers")
class LabelImages:
    """Actor: `setup` takes the fits from the object store once; a call labels one image, writes
    its pseudo-labels and passes its label maps on to the score step (`labels`)."""

    def __init__(self, cfg: RunConfig, fits, labels_dir: str, overlay_ids: list[str]):
        self.cfg, self.fits_ref = cfg, fits
        self.labels_dir, self.overlay_ids = Path(labels_dir), set(overlay_ids)

    def setup(self) -> None:
        # refs in constructor args arrive undereferenced
        fits = ray.get(self.fits_ref) if isinstance(self.fits_ref, ray.ObjectRef) else self.fits_ref
        self.fits, self.variants = label_fits(fits), label_variants(self.cfg)
        self.request = label_request(self.cfg)
        self.labeller = ImageLabeller(
            self.fits,
            self.variants,
            refine_settings(self.cfg),
            device=device_for(self.cfg.label.workers),
            labelling=protocol_steps(self.cfg.protocol).label_resolution,
            request=self.request,
        )
        self.rules = panoptic_rules(self.cfg)
        # the steps that look at colour: the CRFs (also the paper baseline's), superpixels, CAUSE's crop (its CRF)
        self.colour = (
            self.cfg.refine.crf
            or self.cfg.refine.superpixels
            or self.request.cause_crop
            or any(name.endswith("+crf") for name in self.request.baseline_labellings)
        )
        self.short_sides = label_short_sides(self.cfg)
        self.limits = image_limits(self.cfg)

    def __call__(self, row: dict) -> dict:
        out = {}
        result = run_on_image("label", row, lambda: out.update(self._label(row)))
        keep = ("group", "label_ids_path", "instance_ids_path", "height", "width")
        labels = out["labels"].to_bytes() if "labels" in out else b""  # one npz: maps of any shape, shared maps once
        return result | {k: row[k] for k in keep} | {"labels": labels, "annotation": json.dumps(out.get("annotation"))}

    def _label(self, row: dict) -> dict:
        image_id, group, split = row["image_id"], row["group"], self.cfg.dataset.split
        prediction_paths(self.labels_dir, group, image_id, split)  # names from data: an unsafe one fails here
        hw = (int(row["height"]), int(row["width"]))
        image = None
        if self.colour or image_id in self.overlay_ids:

            def changed(h: int, w: int) -> str | None:
                return (
                    None
                    if (h, w) == hw
                    else (
                        f"the image is now {h}x{w} but its features were extracted at "
                        f"{hw[0]}x{hw[1]}; re-run extract on a new output_dir"
                    )
                )

            image = read_rgb(row["path"], dataclasses.replace(self.limits, size_problem=changed))
        grids = [(row[f"grid_{i}"].astype(np.float32), resized_size(*hw, s)) for i, s in enumerate(self.short_sides)]
        windows = unpack_windows(self.cfg, row["grid_windows"], hw) if "grid_windows" in row else None
        cause = {}
        if self.request.cause_crop:  # extract's two passes of CAUSE's crop, side by side, and the crop's pixels
            inference = self.cfg.inference
            cause = {
                "cause_grids": np.split(row["grid_cause"].astype(np.float32), 2, axis=2),
                "cause_rgb": cause_view(image, inference.short_side, inference.crop),
            }
        labels = self.labeller.label(grids, self.cfg.model.vit.patch_size, hw, image, windows, **cause)
        written = labels.variant(self.cfg.refine.write_variant)
        annotation = None
        if self.cfg.label.write_label_pngs:
            panoptic = Segmenter(self.rules)(written)
            labels.segments[f"variant/{self.cfg.refine.write_variant}"] = panoptic  # the score step reuses it
            annotation = write_image_predictions(
                self.labels_dir, group, image_id, written.train_ids, panoptic, split=split
            )
        if image_id in self.overlay_ids:
            self._write_overlay_panels(
                group,
                image_id,
                image,
                row["label_ids_path"],
                written.train_ids,
                labels.variant(self.fits[-1].name).train_ids,
            )
        return {"labels": labels, "annotation": annotation}

    def _write_overlay_panels(
        self,
        group: str,
        image_id: str,
        image: np.ndarray,
        label_ids_path: str,
        labels: np.ndarray,
        baseline: np.ndarray,
    ) -> None:
        """Colour maps of a few images for the report's overlay grid and for a quick look."""
        folder = safe_path(self.labels_dir, "overlays", group)
        write_png_atomic(image, safe_path(folder, f"{image_id}_image.png"))
        write_png_atomic(
            (0.5 * image + 0.5 * colorize_train_ids(labels)).astype(np.uint8),
            safe_path(folder, f"{image_id}_overlay.png"),
        )
        write_png_atomic(colorize_train_ids(labels), safe_path(folder, f"{image_id}_labels_color.png"))
        write_png_atomic(colorize_train_ids(baseline), safe_path(folder, f"{image_id}_baseline_color.png"))
        if label_ids_path:
            gt = read_train_ids(Path(label_ids_path), image.shape[:2])
            write_png_atomic(colorize_train_ids(gt), safe_path(folder, f"{image_id}_gt_color.png"))
