"""Reading and writing images and label maps, with errors that name the file and the fix."""

import io
import os
import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from core.classes import LABEL_ID_TO_TRAIN_ID, MAX_LABEL_ID
from core.errors import UserError
from core.evaluation.base import GroundTruth
from core.panoptic import gt_panoptic
from storage import uris


class InputError(UserError):
    """One input item cannot be used. The message names the file and what to do about it."""


@dataclass(frozen=True)
class ImageLimits:
    """What an image may be, checked from its header before it is decoded (`read_rgb`)."""

    max_pixels: int  # dataset.max_image_pixels
    max_aspect_ratio: float  # dataset.max_aspect_ratio
    # (height, width) -> what else is wrong with that size (the config's patch grid and windows:
    # `configs.geometry.image_limits`), naming the limit and its key; None: nothing
    size_problem: Callable[[int, int], str | None] | None = None

    def too_large(self, pixels: str) -> str:
        return (
            f"image too large: {pixels} pixels, more than dataset.max_image_pixels={self.max_pixels:,}; downscale "
            "it, or raise dataset.max_image_pixels (each image is decoded whole: 3 bytes a pixel)"
        )

    def problem(self, height: int, width: int) -> str | None:
        """What is wrong with an image of this size, or None."""
        if height * width > self.max_pixels:
            return self.too_large(f"{height}x{width} px = {height * width:,}")
        ratio = max(height, width) / max(1, min(height, width))
        if ratio > self.max_aspect_ratio:
            return (
                f"extreme aspect ratio: {height}x{width} px is {ratio:,.1f}:1, more than "
                f"dataset.max_aspect_ratio={self.max_aspect_ratio:g}; crop it into pieces of a usual shape, or "
                "raise dataset.max_aspect_ratio"
            )
        return self.size_problem(height, width) if self.size_problem else None


def _open_image(source, limits: ImageLimits) -> Image.Image:
    """Image.open (the header only) with PIL's decompression-bomb check following our limit: PIL
    warns above its Image.MAX_IMAGE_PIXELS and raises DecompressionBombError above twice it, as the
    file opens. With it set to dataset.max_image_pixels while the file opens, our check
    (`ImageLimits.problem`, right after) decides, and PIL's error, above twice our limit, is
    reported as the same input problem. (PIL's limit is a module global: the readers here run one
    image at a time per worker process.)"""
    pil_limit, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, limits.max_pixels
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # refused next, before decoding
            return Image.open(source)
    finally:
        Image.MAX_IMAGE_PIXELS = pil_limit


def read_rgb(path: Path | str, limits: ImageLimits) -> np.ndarray:
    """(H, W, 3) uint8 from a local path or an object-store URI, its size checked against `limits`
    before it is decoded. Opaque RGBA is accepted (alpha dropped); grayscale, translucent and
    corrupt images are not."""
    try:
        with _open_image(io.BytesIO(uris.read_bytes(str(path))) if uris.is_uri(path) else path, limits) as img:
            if problem := limits.problem(img.height, img.width):
                raise InputError(f"{path}: {problem}")
            img.load()  # decodes now, so a truncated file fails here and not later
            mode = img.mode
            if mode == "RGBA":
                alpha = np.asarray(img.getchannel("A"))
                if alpha.min() < 255:
                    raise InputError(
                        f"{path}: RGBA image with transparent pixels; flatten it onto a background and save it as RGB"
                    )
                img = img.convert("RGB")
            elif mode in ("L", "LA", "I", "I;16", "F", "1"):
                raise InputError(
                    f"{path}: grayscale image (mode {mode}); the model needs RGB colour images: convert it (e.g. "
                    "PIL .convert('RGB')) or remove it"
                )
            elif mode != "RGB":
                img = img.convert("RGB")
            return np.asarray(img, dtype=np.uint8)
    except FileNotFoundError:
        raise InputError(f"{path}: image file is missing; check dataset.root and the split") from None
    except InputError:
        raise
    except Image.DecompressionBombError:
        raise InputError(f"{path}: {limits.too_large(f'over {2 * limits.max_pixels:,}')}") from None
    except (OSError, SyntaxError, ValueError) as err:  # PIL's errors for corrupt / truncated / unknown files
        raise InputError(
            f"{path}: cannot decode image ({err}); the file is corrupt or truncated: re-copy it or remove it"
        ) from None


