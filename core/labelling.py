"""Patch features + centroids -> the nearest centroid of every pixel, for several fits at once.

As the seed does it: the patch features are upsampled bilinearly to the image size, each pixel's
feature is L2-normalised and compared by cosine with every centroid; the pixel takes its nearest
centroid's class (mapping[cluster]; 255 for a cluster a one-to-one matching left unassigned).
Taking the class of the best cluster is the same as "class logit = max over the class's
clusters, then argmax", so the per-pixel cluster map carries everything the scores need: the
pixel-level cluster x class counts of an image give its confusion matrix under *any* mapping
(same-set majority, held-out, label-free), without labelling the image again.

Memory stays bounded at any resolution: upsampling is separable (columns once, rows per block)
and pixels are scored in blocks of rows.
"""

import numpy as np
import torch

from core.labels import IGNORE

BLOCK_ELEMENTS = 1 << 25  # cosine scores held at once per block (128 MiB of float32)


def bilinear_weights(out_len: int, grid_len: int, scale: float) -> torch.Tensor:
    """(out_len, grid_len) bilinear weights from patch centres to output pixel centres.

    Output pixel i sits at patch-grid coordinate u = (i + 0.5) * scale - 0.5 where `scale` is patch
    cells per output pixel, so patch j's feature is exact at its own centre; coordinates beyond
    the first or last centre take the edge value (as align_corners=False interpolation does).
    """
    u = ((torch.arange(out_len, dtype=torch.float64) + 0.5) * scale - 0.5).clamp(0, grid_len - 1)
    lo = u.floor().long().clamp(max=grid_len - 1)
    hi = (lo + 1).clamp(max=grid_len - 1)
    frac = (u - lo).float()
    w = torch.zeros(out_len, grid_len)
    w[torch.arange(out_len), lo] += 1 - frac
    w[torch.arange(out_len), hi] += frac
    return w


class PixelAssigner:
    """Nearest centroid per pixel for a list of fits; centroids (k_i, D) must be L2-normalised."""

    def __init__(self, centroids: list[np.ndarray]):
        self.sizes = [len(c) for c in centroids]
        self.offsets = np.cumsum([0, *self.sizes])
        self.all_centroids = torch.from_numpy(np.concatenate(centroids).astype(np.float32))  # (K, D)

    def assign(self, feature_grids: list[tuple[np.ndarray, tuple[int, int]]], patch_size: int,
               image_hw: tuple[int, int]) -> list[np.ndarray]:
        """feature_grids: one (features (D, gh, gw), resized (h, w)) per scale; the cosine scores are
        averaged over scales. Returns one (H, W) int32 cluster map per fit."""
        height, width = image_hw
        # Columns first, once per scale: (D, gh, W); rows then per block.
        columns, row_weights = [], []
        for features, (rh, rw) in feature_grids:
            _, gh, gw = features.shape
            x = torch.from_numpy(np.ascontiguousarray(features, dtype=np.float32))
            columns.append(torch.einsum("dhw,xw->dhx", x, bilinear_weights(width, gw, rw / width / patch_size)))
            row_weights.append(bilinear_weights(height, gh, rh / height / patch_size))
        maps = [np.empty((height, width), np.int32) for _ in self.sizes]
        rows_per_block = max(1, BLOCK_ELEMENTS // (len(self.all_centroids) * width))
        for r0 in range(0, height, rows_per_block):
            r1 = min(height, r0 + rows_per_block)
            scores = 0
            for cols, wy in zip(columns, row_weights):
                pixels = torch.einsum("yh,dhx->yxd", wy[r0:r1], cols).reshape(-1, cols.shape[0])  # (b*W, D)
                pixels = pixels / pixels.norm(dim=1, keepdim=True).clamp_min(1e-12)
                scores = scores + pixels @ self.all_centroids.T  # (b*W, K)
            for i, (a, b) in enumerate(zip(self.offsets[:-1], self.offsets[1:])):
                maps[i][r0:r1] = scores[:, a:b].argmax(dim=1).reshape(r1 - r0, width).numpy()
        return maps


def cluster_class_pixel_counts(cluster_map: np.ndarray, gt_train_ids: np.ndarray, k: int, num_classes: int) -> np.ndarray:
    """(k, C) int64 pixel counts of (nearest cluster, ground-truth class) over valid pixels."""
    valid = gt_train_ids != IGNORE
    flat = cluster_map[valid].astype(np.int64) * num_classes + gt_train_ids[valid]
    return np.bincount(flat, minlength=k * num_classes).reshape(k, num_classes)


def clusters_to_train_ids(cluster_map: np.ndarray, mapping: np.ndarray) -> np.ndarray:
    """(H, W) cluster ids -> (H, W) uint8 trainIds (255 where the cluster has no class)."""
    return mapping.astype(np.uint8)[cluster_map]
