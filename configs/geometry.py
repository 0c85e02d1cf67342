"""Config -> windows, scales and image limits: what every stage derives from the inference settings (no torch)."""

import json
import math
from functools import partial

import numpy as np

from configs.schema import ConfigError, RunConfig
from core.errors import UserError
from core.inference.paper_windows import paper_scale_layout
from core.inference.windows import (
    ScaleLayout,
    StoredWindows,
    WindowSpec,
    layout_axis_weights,
    patch_grid,
    scale_short_sides,
    window_count,
    window_layout,
)
from core.presets import protocol_steps
from storage.images import ImageLimits


def window_spec(cfg: RunConfig) -> WindowSpec:
    """The windows, precision and merge of the config's inference section under its protocol."""
    inference, steps = cfg.inference, protocol_steps(cfg.protocol)
    return WindowSpec(
        short_side=inference.short_side,
        crop=inference.crop,
        stride=inference.stride,
        flip=inference.flip,
        batch_size=inference.batch_size,
        precision=steps.precision or inference.precision,
        merge=steps.merge,
    )


def feature_scales(cfg: RunConfig) -> list[float]:
    """The scales whose patch grids the fits label. The paper labels its overclusters at one scale;
    its multi-scale scheme is the baseline's (`paper_baseline_scales`)."""
    return [1.0] if cfg.protocol == "paper" else cfg.inference.scales


def extracted_scales(cfg: RunConfig) -> list[float]:
    """The scales extract writes: 1.0 first (the grid the fit uses), then the other feature scales."""
    return [1.0, *(s for s in feature_scales(cfg) if s != 1.0)]


def extracted_short_sides(cfg: RunConfig) -> list[int]:
    return scale_short_sides(window_spec(cfg), extracted_scales(cfg), cfg.model.vit.patch_size)


def stores_windows(cfg: RunConfig) -> bool:
    """Whether extract also keeps each image's window features: the paper's pixel labels are made
    from the windows' pixel map, which the merged patch grid cannot give back."""
    return protocol_steps(cfg.protocol).merge == "pixels"


def paper_baseline_scales(cfg: RunConfig) -> list[float]:
    """The scales of the paper's multi-scale baseline rows (protocol=paper with inference.scales other
    than [1.0]; core.labelling.paper_baseline), else none. As the paper's --scales: a single 0.75 is multi-scale."""
    return list(cfg.inference.scales) if cfg.protocol == "paper" and cfg.inference.scales != [1.0] else []


def paper_window_scales(cfg: RunConfig) -> list[float]:
    """The scales whose paper windows the baseline's paper rows use (protocol=paper): 1.0 for its
    one-scale rows and each of `paper_baseline_scales`, ascending."""
    return sorted({1.0, *paper_baseline_scales(cfg)}) if cfg.protocol == "paper" else []


def paper_scale_layouts(
    cfg: RunConfig, image_hw: tuple[int, int]
) -> tuple[ScaleLayout, dict[float, ScaleLayout | None]]:
    """The base scale's layout, and per `paper_window_scales` entry the paper's window layout, or
    None where it equals the base scale's windows (1.0 on 1024x2048), which are then reused."""
    spec, patch = window_spec(cfg), cfg.model.vit.patch_size
    base = window_layout(*image_hw, spec.short_side, spec, patch)
    layouts = {s: paper_scale_layout(*image_hw, s, spec.crop, patch) for s in paper_window_scales(cfg)}
    return base, {
        s: None if (a.resized, a.padded, a.origins) == (base.resized, base.padded, base.origins) else a
        for s, a in layouts.items()
    }


def extra_paper_layouts(cfg: RunConfig, image_hw: tuple[int, int]) -> list[ScaleLayout]:
    """The paper's scales whose windows extract cuts beside the base scale's, in `paper_window_scales` order."""
    return [layout for layout in paper_scale_layouts(cfg, image_hw)[1].values() if layout is not None]


def stored_window_count(cfg: RunConfig, row: dict, paper_scales: bool = True) -> int:
    """How many of a row's windows the paper protocol stores: the base scale's, then (paper_scales)
    the extra seed scales'."""
    hw = (int(row["height"]), int(row["width"]))
    base = len(json.loads(row["layouts"])[0]["origins"])
    return base + (sum(len(layout.origins) for layout in extra_paper_layouts(cfg, hw)) if paper_scales else 0)


def pack_windows(window_features: np.ndarray, num_windows: int) -> np.ndarray:
    """The stored windows (N, D, g, g) side by side as one (D, g, N*g) float16 grid: how the
    paper protocol stores them (extract's `_windows/` Parquet) for the label pass."""
    return np.concatenate(list(window_features[:num_windows]), axis=2).astype(np.float16)


