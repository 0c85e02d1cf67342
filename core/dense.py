"""Dense patch features for whole images: resize, sliding window, overlap and flip averaging.

As CAUSE evaluates: the short side is resized (322 for Cityscapes, giving 322x644), square
windows (322) slide with a stride (161, 50 % overlap) over the reflect-padded image, and each
window is also run flipped. Window features are averaged where windows overlap. Because the
stride need not be a multiple of the patch size (161 = 11.5 x 14), averaging happens on a grid
of cells of gcd(patch, stride) pixels (7 px for CAUSE) and is pooled back to the patch grid,
so every window's patches land where they belong. A 1024x2048 image gives a 23x46 patch grid.
"""

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class WindowSpec:
    short_side: int
    crop: int
    stride: int
    flip: bool = True
    batch_size: int = 8
    precision: str = "fp32"  # fp16 / bf16 autocast on CUDA only


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


def to_normalized_tensor(image: np.ndarray, size: tuple[int, int], device: torch.device) -> torch.Tensor:
    """(H, W, 3) uint8 -> (1, 3, h, w) float ImageNet-normalised, resized with antialiasing (as PIL's bilinear)."""
    x = torch.tensor(np.ascontiguousarray(image), device=device).permute(2, 0, 1)[None].float() / 255.0
    if x.shape[-2:] != size:
        x = F.interpolate(x, size=size, mode="bilinear", antialias=True, align_corners=False)
    mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1)
    return (x - mean) / std


class DenseFeatureExtractor:
    """Wraps a patch-feature model (x (B,3,S,S) -> (B,D,S/p,S/p)) for whole images of any size."""

    def __init__(self, model: torch.nn.Module, spec: WindowSpec, device: torch.device | str = "cpu"):
        self.model = model
        self.spec = spec
        self.device = torch.device(device)
        self.patch = model.patch_size
        if spec.crop % self.patch:
            raise ValueError(f"crop {spec.crop} must be a multiple of the patch size {self.patch}")
        if getattr(model, "required_crop", None) not in (None, spec.crop):
            raise ValueError(f"this model runs on {model.required_crop} px windows only, not {spec.crop}")
        self.cell = math.gcd(self.patch, spec.stride)  # averaging grid that every window aligns to

    @torch.inference_mode()
    def __call__(self, images: list[np.ndarray], short_side: int | None = None) -> list[np.ndarray]:
        """Each (H, W, 3) uint8 image -> (D, gh, gw) float32 features on its patch grid.

        Windows of all images go through the model together in batches of `batch_size`.
        """
        short = short_side or self.spec.short_side
        crop, stride, cell, patch = self.spec.crop, self.spec.stride, self.cell, self.patch
        windows, owners, canvases = [], [], []
        for index, image in enumerate(images):
            h, w = resized_size(image.shape[0], image.shape[1], short)
            x = to_normalized_tensor(image, (h, w), self.device)
            gh, gw = math.ceil(h / patch), math.ceil(w / patch)
            # windows cover the whole patch grid, so the last partial patch gets features too
            ys, xs = window_starts(gh * patch, crop, stride), window_starts(gw * patch, crop, stride)
            pad_h, pad_w = ys[-1] + crop - h, xs[-1] + crop - w
            x = _pad(x, pad_h, pad_w)  # (1, 3, H', W') covering every window
            canvases.append({"grid": (gh, gw), "padded": x.shape[-2:], "sum": None, "count": None})
            for y0 in ys:
                for x0 in xs:
                    windows.append(x[0, :, y0:y0 + crop, x0:x0 + crop])
                    owners.append((index, y0, x0))
        outputs = self._run_windows(torch.stack(windows))  # (N, D, crop/p, crop/p)
        up = patch // cell
        for (index, y0, x0), feat in zip(owners, outputs):
            canvas = canvases[index]
            if canvas["sum"] is None:
                ph, pw = canvas["padded"]
                canvas["sum"] = torch.zeros(feat.shape[0], ph // cell, pw // cell, dtype=torch.float32, device=self.device)
                canvas["count"] = torch.zeros(1, ph // cell, pw // cell, dtype=torch.float32, device=self.device)
            cells = feat.repeat_interleave(up, 1).repeat_interleave(up, 2)  # (D, crop/cell, crop/cell)
            cy, cx, n = y0 // cell, x0 // cell, crop // cell
            canvas["sum"][:, cy:cy + n, cx:cx + n] += cells
            canvas["count"][:, cy:cy + n, cx:cx + n] += 1
        results = []
        for canvas in canvases:
            mean = canvas["sum"] / canvas["count"]  # (D, H'/cell, W'/cell)
            pooled = F.avg_pool2d(mean[None], up)[0] if up > 1 else mean  # (D, H'/p, W'/p)
            gh, gw = canvas["grid"]
            results.append(pooled[:, :gh, :gw].float().cpu().numpy())
        return results

    def at_scales(self, image: np.ndarray, scales: list[float]) -> list[tuple[np.ndarray, tuple[int, int]]]:
        """One image at several scales of the short side: [(features (D, gh, gw), resized (h, w))],
        the scale closest to 1 first (the base grid that single-scale steps use)."""
        order = sorted(range(len(scales)), key=lambda i: abs(scales[i] - 1.0))
        grids = []
        for i in order:
            short = max(self.patch, round(self.spec.short_side * scales[i]))
            (features,) = self([image], short_side=short)
            grids.append((features, resized_size(image.shape[0], image.shape[1], short)))
        return grids

    def _run_windows(self, windows: torch.Tensor) -> torch.Tensor:
        """(N, 3, S, S) -> (N, D, S/p, S/p) float32, averaged with the horizontally flipped pass."""
        outs = []
        for batch in windows.split(self.spec.batch_size):
            feats = self._forward(batch)
            if self.spec.flip:
                feats = 0.5 * (feats + self._forward(batch.flip(-1)).flip(-1))
            outs.append(feats)
        return torch.cat(outs)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(self.spec.precision)
        if dtype is not None and self.device.type == "cuda":
            with torch.autocast("cuda", dtype=dtype):
                return self.model(x).float()
        return self.model(x).float()


def _pad(x: torch.Tensor, pad_h: int, pad_w: int) -> torch.Tensor:
    """Reflect padding at the bottom/right; replicate where the image is too small to reflect."""
    if pad_h == 0 and pad_w == 0:
        return x
    mode = "reflect" if pad_h < x.shape[-2] and pad_w < x.shape[-1] else "replicate"
    return F.pad(x, (0, pad_w, 0, pad_h), mode=mode)
