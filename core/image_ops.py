"""Image operations the labelling and the evaluators share, each done as its reference does it."""

import cv2
import numpy as np
from PIL import Image


def lookup(values: np.ndarray, table: np.ndarray) -> np.ndarray:
    """table[values] for an (H, W) uint8 map and a 256-entry table: OpenCV's LUT, several times numpy's
    gather (`bench/bench_label.py` part 3)."""
    if values.ndim != 2 or values.size == 0:
        return table[values]
    return cv2.LUT(np.ascontiguousarray(values), table).reshape(values.shape)


def histogram(values: np.ndarray) -> np.ndarray:
    """(at least 256,) int64 count of each value of a map of non-negative integers: for an (H, W)
    uint8 map OpenCV's calcHist, several times numpy's bincount (`bench/bench_label.py` part 3). Its
    float32 bins count exactly up to 2**24, so larger maps, and other types, use bincount."""
    if values.dtype != np.uint8 or values.size >= 1 << 24 or values.ndim != 2:
        return np.bincount(values.ravel(), minlength=256)
    return cv2.calcHist([np.ascontiguousarray(values)], [0], None, [256], [0, 256]).ravel().astype(np.int64)


def connected_components(mask: np.ndarray, connectivity: int) -> tuple[np.ndarray, int]:
    """(labels (H, W) int32, count) of a mask's components (bool, or uint8 nonzero), numbered 1.. in raster order of
    each component's first pixel: what `scipy.ndimage.label` gives (with a 3 x 3 structure for 8).

    OpenCV's SAUF scan (Wu et al.) is the one of its algorithms that numbers in raster order; its
    block-based ones (BBDT, Spaghetti) number by 2 x 2 blocks and would renumber instances. About 3x
    scipy's per call (`bench/bench_label.py` part 3); tests/test_panoptic.py checks it against scipy.
    """
    n, labels = cv2.connectedComponentsWithAlgorithm(mask.view(np.uint8), connectivity, cv2.CV_32S, cv2.CCL_SAUF)
    return labels, n - 1


def resize_nearest(array: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """(h, w) -> hw with PIL NEAREST, as the script does; same dtype (uint8 or anything fitting int32)."""
    if array.shape == tuple(hw):
        return array.copy()
    # PIL has no int64 mode; instanceIds fit in int32, which PIL resizes as mode "I".
    src = array if array.dtype == np.uint8 else array.astype(np.int32)
    return np.asarray(Image.fromarray(src).resize((hw[1], hw[0]), Image.NEAREST)).astype(array.dtype)
