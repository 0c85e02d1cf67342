"""Image windows for dense patch features, without the model: resize, pad, cut, and stitch back.

This tool's own scheme (not CAUSE's test code, which resizes NEAREST and scores one 322 centre
crop, nor exactly the paper's, which upsamples each window to pixels before pooling; see
docs/protocols.md): the short side is resized (322 for Cityscapes, giving
322x644), square windows (322) slide with a stride (161, 50 % overlap) over the reflect-padded
image, and each window is also run flipped. Window features are averaged where windows overlap. Because the
stride need not be a multiple of the patch size (161 = 11.5 x 14), averaging happens on a grid
of cells of gcd(patch, stride) pixels (7 px for 14 px patches and a 161 stride) and is pooled back to the patch grid,
so every window's patches land where they belong. A 1024x2048 image gives a 23x46 patch grid.

The `paper` protocol (core.presets) merges as the paper's scripts do instead (`merge="pixels"`):
each window's patch map is upsampled bilinearly to its pixels, the windows are averaged per
pixel over the resized image, and that pixel map is average-pooled (adaptive_avg_pool2d) to the
patch grid, a [1/8, 3/4, 1/8] blur of each window's patches per axis. Every step is linear and
the windows form a grid, so each is a small matrix per axis (`window_axis_weights`): the pixel
map is never held at feature width.

The work is three steps, so that a pipeline can run each where it belongs:
  `cut_windows`    CPU: resize (PIL bilinear, antialiased), pad, cut uint8 windows;
  `core.inference.dense.WindowModel`  device: normalise, flip, run the model on windows of many images;
  `stitch_windows` CPU: average the window features back onto each scale's patch grid.
This module needs no torch, so the CPU steps' workers start without importing it.
"""

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image


@dataclass(frozen=True)
class WindowSpec:
    short_side: int
    crop: int
    stride: int
    flip: bool = True
    batch_size: int = 8  # windows per forward pass
    precision: str = "fp32"  # fp16 / bf16 autocast on CUDA only
    merge: str = "cells"  # how `stitch_windows` merges overlapping windows: "cells" | "pixels" (the paper's)
    flip_dims: int | None = None  # flip-average only the first this many feature channels (None: all)


@dataclass(frozen=True)
class ScaleLayout:
    """Where one scale's windows sit: enough to stitch their features without the image."""

    short_side: int
    resized: tuple[int, int]  # (h, w) after resizing
    grid: tuple[int, int]  # (gh, gw) patch grid
    padded: tuple[int, int]  # (H', W') covering every window
    origins: tuple[tuple[int, int], ...]  # (y0, x0) of each window, row-major

    def to_dict(self) -> dict:
        return {
            "short_side": self.short_side,
            "resized": list(self.resized),
            "grid": list(self.grid),
            "padded": list(self.padded),
            "origins": [list(o) for o in self.origins],
        }

    @classmethod
    def from_dict(cls, d: dict) -> "ScaleLayout":
        return cls(
            d["short_side"],
            tuple(d["resized"]),
            tuple(d["grid"]),
            tuple(d["padded"]),
            tuple(tuple(o) for o in d["origins"]),
        )


@dataclass
class StoredWindows:
    """An image's windows as the paper protocol keeps them: the base scale's (for the overclusters'
    pixel labels) and the paper's own windows at 1.0 and at each baseline scale (for the baseline's
    rows by its CAUSE script, core.labelling.paper_baseline)."""

    windows: np.ndarray  # (N, D, g, g) float32, the base scale's
    axis_weights: tuple[list[np.ndarray], list[np.ndarray]]  # their `layout_axis_weights`
    layout: ScaleLayout
    single: tuple[np.ndarray, ScaleLayout] | None = None  # the paper's windows at 1.0 and their layout
    scales: list[tuple[np.ndarray, ScaleLayout]] = ()  # per `configs.geometry.paper_baseline_scales` entry


def resized_size(height: int, width: int, short_side: int) -> tuple[int, int]:
    """Keep the aspect ratio; the short side becomes `short_side` (1024x2048 -> 322x644)."""
    scale = short_side / min(height, width)
    return max(1, round(height * scale)), max(1, round(width * scale))


def patch_grid(height: int, width: int, short_side: int, patch_size: int) -> tuple[int, int]:
    """Patch-grid size of an image after resizing: ceil of the resized size over the patch size."""
    h, w = resized_size(height, width, short_side)
    return math.ceil(h / patch_size), math.ceil(w / patch_size)


def window_starts(length: int, crop: int, stride: int) -> list[int]:
    """Starts of windows covering [0, length) when length >= crop (last window may overhang; padded)."""
    n = max(1, math.ceil((length - crop) / stride) + 1)
    return [i * stride for i in range(n)]


