"""The paper's two feature-space post-processing heuristics, which it reports as harmful
(mbps_pytorch/refine_semantic_pseudolabels.py, steps s1 and s2), as label variants on this
tool's patch grid. The paper runs them on CAUSE's 27-class labels with DINOv2 patch tokens on a
32x64 grid; here they take the main fit's labels and the extracted patch features.

Both work on patch labels: the image's labels shrunk to the patch grid with PIL NEAREST, and
the result is upsampled back with PIL NEAREST. The class prototypes come from the fit stage's one
pass over every patch: each patch counts for its nearest cluster's class (the paper averages by
its pixel labels shrunk NEAREST, which can differ at region boundaries).
- prototype denoising (s1): class prototypes = the normalised mean of the normalised patch
  features of each class over the whole split; a patch whose cosine to its own class's
  prototype is below 0.3 takes the class of its best prototype;
- k-NN diffusion (s2): each patch's 10 most similar patches of the image (cosine, itself
  excluded); one-hot labels diffused 15 times, D = 0.5 D + 0.5 mean of the neighbours' D.
"""

import numpy as np

from core.classes import IGNORE
from core.image_ops import resize_nearest

PROTOTYPE_THRESHOLD = 0.3
KNN_NEIGHBOURS, KNN_ALPHA, KNN_ITERATIONS = 10, 0.5, 15


def normalized_rows(x: np.ndarray) -> np.ndarray:
    """(n, D) -> float64 rows scaled to unit length, as the paper prepares them (nan_to_num, +1e-8)."""
    x = np.nan_to_num(np.asarray(x, np.float64))
    return x / (np.linalg.norm(x, axis=1, keepdims=True) + 1e-8)


def normalized_patches(features: np.ndarray) -> np.ndarray:
    """(D, gh, gw) -> (gh*gw, D) unit rows."""
    return normalized_rows(features.reshape(features.shape[0], -1).T)


def class_prototypes(sums: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """(C, D) sums of normalised patch features per class and (C,) counts -> (C, D) unit
    prototypes; a class without patches gets a zero row (never chosen)."""
    means = sums / np.maximum(counts, 1)[:, None]
    return np.where(counts[:, None] > 0, means / (np.linalg.norm(means, axis=1, keepdims=True) + 1e-8), 0.0)


def denoise_by_prototypes(labels: np.ndarray, features: np.ndarray, prototypes: np.ndarray) -> np.ndarray:
    """(H, W) trainIds + the image's (D, gh, gw) features + (C, D) prototypes -> (H, W) trainIds."""
    grid = resize_nearest(labels, features.shape[1:]).ravel()
    similarity = normalized_patches(features) @ prototypes.T  # (P, C)
    similarity[:, ~prototypes.any(axis=1)] = -np.inf
    best = similarity.argmax(axis=1)
    labelled = grid != IGNORE
    own = np.full(len(grid), np.inf)
    own[labelled] = similarity[np.flatnonzero(labelled), grid[labelled]]
    out = np.where((best != grid) & (own < PROTOTYPE_THRESHOLD), best, grid).astype(np.uint8)
    return resize_nearest(out.reshape(features.shape[1:]), labels.shape)


def diffuse_by_neighbours(labels: np.ndarray, features: np.ndarray, num_classes: int) -> np.ndarray:
    """(H, W) trainIds + the image's (D, gh, gw) features -> (H, W) trainIds after k-NN diffusion;
    a patch with no labelled neighbourhood at all stays unlabelled."""
    grid = resize_nearest(labels, features.shape[1:]).ravel()
    x = normalized_patches(features)
    k = min(KNN_NEIGHBOURS, len(x) - 1)
    if k < 1:
        return labels
    affinity = x @ x.T
    np.fill_diagonal(affinity, -np.inf)
    neighbours = np.argpartition(-affinity, k - 1, axis=1)[:, :k]
    mass = np.zeros((len(grid), num_classes))
    labelled = grid != IGNORE
    mass[np.flatnonzero(labelled), grid[labelled]] = 1.0
    for _ in range(KNN_ITERATIONS):
        mass = KNN_ALPHA * mass + (1 - KNN_ALPHA) * mass[neighbours].mean(axis=1)
    out = np.where(mass.any(axis=1), mass.argmax(axis=1), IGNORE).astype(np.uint8)
    return resize_nearest(out.reshape(features.shape[1:]), labels.shape)
