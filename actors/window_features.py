"""The extract (and apply) model step: an actor that runs only the model, on windows of many images."""

import numpy as np

from actors.model_setup import build_window_model
from configs.schema import parse_config


class WindowFeatures:
    """Model actor: `__init__` builds the model once; a call runs the windows of a batch of images."""

    def __init__(self, config: dict):
        cfg = parse_config(config, "extract model config")
        self.model = build_window_model(cfg, cfg.extract.model)  # (N, S, S, 3) uint8 -> (N, D, S/p, S/p)
        self.description = self.model.model.description

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Window features as float16: it halves the bytes moved, and features are stored so anyway."""
        windows = list(batch.pop("windows"))
        counts = [len(w) for w in windows]
        features = self.model(np.concatenate(windows)) if sum(counts) else None
        if len(set(counts)) == 1 and counts[0]:  # the usual batch: one tensor column, which Ray Data moves without copies
            out = features.reshape(len(counts), counts[0], *features.shape[1:]).astype(np.float16)
        else:  # images of several sizes, or failed ones (a 4-d placeholder: a column holds one rank only)
            out = np.empty(len(windows), dtype=object)
            for i, start in enumerate(np.cumsum([0, *counts[:-1]])):
                out[i] = features[start:start + counts[i]].astype(np.float16) if counts[i] else np.zeros((0, 1, 1, 1), np.float16)
        return {**batch, "window_features": out, "model": np.array([self.description] * len(out))}