def scale_short_sides(spec: WindowSpec, scales: list[float], patch_size: int) -> list[int]:
    """The short side of each scale, in the order given."""
    return [max(patch_size, round(spec.short_side * s)) for s in scales]


def window_count(height: int, width: int, short_side: int, spec: WindowSpec, patch_size: int) -> int:
    """How many windows `window_layout` cuts, without listing them."""
    gh, gw = patch_grid(height, width, short_side, patch_size)
    return math.prod(len(window_starts(g * patch_size, spec.crop, spec.stride)) for g in (gh, gw))


def window_layout(height: int, width: int, short_side: int, spec: WindowSpec, patch_size: int) -> ScaleLayout:
    h, w = resized_size(height, width, short_side)
    gh, gw = math.ceil(h / patch_size), math.ceil(w / patch_size)
    # windows cover the whole patch grid, so the last partial patch gets features too
    ys = window_starts(gh * patch_size, spec.crop, spec.stride)
    xs = window_starts(gw * patch_size, spec.crop, spec.stride)
    return ScaleLayout(
        short_side, (h, w), (gh, gw), (ys[-1] + spec.crop, xs[-1] + spec.crop), tuple((y, x) for y in ys for x in xs)
    )


def cause_view(array: np.ndarray, short_side: int, crop: int) -> np.ndarray:
    """CAUSE's test view of an image or a label map (uint8, (H, W[, 3])): torchvision's
    Resize(short_side, NEAREST) (the long side truncated: int(short * long / short_len)) then
    CenterCrop(crop) (top-left at round((size - crop) / 2))."""
    h, w = array.shape[:2]
    size = (short_side, int(short_side * w / h)) if h <= w else (int(short_side * h / w), short_side)
    resized = np.asarray(Image.fromarray(array).resize((size[1], size[0]), Image.NEAREST))
    top, left = int(round((size[0] - crop) / 2.0)), int(round((size[1] - crop) / 2.0))
    return np.ascontiguousarray(resized[top : top + crop, left : left + crop])


