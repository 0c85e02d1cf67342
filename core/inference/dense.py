"""Dense patch features for whole images: the model step on windows, and all three steps in one process.

`core.inference.windows` cuts an image into windows and stitches their features back (CPU, no torch);
`WindowModel` runs the model on the windows of many images at once (on its device, with flip
averaging and autocast); `DenseFeatureExtractor` does the whole thing in one process.
"""

import numpy as np
import torch

from core.inference.windows import WindowSpec, cut_windows, stitch_windows

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def normalize(windows: torch.Tensor) -> torch.Tensor:
    """(N, S, S, 3) uint8 -> (N, 3, S, S) float32, ImageNet-normalised."""
    x = windows.permute(0, 3, 1, 2).float() / 255.0
    mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


class WindowModel:
    """A patch-feature model (x (B,3,S,S) -> (B,D,S/p,S/p)) applied to uint8 windows on its device."""

    def __init__(self, model: torch.nn.Module, spec: WindowSpec, device: torch.device | str = "cpu"):
        self.model = model
        self.spec = spec
        self.device = torch.device(device)
        self.patch = model.patch_size
        if spec.crop % self.patch:
            raise ValueError(f"crop {spec.crop} must be a multiple of the patch size {self.patch}")
        if getattr(model, "required_crop", None) not in (None, spec.crop):
            raise ValueError(f"this model runs on {model.required_crop} px windows only, not {spec.crop}")

    @torch.inference_mode()
    def __call__(self, windows: np.ndarray) -> np.ndarray:
        """(N, S, S, 3) uint8 -> (N, D, S/p, S/p) float32, averaged with the horizontally flipped pass."""
        outs = []
        for batch in torch.from_numpy(windows).split(self.spec.batch_size):
            x = normalize(batch.to(self.device, non_blocking=True))
            feats = self._forward(x)
            if self.spec.flip:
                d = self.spec.flip_dims or feats.shape[1]  # the paper keeps its raw backbone tokens unflipped
                feats[:, :d] = 0.5 * (feats[:, :d] + self._forward(x.flip(-1))[:, :d].flip(-1))
            outs.append(feats.cpu())
        return torch.cat(outs).numpy() if outs else np.zeros((0, 0, 0, 0), np.float32)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.spec.precision == "fp16_backbone":  # CAUSE's test code: autocast around the backbone only
            return self.model(x, backbone_autocast=self.device.type == "cuda").float()
        dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(self.spec.precision)
        if dtype is not None and self.device.type == "cuda":
            with torch.autocast("cuda", dtype=dtype):
                return self.model(x).float()
        return self.model(x).float()


class DenseFeatureExtractor:
    """The three steps in one process: images -> patch-feature grids at one scale (tests, benchmarks)."""

    def __init__(self, model: torch.nn.Module, spec: WindowSpec, device: torch.device | str = "cpu"):
        self.windows = WindowModel(model, spec, device)
        self.model, self.spec, self.patch = model, spec, self.windows.patch

    def __call__(self, images: list[np.ndarray], short_side: int | None = None) -> list[np.ndarray]:
        """Each (H, W, 3) uint8 image -> (D, gh, gw) float32 features on its patch grid; the
        windows of all images go through the model together."""
        short = short_side or self.spec.short_side
        cut = [cut_windows(image, self.spec, self.patch, [short]) for image in images]
        features = self.windows(np.concatenate([w for w, _ in cut])) if cut else None
        results, start = [], 0
        for windows, layouts in cut:
            mine = features[start : start + len(windows)]
            start += len(windows)
            ((grid, _),) = stitch_windows(mine, layouts, self.spec.crop, self.spec.stride, self.patch, self.spec.merge)
            results.append(grid)
        return results