def _decode_ground_truth(
    path: Path, what: str, missing_fix: str, expected_hw: tuple[int, int]
) -> tuple[np.ndarray, str]:
    """A ground-truth PNG of its image's size -> (its array, its PIL mode). A missing, undecodable
    or other-sized file raises InputError naming the file, `what` it is and the fix; the size is
    checked from the header, before it is decoded."""

    def other_size(size: str) -> InputError:
        return InputError(
            f"{path}: {what} is {size} but its image is {expected_hw[0]}x{expected_hw[1]}; they must be "
            "the same size (is it the right file?)"
        )

    try:
        with Image.open(path) as img:
            if (img.height, img.width) != tuple(expected_hw):
                raise other_size(f"{img.height}x{img.width}")
            img.load()
            return np.asarray(img), img.mode
    except FileNotFoundError:
        raise InputError(f"{path}: {what} is missing; {missing_fix}") from None
    except Image.DecompressionBombError as err:  # PIL refused it as it opened: far larger than its image
        raise other_size(f"too large ({err})") from None
    except (OSError, SyntaxError, ValueError) as err:
        raise InputError(f"{path}: cannot decode {what} ({err}); the file is corrupt or truncated") from None


def read_label_ids(label_ids_path: Path, expected_hw: tuple[int, int]) -> np.ndarray:
    """Cityscapes `*_gtFine_labelIds.png` -> (H, W) uint8 labelIds."""
    label_ids, mode = _decode_ground_truth(
        label_ids_path, "ground truth", "add it, or run on unlabelled data with dataset.kind=folder", expected_hw
    )
    if mode not in ("L", "P"):
        raise InputError(
            f"{label_ids_path}: labelIds must be a single-channel 8-bit PNG, found mode {mode}; "
            "use the gtFine *_labelIds.png files, not the *_color.png ones"
        )
    label_ids = label_ids.astype(np.uint8)
    if label_ids.max() > MAX_LABEL_ID:
        raise InputError(
            f"{label_ids_path}: unknown labelId {int(label_ids.max())} (Cityscapes labelIds are 0..{MAX_LABEL_ID}); "
            "is this a trainIds or colour map instead of *_labelIds.png?"
        )
    return label_ids


def read_train_ids(label_ids_path: Path, expected_hw: tuple[int, int]) -> np.ndarray:
    """Cityscapes `*_gtFine_labelIds.png` -> (H, W) uint8 trainIds (255 = ignore)."""
    return LABEL_ID_TO_TRAIN_ID[read_label_ids(label_ids_path, expected_hw)]


def read_instance_ids(instance_ids_path: Path, expected_hw: tuple[int, int]) -> np.ndarray:
    """Cityscapes `*_gtFine_instanceIds.png` -> (H, W) int32 (labelId * 1000 + n on instances, else labelId)."""
    ids, mode = _decode_ground_truth(
        instance_ids_path,
        "instance ground truth",
        "panoptic scores need the gtFine *_instanceIds.png beside *_labelIds.png",
        expected_hw,
    )
    if mode not in ("I;16", "I;16B", "I"):
        raise InputError(
            f"{instance_ids_path}: instanceIds must be a 16-bit PNG (ids are labelId * 1000 + n), found mode "
            f"{mode}; use the gtFine *_instanceIds.png files as Cityscapes ships them"
        )
    return ids.astype(np.int32)


def read_ground_truth(label_ids_path: Path, instance_ids_path: Path, expected_hw: tuple[int, int]) -> GroundTruth:
    """Both ground-truth maps of an image, after checking that they agree (every pixel's instanceId
    names its labelId)."""
    label_ids = read_label_ids(label_ids_path, expected_hw)
    instance_ids = read_instance_ids(instance_ids_path, expected_hw)
    try:
        panoptic = gt_panoptic(instance_ids, label_ids)
    except ValueError as err:
        raise InputError(
            f"{instance_ids_path}: {err} (against {label_ids_path}); the two files must come from the same "
            "Cityscapes image"
        ) from None
    return GroundTruth(label_ids, LABEL_ID_TO_TRAIN_ID[label_ids], instance_ids, panoptic)


_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def safe_path(root: Path, *parts: str) -> Path:
    """root/parts..., refusing names from data that could leave `root` (.., absolute paths, separators)."""
    for part in parts:
        if not _SAFE_NAME.match(part) or ".." in part:
            raise InputError(
                f"unsafe name {part!r} in an output path; names from data may use letters, digits, '.', '_' and "
                "'-' only"
            )
    path = root.joinpath(*parts)
    if not path.resolve().is_relative_to(root.resolve()):
        raise InputError(f"output path {path} would leave the output directory {root}")
    return path


def write_png_atomic(array: np.ndarray, path: Path) -> None:
    """uint8 (H,W) / (H,W,3) or uint16 (H,W) array -> PNG, via a temporary file renamed into place."""
    if array.dtype not in (np.uint8, np.uint16):
        raise TypeError(f"PNG arrays must be uint8 or uint16, got {array.dtype}")  # Pillow cannot write int32 PNGs
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    # zlib level 1: label maps are flat regions, so the files stay small (a few % larger than at
    # the default 6) while encoding takes a fraction of the time; every PNG reader decodes them.
    Image.fromarray(array).save(tmp, format="PNG", compress_level=1)
    os.replace(tmp, path)
