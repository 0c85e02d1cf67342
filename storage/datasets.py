"""Dataset readers: the Cityscapes layout and plain folders of unlabelled images.

Both give the same `ImageRecord`s, sorted by image id, so shards are deterministic.
"""

import re
from dataclasses import asdict, dataclass
from pathlib import Path

from storage import uris

IMAGE_SUFFIX = "_leftImg8bit.png"
LABEL_IDS_SUFFIX = "_gtFine_labelIds.png"
INSTANCE_IDS_SUFFIX = "_gtFine_instanceIds.png"
FOLDER_IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")


class DatasetError(Exception):
    """The dataset as a whole cannot be read (missing root, empty split)."""


@dataclass(frozen=True)
class ImageRecord:
    image_id: str  # e.g. "frankfurt_000000_000294"; unique within the dataset
    group: str  # city for Cityscapes; output sub-folder
    image_path: str
    label_ids_path: str | None = None  # None for unlabelled data
    instance_ids_path: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def list_cityscapes(root: Path, split: str, max_images: int | None = None) -> list[ImageRecord]:
    """leftImg8bit/{split}/{city}/*_leftImg8bit.png with gtFine beside it.

    A split with no gtFine/{split} folder (Cityscapes' test split) is unlabelled; in a split that
    has one, a missing ground-truth file is an error of that image (reported when it is read).
    """
    image_dir = Path(root) / "leftImg8bit" / split
    if not image_dir.is_dir():
        raise DatasetError(f"no Cityscapes split at {image_dir}: set dataset.root to the folder that holds leftImg8bit/ "
                           f"and gtFine/, and dataset.split to one of its splits (or run `python submit.py synth` for the demo set)")
    labelled = (Path(root) / "gtFine" / split).is_dir()
    records = []
    for path in sorted(image_dir.glob(f"*/*{IMAGE_SUFFIX}")):
        city = path.parent.name
        image_id = path.name[: -len(IMAGE_SUFFIX)]
        gt_dir = Path(root) / "gtFine" / split / city
        records.append(ImageRecord(
            image_id=image_id, group=city, image_path=str(path),
            label_ids_path=str(gt_dir / f"{image_id}{LABEL_IDS_SUFFIX}") if labelled else None,
            instance_ids_path=str(gt_dir / f"{image_id}{INSTANCE_IDS_SUFFIX}") if labelled else None,
        ))
    if not records:
        raise DatasetError(f"{image_dir} holds no *{IMAGE_SUFFIX} files: the split is empty")
    return records[:max_images]


def list_image_folder(root: Path | str, max_images: int | None = None) -> list[ImageRecord]:
    """Every png/jpg below `root`, a local folder or an object-store URI (see storage/uris.py);
    the id is the relative path with separators replaced, so it stays unique and safe as a file name."""
    if uris.is_uri(root):
        if not uris.exists(str(root)):
            raise DatasetError(f"{root} does not exist (or is not reachable): check the URI, its options and credentials")
        files = uris.list_files(str(root), FOLDER_IMAGE_EXTENSIONS)
    else:
        root = Path(root)
        if not root.is_dir():
            raise DatasetError(f"image folder {root} does not exist: set dataset.root")
        files = [(str(p.relative_to(root)), str(p)) for p in sorted(root.rglob("*")) if p.suffix.lower() in FOLDER_IMAGE_EXTENSIONS]
    records = []
    for rel, location in files:
        stem = rel.rsplit(".", 1)[0]
        image_id = re.sub(r"[^A-Za-z0-9._-]", "_", "__".join(stem.split("/"))).lstrip(".")
        records.append(ImageRecord(image_id=image_id, group="images", image_path=location))
    if not records:
        raise DatasetError(f"{root} holds no images ({', '.join(FOLDER_IMAGE_EXTENSIONS)})")
    return records[:max_images]


def list_dataset(kind: str, root: Path | str, split: str, max_images: int | None) -> list[ImageRecord]:
    if kind == "cityscapes":
        return list_cityscapes(root, split, max_images)
    return list_image_folder(root, max_images)
