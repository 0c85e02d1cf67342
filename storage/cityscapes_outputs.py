"""Prediction files in the formats of the official Cityscapes evaluators, and panoptic ground truth.

Layout of a prediction folder `root` (names from data pass `safe_path`):
  labelIds/{group}/{image_id}_labelIds.png            uint8 Cityscapes labelIds (0 = unlabeled)
  trainIds/{group}/{image_id}_trainIds.png            uint8 trainIds (255 = no class)
  instanceIds/{group}/{image_id}_instanceIds.png      uint16 labelId*1000 + n, labelId off instances
  panoptic/cityscapes_panoptic_{split}/{image_id}_panoptic.png   RGB, id = R + 256 G + 256^2 B
  panoptic/cityscapes_panoptic_{split}.json           COCO panoptic JSON (`write_panoptic_json`)

The official evaluators then run as
  CITYSCAPES_RESULTS=root/labelIds   csEvalPixelLevelSemanticLabeling
  CITYSCAPES_RESULTS=root/panoptic   csEvalPanopticSemanticLabeling
(the pixel-level one searches every PNG under its root for `{city}_{seq}_{frame}*.png`, so each
kind of file has its own folder). Every file is written to a temporary name and renamed into
place, so a crash never leaves a half-written file under its final name.
"""

from pathlib import Path

import numpy as np
from PIL import Image

from core.classes import EVAL_CLASSES, train_ids_to_label_ids
from core.panoptic import Panoptic, gt_panoptic, instance_ids_map
from storage.images import InputError, safe_path, write_png_atomic
from storage.run.atomic import write_json_atomic
from storage.run.shards import shard_records

# Cityscapes `category` of each evaluation class (the COCO `supercategory`).
_SUPERCATEGORY = {
    "road": "flat",
    "sidewalk": "flat",
    "building": "construction",
    "wall": "construction",
    "fence": "construction",
    "pole": "object",
    "traffic light": "object",
    "traffic sign": "object",
    "vegetation": "nature",
    "terrain": "nature",
    "sky": "sky",
    "person": "human",
    "rider": "human",
    "car": "vehicle",
    "truck": "vehicle",
    "bus": "vehicle",
    "train": "vehicle",
    "motorcycle": "vehicle",
    "bicycle": "vehicle",
}


def panoptic_categories() -> list[dict]:
    """COCO categories of the 19 evaluation classes, ids = Cityscapes labelIds (as createPanopticImgs)."""
    return [
        {
            "id": int(label_id),
            "name": name,
            "color": list(color),
            "supercategory": _SUPERCATEGORY[name],
            "isthing": 1 if is_thing else 0,
        }
        for name, label_id, _train_id, color, is_thing in EVAL_CLASSES
    ]


def panoptic_to_rgb(ids: np.ndarray) -> np.ndarray:
    """(H, W) segment ids -> (H, W, 3) uint8 with id = R + 256 G + 256^2 B."""
    ids = ids.astype(np.int64)
    if ids.size and (ids.min() < 0 or ids.max() >= 256**3):
        raise ValueError(f"panoptic ids must lie in [0, 256^3), got [{ids.min()}, {ids.max()}]")
    # little-endian bytes of the uint32 id are R, G, B (and a zero)
    return np.ascontiguousarray(ids.astype("<u4").view(np.uint8).reshape(*ids.shape, 4)[..., :3])


