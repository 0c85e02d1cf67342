"""The extract (and apply) model step: an actor that runs only the model, on windows of many images."""

import json
from dataclasses import replace

import numpy as np

from actors.model_setup import build_window_model
from actors.rows import step
from configs.geometry import HEAD_FEATURE_DIM
from configs.schema import RunConfig
from core.inference.dense import WindowModel
from core.presets import protocol_steps


@step(resources="extract.model")
class WindowFeatures:
    """Model actor: `setup` builds the model once; a call runs the windows of a batch of images."""

    def __init__(self, cfg: RunConfig, backbone: bool = False, extra_views: bool = True):
        """backbone: also return the base scale's backbone tokens (model.compare_backbone), as
        `backbone_window_features`; extra_views: the rows carry CAUSE's crops (`image_windows`)."""
        self.cfg, self.backbone, self.extra_views = cfg, backbone, extra_views

    def setup(self) -> None:
        cfg, backbone, extra_views = self.cfg, self.backbone, self.extra_views
        self.model = build_window_model(
            cfg, cfg.extract.model, with_backbone=backbone
        )  # (N, S, S, 3) uint8 -> (N, D, S/p, S/p)
        self.head_dim = HEAD_FEATURE_DIM if backbone else None
        self.description = self.model.model.description
        # CAUSE's crop (each image's last two windows under protocol=cause) runs as CAUSE's two test
        # passes do: test_without_crf unflipped with the whole model under fp16 autocast; test (its CRF)
        # flip-averaged with autocast around the backbone only. The other windows keep inference.precision.
        spec, model, device = self.model.spec, self.model.model, self.model.device
        self.crop_models = (
            (
                WindowModel(model, replace(spec, precision="fp16", flip=False), device),
                WindowModel(model, replace(spec, precision="fp16_backbone", flip=True), device),
            )
            if protocol_steps(cfg.protocol).cause_crop and extra_views
            else None
        )

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Window features as float16: it halves the bytes moved, and features are stored so anyway."""
        windows = list(batch.pop("windows"))
        counts = [len(w) for w in windows]
        features = self._features(windows, counts) if sum(counts) else None
        out = {
            "window_features": _per_image(
                features if self.head_dim is None or features is None else features[:, : self.head_dim], counts
            )
        }
        if self.head_dim is not None:  # the base scale's windows only (they come first): the fit uses nothing else
            base = [len(json.loads(layouts)[0]["origins"]) if n else 0 for layouts, n in zip(batch["layouts"], counts)]
            keep = np.concatenate([np.arange(n) < b for n, b in zip(counts, base)]) if sum(counts) else None
            out["backbone_window_features"] = _per_image(
                None if features is None else features[keep, self.head_dim :], base
            )
        return {**batch, **out, "model": np.array([self.description] * len(counts))}

    def _features(self, windows: list[np.ndarray], counts: list[int]) -> np.ndarray:
        """Every window of the batch through the model, in order; CAUSE's crops through `crop_models`."""
        stacked = np.concatenate(windows)
        if self.crop_models is None:
            return self.model(stacked)
        ends = np.cumsum(counts)[np.array(counts) > 0]
        which = np.zeros(len(stacked), np.int64)  # 0: the model, 1: CAUSE's plain pass, 2: its flip-averaged pass
        which[ends - 2], which[ends - 1] = 1, 2
        parts = [self.model(stacked[which == 0]), *(m(stacked[which == i + 1]) for i, m in enumerate(self.crop_models))]
        out = np.empty((len(stacked), *parts[1].shape[1:]), parts[1].dtype)
        for i, part in enumerate(parts):
            out[which == i] = part
        return out


def _per_image(features: np.ndarray | None, counts: list[int]) -> np.ndarray:
    """The batch's window features (sum(counts), D, g, g) -> one float16 entry per image."""
    if len(set(counts)) == 1 and counts[0]:  # the usual batch: one tensor column, which Ray Data moves without copies
        return features.reshape(len(counts), counts[0], *features.shape[1:]).astype(np.float16)
    out = np.empty(
        len(counts), dtype=object
    )  # images of several sizes, or failed ones (a 4-d placeholder: a column holds one rank only)
    for i, start in enumerate(np.cumsum([0, *counts[:-1]])):
        out[i] = (
            features[start : start + counts[i]].astype(np.float16) if counts[i] else np.zeros((0, 1, 1, 1), np.float16)
        )
    return out
