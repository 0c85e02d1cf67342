"""Config -> windows and scales: what the CPU steps need, without importing torch."""

from configs.schema import InferenceConfig, RunConfig
from core.windows import WindowSpec, scale_short_sides


def window_spec(inference: InferenceConfig) -> WindowSpec:
    return WindowSpec(short_side=inference.short_side, crop=inference.crop, stride=inference.stride,
                      flip=inference.flip, batch_size=inference.batch_size, precision=inference.precision)


def extracted_scales(cfg: RunConfig) -> list[float]:
    """The scales extract writes: 1.0 first (the grid the fit uses), then the other inference scales."""
    return [1.0, *(s for s in cfg.inference.scales if s != 1.0)]


def extracted_short_sides(cfg: RunConfig) -> list[int]:
    return scale_short_sides(window_spec(cfg.inference), extracted_scales(cfg), cfg.model.vit.patch_size)


HEAD_FEATURE_DIM = 90  # CAUSE Segment_TR output


def feature_dim(cfg: RunConfig) -> int:
    """The dimension of the model's patch features."""
    return HEAD_FEATURE_DIM if cfg.model.feature_kind == "head" else cfg.model.vit.embed_dim


def label_scales(cfg: RunConfig) -> list[float]:
    """The scales the label pass averages, the one closest to 1 first (single-scale steps use it)."""
    return sorted(cfg.inference.scales, key=lambda s: abs(s - 1.0))


def label_short_sides(cfg: RunConfig) -> list[int]:
    return scale_short_sides(window_spec(cfg.inference), label_scales(cfg), cfg.model.vit.patch_size)