def resize_rgb(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(H, W, 3) uint8 -> (h, w, 3) uint8, PIL bilinear (antialiased when shrinking), as the paper resizes."""
    if image.shape[:2] == tuple(size):
        return image
    return np.asarray(Image.fromarray(image).resize((size[1], size[0]), Image.BILINEAR))


def _pad(image: np.ndarray, pad_h: int, pad_w: int) -> np.ndarray:
    """Reflect padding at the bottom/right; replicate where the image is too small to reflect."""
    if pad_h == 0 and pad_w == 0:
        return image
    mode = "reflect" if pad_h < image.shape[0] and pad_w < image.shape[1] else "edge"
    return np.pad(image, ((0, pad_h), (0, pad_w), (0, 0)), mode=mode)


def cut_windows(
    image: np.ndarray, spec: WindowSpec, patch_size: int, short_sides: list[int]
) -> tuple[np.ndarray, list[ScaleLayout]]:
    """(H, W, 3) uint8 -> every scale's windows (N, crop, crop, 3) uint8 and one layout per scale."""
    windows, layouts = [], []
    for short in short_sides:
        layout = window_layout(image.shape[0], image.shape[1], short, spec, patch_size)
        (h, w), (ph, pw) = layout.resized, layout.padded
        padded = _pad(resize_rgb(image, (h, w)), ph - h, pw - w)
        windows += [padded[y : y + spec.crop, x : x + spec.crop] for y, x in layout.origins]
        layouts.append(layout)
    return np.ascontiguousarray(np.stack(windows)), layouts


def bilinear_upsample_weights(out_len: int, in_len: int) -> np.ndarray:
    """(out_len, in_len) float64: bilinear interpolation with align_corners=False (torch's
    F.interpolate), out pixel i sampling input coordinate (i + 0.5) * in_len / out_len - 0.5,
    clamped to the edge values."""
    u = np.clip((np.arange(out_len) + 0.5) * in_len / out_len - 0.5, 0, in_len - 1)
    lo = np.floor(u).astype(np.int64)
    hi = np.minimum(lo + 1, in_len - 1)
    w = np.zeros((out_len, in_len))
    np.add.at(w, (np.arange(out_len), lo), 1 - (u - lo))
    np.add.at(w, (np.arange(out_len), hi), u - lo)
    return w


def adaptive_pool_weights(out_len: int, in_len: int) -> np.ndarray:
    """(out_len, in_len) float64: adaptive_avg_pool's bins, [floor(i L / n), ceil((i + 1) L / n))."""
    w = np.zeros((out_len, in_len))
    for i in range(out_len):
        a, b = (i * in_len) // out_len, -(-((i + 1) * in_len) // out_len)
        w[i, a:b] = 1.0 / (b - a)
    return w


def window_axis_weights(length: int, starts: list[int], crop: int, patch_size: int) -> list[np.ndarray]:
    """Along one axis of the resized image (`length` px): per window start, the (length, crop/p)
    matrix taking the window's patches to the pixel map, bilinear upsampling divided by how many
    windows cover each pixel. The pixel map of an image is sum_w Wy[w] f_w Wx[w]^T."""
    up = bilinear_upsample_weights(crop, crop // patch_size)
    cover = np.zeros(length)
    placed = []
    for s in starts:
        m = np.zeros((length, up.shape[1]))
        inside = min(length, s + crop) - s
        if inside > 0:
            m[s : s + inside] = up[:inside]
            cover[s : s + inside] += 1
        placed.append(m)
    return [m / np.maximum(cover, 1)[:, None] for m in placed]


def layout_axis_weights(layout: ScaleLayout, crop: int, patch_size: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Per window (in `origins` order): its row and column matrices of `window_axis_weights`."""
    ys = sorted({y for y, _ in layout.origins})
    xs = sorted({x for _, x in layout.origins})
    wy = dict(zip(ys, window_axis_weights(layout.resized[0], ys, crop, patch_size)))
    wx = dict(zip(xs, window_axis_weights(layout.resized[1], xs, crop, patch_size)))
    return [wy[y] for y, _ in layout.origins], [wx[x] for _, x in layout.origins]


def _stitch_by_pixels(feats: np.ndarray, layout: ScaleLayout, crop: int, patch_size: int) -> np.ndarray:
    """The paper's merge: pixel map of the windows, adaptive-average-pooled to the patch grid."""
    (h, w), (gh, gw) = layout.resized, layout.grid
    rows, cols = layout_axis_weights(layout, crop, patch_size)
    pool_y, pool_x = adaptive_pool_weights(gh, h), adaptive_pool_weights(gw, w)
    out = np.zeros((feats.shape[1], gh, gw))
    for feat, wy, wx in zip(feats, rows, cols):
        out += np.einsum("ij,djk,lk->dil", pool_y @ wy, feat, pool_x @ wx, optimize=True)
    return out.astype(np.float32)


def stitch_windows(
    window_features: np.ndarray,
    layouts: list[ScaleLayout],
    crop: int,
    stride: int,
    patch_size: int,
    merge: str = "cells",
) -> list[tuple[np.ndarray, tuple[int, int]]]:
    """One image's window features (N, D, crop/p, crop/p), in `cut_windows` order -> per scale
    (features (D, gh, gw) float32, resized (h, w)). merge: "cells" (this tool's) or "pixels" (the paper's)."""
    if merge not in ("cells", "pixels"):
        raise ValueError(f"unknown window merge {merge!r}; allowed: cells, pixels")
    cell = math.gcd(patch_size, stride)  # averaging grid that every window aligns to
    up, n = patch_size // cell, crop // cell
    grids, start = [], 0
    for layout in layouts:
        feats = window_features[start : start + len(layout.origins)].astype(np.float32, copy=False)
        start += len(layout.origins)
        if merge == "pixels":
            grids.append((_stitch_by_pixels(feats, layout, crop, patch_size), layout.resized))
            continue
        d = feats.shape[1]
        ph, pw = layout.padded
        total = np.zeros((d, ph // cell, pw // cell), np.float32)
        count = np.zeros((ph // cell, pw // cell), np.float32)
        for (y0, x0), feat in zip(layout.origins, feats):
            cells = feat.repeat(up, axis=1).repeat(up, axis=2) if up > 1 else feat  # (D, crop/cell, crop/cell)
            cy, cx = y0 // cell, x0 // cell
            total[:, cy : cy + n, cx : cx + n] += cells
            count[cy : cy + n, cx : cx + n] += 1
        mean = total / count  # (D, H'/cell, W'/cell)
        if up > 1:  # pool the cells back to whole patches: (D, H'//p, W'//p)
            qh, qw = ph // patch_size, pw // patch_size
            mean = mean[:, : qh * up, : qw * up].reshape(d, qh, up, qw, up).mean(axis=(2, 4))
        gh, gw = layout.grid
        grids.append((np.ascontiguousarray(mean[:, :gh, :gw]), layout.resized))
    if start != len(window_features):
        raise ValueError(f"{len(window_features)} window features for layouts of {start} windows")
    return grids
