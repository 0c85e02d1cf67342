"""The baseline on CAUSE's centre crop, labelled as CAUSE's test code labels it (test_tr.py and
utils/utils.py of ByungKwanLee/Causal-Unsupervised-Segmentation): the crop's patch features upsampled
bilinearly (align_corners=False), each pixel L2-normalised and given the cosine-nearest centroid;
with CAUSE's CRF, the unary from the k-way log_softmax(3 * cosine) and the image rebuilt from the
normalised tensor as `VF.to_pil_image(invTrans(img))` does (its `mul(255).byte()` truncates).
`core.evaluation.cause` scores the crops."""

import numpy as np
import torch
import torch.nn.functional as F

from core.inference.dense import IMAGENET_MEAN, IMAGENET_STD
from core.refine.crf import dense_crf

COSINE_SCALE = 3.0  # CAUSE's cluster logits: log_softmax(3 * cosine)


def crop_cosines(grid: np.ndarray, centroids: np.ndarray, crop: int) -> torch.Tensor:
    """(D, g, g) patch features of the crop + (k, D) unit centroids -> (k, crop, crop) cosines."""
    pixels = F.interpolate(
        torch.from_numpy(np.asarray(grid, np.float32))[None], size=(crop, crop), mode="bilinear", align_corners=False
    )[0]
    pixels = F.normalize(pixels, dim=0)
    return torch.einsum("kd,dyx->kyx", torch.from_numpy(np.array(centroids, np.float32)), pixels)


def rebuilt_image(crop_rgb: np.ndarray) -> np.ndarray:
    """The uint8 image CAUSE's CRF sees: ToTensor, Normalize, then invTrans and `mul(255).byte()`."""
    x = torch.from_numpy(crop_rgb).permute(2, 0, 1).float().div(255)
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    x = (x - mean) / std
    x = (x - 0.0) / torch.tensor([1 / s for s in IMAGENET_STD]).view(3, 1, 1)
    x = (x - torch.tensor([-m for m in IMAGENET_MEAN]).view(3, 1, 1)) / 1.0
    return x.mul(255).byte().permute(1, 2, 0).numpy()


def crop_clusters(
    grid: np.ndarray, crf_grid: np.ndarray, centroids: np.ndarray, crop_rgb: np.ndarray
) -> dict[str, np.ndarray]:
    """One crop's cluster maps, (crop, crop) each: "crop" without CAUSE's CRF, from `grid`
    (test_without_crf's unflipped pass), and "crop+crf" with it, from `crf_grid` (test's
    flip-averaged pass). Both grids (D, g, g); `crop_rgb` (crop, crop, 3) uint8."""
    crop = crop_rgb.shape[0]
    logits = torch.log_softmax(COSINE_SCALE * crop_cosines(crf_grid, centroids, crop), dim=0).numpy()
    return {
        "crop": crop_cosines(grid, centroids, crop).argmax(dim=0).numpy(),
        "crop+crf": dense_crf(rebuilt_image(crop_rgb), logits, alpha=1.0).argmax(axis=0),
    }