def rgb_to_panoptic(rgb: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 -> (H, W) int64 ids (inverse of `panoptic_to_rgb`)."""
    rgb = rgb.astype(np.int64)
    return rgb[..., 0] + 256 * rgb[..., 1] + 65536 * rgb[..., 2]


def segments_info(panoptic: Panoptic) -> list[dict]:
    """COCO `segments_info` of a segmentation: id, category_id (labelId), iscrowd, area, bbox."""
    boxes = panoptic.bboxes()
    return [
        {
            "id": int(sid),
            "category_id": int(cat),
            "iscrowd": int(crowd),
            "area": int(area),
            "bbox": [int(v) for v in box],
        }
        for sid, cat, crowd, area, box in zip(
            panoptic.segment_ids, panoptic.label_id, panoptic.iscrowd, panoptic.area, boxes
        )
    ]


def prediction_paths(root: Path, group: str, image_id: str, split: str = "val") -> dict[str, Path]:
    """Where the prediction files of one image go (see the module docstring)."""
    root = Path(root)
    return {
        "label_ids": safe_path(root, "labelIds", group, f"{image_id}_labelIds.png"),
        "train_ids": safe_path(root, "trainIds", group, f"{image_id}_trainIds.png"),
        "instance_ids": safe_path(root, "instanceIds", group, f"{image_id}_instanceIds.png"),
        "panoptic": safe_path(root, "panoptic", f"cityscapes_panoptic_{split}", f"{image_id}_panoptic.png"),
    }


def remove_image_predictions(root: Path, group: str, image_id: str, split: str = "val") -> None:
    """Removes what the label step wrote of one image (its prediction PNGs and overlay panels), for
    an image that failed after them: a failed image leaves no pseudo-labels behind."""
    for path in prediction_paths(root, group, image_id, split).values():
        path.unlink(missing_ok=True)
    for path in safe_path(Path(root), "overlays", group).glob(f"{image_id}_*.png"):
        path.unlink()


def label_pngs(root: Path, shard_row: dict, image_ids: list[str], split: str) -> list[Path]:
    """The prediction PNGs of a shard's written images, for its marker."""
    groups = {r.image_id: r.group for r in shard_records(shard_row)}
    return [
        path for image_id in image_ids for path in prediction_paths(root, groups[image_id], image_id, split).values()
    ]


def panoptic_json_path(root: Path, split: str = "val") -> Path:
    return safe_path(Path(root), "panoptic", f"cityscapes_panoptic_{split}.json")


def write_label_ids_png(train_ids: np.ndarray, path: Path) -> None:
    """(H, W) trainIds (255 = ignore) -> uint8 labelIds PNG (ignore -> 0, unlabeled)."""
    write_png_atomic(train_ids_to_label_ids(train_ids), path)


def write_instance_ids_png(panoptic: Panoptic, train_ids: np.ndarray, path: Path) -> None:
    """uint16 Cityscapes-format instanceIds PNG (see `core.panoptic.instance_ids_map`)."""
    write_png_atomic(instance_ids_map(panoptic, train_ids), path)


def write_panoptic_png(panoptic: Panoptic, path: Path) -> None:
    write_png_atomic(panoptic_to_rgb(panoptic.ids), path)


def write_image_predictions(
    root: Path, group: str, image_id: str, train_ids: np.ndarray, panoptic: Panoptic, split: str = "val"
) -> dict:
    """Writes one image's labelIds, trainIds, instanceIds and panoptic PNGs; returns its COCO
    annotation, to be gathered (by the driver) into `write_panoptic_json`."""
    paths = prediction_paths(root, group, image_id, split)
    write_label_ids_png(train_ids, paths["label_ids"])
    write_png_atomic(train_ids, paths["train_ids"])
    write_instance_ids_png(panoptic, train_ids, paths["instance_ids"])
    write_panoptic_png(panoptic, paths["panoptic"])
    return {"image_id": image_id, "file_name": paths["panoptic"].name, "segments_info": segments_info(panoptic)}


def write_panoptic_json(
    root: Path, annotations: list[dict], split: str = "val", images: list[dict] | None = None
) -> Path:
    """COCO panoptic JSON of the predictions (annotations sorted by image_id); returns its path."""
    path = panoptic_json_path(root, split)
    data = {"annotations": sorted(annotations, key=lambda a: a["image_id"]), "categories": panoptic_categories()}
    if images is not None:
        data["images"] = images
    write_json_atomic(data, path)
    return path


def convert_gt_panoptic(gt_fine_root: Path, split: str = "val", out_dir: Path | None = None) -> tuple[Path, Path]:
    """Cityscapes `gtFine/{split}/*/*_gtFine_instanceIds.png` -> COCO panoptic ground truth, the
    same files as `cityscapesscripts.preparation.createPanopticImgs` (labelId categories):
    out_dir/cityscapes_panoptic_{split}.json and out_dir/cityscapes_panoptic_{split}/*_gtFine_panoptic.png.
    `out_dir` defaults to `gt_fine_root`. Returns (json path, PNG folder)."""
    gt_fine_root = Path(gt_fine_root)
    out_dir = gt_fine_root if out_dir is None else Path(out_dir)
    split_dir = safe_path(gt_fine_root, split)
    files = sorted(split_dir.glob("*/*_gtFine_instanceIds.png"))
    if not files:
        raise InputError(f"{split_dir}: no */*_gtFine_instanceIds.png files; is this the Cityscapes gtFine folder?")
    base = f"cityscapes_panoptic_{split}"
    folder = safe_path(out_dir, base)
    images, annotations = [], []
    for f in files:
        with Image.open(f) as img:
            instance_ids = np.asarray(img)
        if instance_ids.ndim != 2:
            raise InputError(f"{f}: instanceIds must be a single-channel PNG, got shape {instance_ids.shape}")
        image_id = f.name.replace("_gtFine_instanceIds.png", "")
        out_name = f.name.replace("_instanceIds.png", "_panoptic.png")
        try:
            pan = gt_panoptic(instance_ids)
        except ValueError as err:
            raise InputError(f"{f}: {err}") from None
        write_png_atomic(panoptic_to_rgb(pan.ids), safe_path(folder, out_name))
        h, w = instance_ids.shape
        images.append(
            {
                "id": image_id,
                "width": int(w),
                "height": int(h),
                "file_name": f.name.replace("_instanceIds.png", "_leftImg8bit.png"),
            }
        )
        annotations.append({"image_id": image_id, "file_name": out_name, "segments_info": segments_info(pan)})
    json_path = safe_path(out_dir, f"{base}.json")
    write_json_atomic({"images": images, "annotations": annotations, "categories": panoptic_categories()}, json_path)
    return json_path, folder
