"""Patch features + centroids + cluster->class mapping -> a full-resolution trainId map.

As the seed does it: cosine similarity of each patch feature to every centroid; a class's logit
is the max over the clusters mapped to it; logits are upsampled (bilinear) to the image size and
the argmax is the label. Clusters that a one-to-one matching left without a class (mapping 255)
share one extra "unassigned" channel, so a pixel won by such a cluster is predicted as 255 and
scored as a miss, exactly as argmax-over-clusters-then-map would score it.
"""

import numpy as np
import torch
import torch.nn.functional as F

from core.clustering import l2_normalize
from core.labels import IGNORE


def class_logit_grid(features: np.ndarray, centroids: np.ndarray, mapping: np.ndarray, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """features (D, gh, gw) -> class logits (C+1, gh, gw) float32 (channel C = unassigned) and the
    winning cluster per patch (gh, gw) int32."""
    d, gh, gw = features.shape
    x = l2_normalize(features.reshape(d, gh * gw).T)  # (P, D)
    cosine = x @ centroids.T  # (P, k)
    logits = np.full((num_classes + 1, gh * gw), -np.inf, dtype=np.float32)
    channel = np.where(mapping == IGNORE, num_classes, mapping)
    for c in np.unique(channel):
        logits[c] = cosine[:, channel == c].max(axis=1)
    return logits.reshape(num_classes + 1, gh, gw), cosine.argmax(axis=1).astype(np.int32).reshape(gh, gw)


def upsample_logits(logits: np.ndarray, resized_hw: tuple[int, int], patch_size: int, image_hw: tuple[int, int]) -> torch.Tensor:
    """(C+1, gh, gw) patch logits -> (C+1, H, W) at the original image size.

    The patch grid may overhang the resized image by a partial patch: upsample to the grid's
    pixel size, cut it back to the resized image, then resize to the original size.
    """
    x = torch.from_numpy(np.nan_to_num(logits, neginf=-1e4))[None]  # -inf would make bilinear weights NaN
    gh, gw = logits.shape[1:]
    if (gh * patch_size, gw * patch_size) != tuple(resized_hw):
        x = F.interpolate(x, size=(gh * patch_size, gw * patch_size), mode="bilinear", align_corners=False)
        x = x[:, :, : resized_hw[0], : resized_hw[1]]
    return F.interpolate(x, size=tuple(image_hw), mode="bilinear", align_corners=False)[0]


def logits_to_train_ids(logits: torch.Tensor, num_classes: int) -> np.ndarray:
    """(C+1, H, W) -> (H, W) uint8 trainIds; the unassigned channel becomes 255."""
    pred = logits.argmax(dim=0).numpy().astype(np.uint8)
    pred[pred == num_classes] = IGNORE
    return pred