def unpack_windows(
    cfg: RunConfig, packed: np.ndarray, image_hw: tuple[int, int], paper_scales: bool = True
) -> StoredWindows:
    """`pack_windows`' grid -> the base scale's windows and, with paper_scales (what extract stores;
    apply keeps the base scale's only unless it writes features), each paper scale's."""
    spec, patch = window_spec(cfg), cfg.model.vit.patch_size
    layout, per_scale = paper_scale_layouts(cfg, image_hw)
    per_scale = per_scale if paper_scales else {}
    side = spec.crop // patch
    windows = packed.astype(np.float32).reshape(packed.shape[0], side, -1, side).transpose(2, 0, 1, 3)
    expected = len(layout.origins) + sum(len(s.origins) for s in per_scale.values() if s is not None)
    if len(windows) != expected:
        raise UserError(
            f"{len(windows)} stored windows for a {image_hw[0]}x{image_hw[1]} image whose layouts have "
            f"{expected}; re-run extract on a new output_dir"
        )
    start, by_scale = len(layout.origins), {}
    for scale, scale_layout in per_scale.items():
        if scale_layout is None:
            by_scale[scale] = (windows[: len(layout.origins)], layout)
        else:
            by_scale[scale] = (windows[start : start + len(scale_layout.origins)], scale_layout)
            start += len(scale_layout.origins)
    return StoredWindows(
        windows[: len(layout.origins)],
        layout_axis_weights(layout, spec.crop, patch),
        layout,
        single=by_scale.get(1.0),
        scales=[by_scale[s] for s in paper_baseline_scales(cfg)] if by_scale else [],
    )


HEAD_FEATURE_DIM = 90  # CAUSE Segment_TR output


def feature_dim(cfg: RunConfig) -> int:
    """The dimension of the model's patch features."""
    return HEAD_FEATURE_DIM if cfg.model.feature_kind == "head" else cfg.model.vit.embed_dim


def label_scales(cfg: RunConfig) -> list[float]:
    """The scales the label pass averages, the one closest to 1 first (single-scale steps use it)."""
    return sorted(feature_scales(cfg), key=lambda s: abs(s - 1.0))


def label_short_sides(cfg: RunConfig) -> list[int]:
    return scale_short_sides(window_spec(cfg), label_scales(cfg), cfg.model.vit.patch_size)


def image_window_count(cfg: RunConfig, image_hw: tuple[int, int], extra_views: bool = True) -> int:
    """The windows an image of this size is cut into (`actors.extract.image_windows`): every
    extracted scale's and, with extra_views, the paper baseline's and CAUSE's crop (twice)."""
    spec, patch = window_spec(cfg), cfg.model.vit.patch_size
    count = sum(window_count(*image_hw, short, spec, patch) for short in extracted_short_sides(cfg))
    # the extra views are listed window by window: only for an image whose scales are within the limit
    if extra_views and count <= cfg.inference.max_windows_per_image:
        count += sum(len(layout.origins) for layout in extra_paper_layouts(cfg, image_hw))
        count += 2 if protocol_steps(cfg.protocol).cause_crop else 0
    return count


def _size_problem(cfg: RunConfig, extra_views: bool, height: int, width: int) -> str | None:
    """What the config makes of an image of this size that it cannot use: no pixel for a patch of
    its grid, or more windows than inference.max_windows_per_image."""
    grid = patch_grid(height, width, cfg.inference.short_side, cfg.model.vit.patch_size)
    if height < grid[0] or width < grid[1]:
        return (
            f"the image is {height}x{width} px, fewer pixels than its {grid[0]}x{grid[1]} patch grid, so no "
            "patch gets a label; use images of at least the patch grid's size, or lower inference.short_side"
        )
    windows, limit = image_window_count(cfg, (height, width), extra_views), cfg.inference.max_windows_per_image
    if windows > limit:
        return (
            f"a {height}x{width} px image is cut into {windows} windows at "
            f"inference.scales={cfg.inference.scales}, more than inference.max_windows_per_image={limit}; "
            "downscale or crop it, or raise inference.max_windows_per_image (each window is one model pass and "
            "its features)"
        )
    return None


def image_limits(cfg: RunConfig, extra_views: bool = True) -> ImageLimits:
    """The checks every image passes, from its header before it is decoded: its pixels, its aspect
    ratio, one pixel per patch, and the windows it is cut into (extra_views: as `image_window_count`)."""
    return ImageLimits(
        cfg.dataset.max_image_pixels, cfg.dataset.max_aspect_ratio, partial(_size_problem, cfg, extra_views)
    )


def image_limit_settings(cfg: RunConfig) -> dict:
    """The limits that decide which images a stage takes (a stage's plan records them): raised,
    they let in images that failed, so the stage's results are not those of the lower limits."""
    return {
        "max_image_pixels": cfg.dataset.max_image_pixels,
        "max_aspect_ratio": cfg.dataset.max_aspect_ratio,
        "max_windows_per_image": cfg.inference.max_windows_per_image,
    }


def refuse_limits_no_image_meets(cfg: RunConfig) -> None:
    """Refuse, before any image is read, limits under which every image would fail: a square image
    needs the fewest pixels (one per patch of its grid) and is cut into the fewest windows."""
    side = math.ceil(cfg.inference.short_side / cfg.model.vit.patch_size)  # the smallest square that passes the grid
    if side * side > cfg.dataset.max_image_pixels:
        raise ConfigError(
            f"dataset.max_image_pixels={cfg.dataset.max_image_pixels} is fewer than the smallest usable "
            f"image ({side}x{side} px: one pixel per patch of its grid at inference.short_side="
            f"{cfg.inference.short_side}): raise dataset.max_image_pixels"
        )
    windows, limit = image_window_count(cfg, (side, side)), cfg.inference.max_windows_per_image
    if windows > limit:
        raise ConfigError(
            f"inference.scales={cfg.inference.scales} cut even a square image into {windows} windows, "
            f"more than inference.max_windows_per_image={limit}, so every image would fail: lower the "
            "scales (or inference.short_side), or raise inference.max_windows_per_image"
        )
