"""Dataset readers: the Cityscapes layout and plain folders of unlabelled images.

Both give the same `ImageRecord`s, sorted by image id, so shards are deterministic.
"""

import hashlib
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path

from core.errors import UserError
from storage import uris

IMAGE_SUFFIX = "_leftImg8bit.png"
LABEL_IDS_SUFFIX = "_gtFine_labelIds.png"
INSTANCE_IDS_SUFFIX = "_gtFine_instanceIds.png"
FOLDER_IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")


class DatasetError(UserError):
    """The dataset as a whole cannot be read (missing root, empty split)."""


@dataclass(frozen=True)
class ImageRecord:
    image_id: str  # e.g. "frankfurt_000000_000294"; unique within the dataset
    group: str  # city for Cityscapes; output sub-folder
    image_path: str
    label_ids_path: str | None = None  # None for unlabelled data
    instance_ids_path: str | None = None
    stamp: str = ""  # "<bytes>:<mtime_ns>" of each file: a file replaced under the same name changes it

    def to_dict(self) -> dict:
        return asdict(self)


def list_cityscapes(root: Path, split: str, max_images: int | None = None) -> list[ImageRecord]:
    """leftImg8bit/{split}/{city}/*_leftImg8bit.png with gtFine beside it.

    A split with no gtFine/{split} folder (Cityscapes' test split) is unlabelled; in a split that
    has one, a missing ground-truth file is an error of that image (reported when it is read).
    """
    image_dir = Path(root) / "leftImg8bit" / split
    if not image_dir.is_dir():
        raise DatasetError(
            f"no Cityscapes split at {image_dir}: set dataset.root to the folder that holds leftImg8bit/ "
            f"and gtFine/, and dataset.split to one of its splits (or run `python submit.py synth` for the demo set)"
        )
    labelled = (Path(root) / "gtFine" / split).is_dir()
    records = []
    for path in sorted(image_dir.glob(f"*/*{IMAGE_SUFFIX}")):
        city = path.parent.name
        image_id = path.name[: -len(IMAGE_SUFFIX)]
        gt_dir = Path(root) / "gtFine" / split / city
        gt = [gt_dir / f"{image_id}{LABEL_IDS_SUFFIX}", gt_dir / f"{image_id}{INSTANCE_IDS_SUFFIX}"] if labelled else []
        records.append(
            ImageRecord(
                image_id=image_id,
                group=city,
                image_path=str(path),
                label_ids_path=str(gt[0]) if labelled else None,
                instance_ids_path=str(gt[1]) if labelled else None,
                stamp=" ".join(_stamp(p) for p in [path, *gt]),
            )
        )
    if not records:
        raise DatasetError(f"{image_dir} holds no *{IMAGE_SUFFIX} files: the split is empty")
    _check_unique(records)
    return records[:max_images]


def _stamp(path: Path) -> str:
    """Size and modification time of a local file ("-" when it is missing: its image fails when read)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return "-"
    return f"{st.st_size}:{st.st_mtime_ns}"


def _check_unique(records: list[ImageRecord]) -> None:
    seen: dict[str, str] = {}
    for r in records:
        if r.image_id in seen:
            raise DatasetError(
                f"{seen[r.image_id]} and {r.image_path} have the same image id {r.image_id!r}, so their "
                "outputs would overwrite each other: rename or remove one of them"
            )
        seen[r.image_id] = r.image_path


_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")
MAX_PLAIN_ID = 120  # longer ids are cut (and hashed), so output names stay well under 255 bytes


def folder_image_ids(relative_paths: list[str]) -> list[str]:
    """Ids for files below a folder that cannot collide, and are safe as file names.

    The id is the relative path without its extension, '/' -> '__', other characters outside
    [A-Za-z0-9._-] -> '_'. Where that is lossy and two files meet (frame.png and frame.jpg,
    'a b' and 'a_b', sub/x and sub__x), or the result does not start with a letter or digit or
    is longer than MAX_PLAIN_ID (then cut), 8 hex digits of the path's SHA-1 are appended, so each
    file keeps its own id.
    """
    plain = [
        re.sub(r"\.\.+", ".", _UNSAFE.sub("_", "__".join(rel.rsplit(".", 1)[0].split("/")))) for rel in relative_paths
    ]
    count: dict[str, int] = {}
    for p in plain:
        count[p] = count.get(p, 0) + 1
    ids = []
    for rel, p in zip(relative_paths, plain):
        if count[p] > 1 or not p[:1].isalnum() or len(p) > MAX_PLAIN_ID:
            p = f"{p.lstrip('._-')[:MAX_PLAIN_ID] or 'image'}-{hashlib.sha1(rel.encode()).hexdigest()[:8]}"
        ids.append(p)
    return ids


def list_image_folder(root: Path | str, max_images: int | None = None) -> list[ImageRecord]:
    """Every png/jpg below `root`, a local folder or an object-store URI (see storage/uris.py);
    the id is the relative path with separators replaced, so it stays unique and safe as a file name."""
    if uris.is_uri(root):
        if not uris.exists(str(root)):
            raise DatasetError(
                f"{root} does not exist (or is not reachable): check the URI, its options and credentials"
            )
        files = uris.list_files(str(root), FOLDER_IMAGE_EXTENSIONS)
    else:
        root = Path(root)
        if not root.is_dir():
            raise DatasetError(f"image folder {root} does not exist: set dataset.root")
        files = [
            (p.relative_to(root).as_posix(), str(p), _stamp(p))
            for p in sorted(root.rglob("*"))
            if p.suffix.lower() in FOLDER_IMAGE_EXTENSIONS and p.is_file()
        ]
    records = [
        ImageRecord(image_id=image_id, group="images", image_path=location, stamp=stamp)
        for image_id, (_, location, stamp) in zip(folder_image_ids([f[0] for f in files]), files)
    ]
    if not records:
        raise DatasetError(f"{root} holds no images ({', '.join(FOLDER_IMAGE_EXTENSIONS)})")
    records.sort(key=lambda r: r.image_id)
    _check_unique(records)
    return records[:max_images]


def list_dataset(kind: str, root: Path | str, split: str, max_images: int | None) -> list[ImageRecord]:
    if kind == "cityscapes":
        return list_cityscapes(root, split, max_images)
    return list_image_folder(root, max_images)
