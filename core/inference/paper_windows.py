"""The paper's window layout for its CAUSE baseline (mbps_pytorch/generate_semantic_pseudolabels_cause.py):
each scale's stretched size, its windows' starts, and the size the scales are merged at. Pure geometry,
no torch: extract's CPU steps cut these windows.
"""

import numpy as np

from core.inference.windows import ScaleLayout, resize_rgb


def paper_scale_size(height: int, width: int, scale: float, crop: int, patch: int) -> tuple[int, int]:
    """The paper's size at scale s: each side round(side * crop / short * s), down to a multiple of
    the patch, at least the crop (Python's round, as the script)."""
    base = crop / min(height, width)
    return tuple(max(crop, int(round(side * base * scale)) // patch * patch) for side in (height, width))


def paper_common_size(height: int, width: int, crop: int, patch: int) -> tuple[int, int]:
    """The size the paper merges the scales at (the 1.0 scale's, without the crop floor)."""
    base = crop / min(height, width)
    return tuple(int(round(side * base)) // patch * patch for side in (height, width))


def paper_window_starts(length: int, crop: int) -> list[int]:
    """range(0, length - crop, crop // 2), then length - crop if the last window falls short."""
    if length <= crop:
        return [0]
    starts = list(range(0, length - crop, crop // 2))
    if starts[-1] + crop < length:
        starts.append(length - crop)
    return sorted(set(starts))


def paper_scale_layout(height: int, width: int, scale: float, crop: int, patch: int) -> ScaleLayout:
    h, w = paper_scale_size(height, width, scale, crop, patch)
    ys, xs = paper_window_starts(h, crop), paper_window_starts(w, crop)
    return ScaleLayout(min(h, w), (h, w), (h // patch, w // patch), (h, w), tuple((y, x) for y in ys for x in xs))


def paper_scale_windows(image: np.ndarray, layouts: list[ScaleLayout], crop: int) -> np.ndarray:
    """(H, W, 3) uint8 -> the windows of each layout, (N, crop, crop, 3) uint8, in layout order."""
    windows = []
    for layout in layouts:
        resized = resize_rgb(image, layout.resized)
        windows += [resized[y : y + crop, x : x + crop] for y, x in layout.origins]
    return np.ascontiguousarray(np.stack(windows)) if windows else np.zeros((0, crop, crop, 3), np.uint8)


def is_one_window(layout: ScaleLayout, crop: int) -> bool:
    """A scale stretched to exactly one crop x crop window: the script keeps its patch logits as they are."""
    return layout.resized == (crop, crop)
