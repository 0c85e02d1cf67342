"""Config -> windows and scales: what the CPU steps need, without importing torch."""

import numpy as np

from configs.schema import RunConfig
from core.errors import UserError
from core.presets import protocol_steps
from core.windows import WindowSpec, layout_axis_weights, scale_short_sides, window_layout


def window_spec(cfg: RunConfig) -> WindowSpec:
    """The windows, precision and merge of the config's inference section under its protocol."""
    inference, steps = cfg.inference, protocol_steps(cfg.protocol)
    return WindowSpec(short_side=inference.short_side, crop=inference.crop, stride=inference.stride,
                      flip=inference.flip, batch_size=inference.batch_size,
                      precision=steps.precision or inference.precision, merge=steps.merge)


def extracted_scales(cfg: RunConfig) -> list[float]:
    """The scales extract writes: 1.0 first (the grid the fit uses), then the other inference scales."""
    return [1.0, *(s for s in cfg.inference.scales if s != 1.0)]


def extracted_short_sides(cfg: RunConfig) -> list[int]:
    return scale_short_sides(window_spec(cfg), extracted_scales(cfg), cfg.model.vit.patch_size)


def stores_windows(cfg: RunConfig) -> bool:
    """Whether extract also keeps each image's window features: the seed's pixel labels are made
    from the windows' pixel map, which the merged patch grid cannot give back."""
    return protocol_steps(cfg.protocol).merge == "pixels"


def pack_windows(window_features: np.ndarray, num_windows: int) -> np.ndarray:
    """The base scale's windows (N, D, g, g) side by side as one (D, g, N*g) float16 grid: how the
    seed protocol stores them (extract's `_windows/` Parquet) for the label pass."""
    return np.concatenate(list(window_features[:num_windows]), axis=2).astype(np.float16)


def unpack_windows(cfg: RunConfig, packed: np.ndarray, image_hw: tuple[int, int]) -> tuple[np.ndarray, tuple]:
    """`pack_windows`' grid -> (windows (N, D, g, g) float32, their `layout_axis_weights`)."""
    spec, patch = window_spec(cfg), cfg.model.vit.patch_size
    layout = window_layout(*image_hw, label_short_sides(cfg)[0], spec, patch)
    side = spec.crop // patch
    windows = packed.astype(np.float32).reshape(packed.shape[0], side, -1, side).transpose(2, 0, 1, 3)
    if len(windows) != len(layout.origins):
        raise UserError(f"{len(windows)} stored windows for a {image_hw[0]}x{image_hw[1]} image whose layout has "
                        f"{len(layout.origins)}; re-run extract on a new output_dir")
    return windows, layout_axis_weights(layout, spec.crop, patch)


HEAD_FEATURE_DIM = 90  # CAUSE Segment_TR output


def feature_dim(cfg: RunConfig) -> int:
    """The dimension of the model's patch features."""
    return HEAD_FEATURE_DIM if cfg.model.feature_kind == "head" else cfg.model.vit.embed_dim


def label_scales(cfg: RunConfig) -> list[float]:
    """The scales the label pass averages, the one closest to 1 first (single-scale steps use it)."""
    return sorted(cfg.inference.scales, key=lambda s: abs(s - 1.0))


def label_short_sides(cfg: RunConfig) -> list[int]:
    return scale_short_sides(window_spec(cfg), label_scales(cfg), cfg.model.vit.patch_size)
