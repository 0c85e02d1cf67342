"""EM clustering without parameters (CLUSTSEG's recurrent cross-attention as test-time EM): the steps, the
objective, and the semantic mode (the global centroids adapted to one image). The package docstring has
the derivation.
"""

from __future__ import annotations

import numpy as np
import torch

from core.classes import IGNORE, NUM_CLASSES
from core.labelling.assign import bilinear_weights, taps_at

METRICS = ("cosine", "euclidean")

EPS = 1e-12


def _unit(x: np.ndarray) -> np.ndarray:
    """float64 rows scaled to unit length (an all-zero row stays zero)."""
    x = np.asarray(x, dtype=np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), EPS)


def _check(features: np.ndarray, centres: np.ndarray, tau: float, metric: str) -> None:
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; allowed: {', '.join(METRICS)}")
    if not tau > 0:
        raise ValueError(f"tau={tau}: the attention temperature must be > 0")
    if features.ndim != 2 or centres.ndim != 2 or features.shape[1] != centres.shape[1]:
        raise ValueError(f"features of shape {features.shape} do not match centres of shape {centres.shape}")


def _prepare(x: np.ndarray, metric: str) -> np.ndarray:
    return _unit(x) if metric == "cosine" else np.asarray(x, dtype=np.float64)


def _logits(x: np.ndarray, c: np.ndarray, tau: float, metric: str) -> np.ndarray:
    """x (N, D), c (K, D) -> attention logits (N, K)."""
    dots = x @ c.T  # (N, K)
    if metric == "cosine":
        return dots / tau
    sq = (x * x).sum(1)[:, None] - 2.0 * dots + (c * c).sum(1)[None, :]  # (N, K) squared distances
    return -np.maximum(sq, 0.0) / (2.0 * tau)


def logsumexp(logits: np.ndarray, axis: int = -1) -> np.ndarray:
    m = logits.max(axis=axis, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    return (m + np.log(np.exp(logits - m).sum(axis=axis, keepdims=True))).squeeze(axis)


def softmax(logits: np.ndarray, axis: int = -1) -> np.ndarray:
    m = logits.max(axis=axis, keepdims=True)
    e = np.exp(logits - np.where(np.isfinite(m), m, 0.0))
    return e / np.maximum(e.sum(axis=axis, keepdims=True), EPS)


def _m_step(x, a, c_prev, metric, anchor, prior_mass, min_mass, frozen):
    """x (N, D), a (N, K), c_prev (K, D) -> new centres (K, D) (see the module docstring)."""
    mass = a.sum(0)  # (K,)
    s = a.T @ x  # (K, D) attention-weighted sums
    total = mass
    if prior_mass > 0:
        s = s + prior_mass * anchor
        total = mass + prior_mass
    if metric == "cosine":
        norm = np.linalg.norm(s, axis=1)
        keep = (mass < min_mass) | (norm <= EPS)
        new = s / np.maximum(norm, EPS)[:, None]
    else:
        keep = (mass < min_mass) | (total <= EPS)
        new = s / np.maximum(total, EPS)[:, None]
    if frozen is not None:
        keep = keep | frozen
    return np.where(keep[:, None], c_prev, new), keep


def em_step(
    features: np.ndarray,
    centres: np.ndarray,
    tau: float,
    metric: str = "cosine",
    anchor: np.ndarray | None = None,
    prior_mass: float = 0.0,
    min_mass: float = 1e-6,
    frozen: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """One recurrent cross-attention round. features (N, D), centres (K, D) -> (new centres (K, D)
    float64, the E-step's assignments A (N, K) computed with the *input* centres).

    cosine: features and centres are L2-normalised first and the new centres are unit vectors.
    anchor (K, D): centre of the optional prior (default: the input centres); frozen (K,) bool:
    clusters kept as they are.
    """
    _check(features, centres, tau, metric)
    x, c = _prepare(features, metric), _prepare(centres, metric)
    anchor = c if anchor is None else _prepare(anchor, metric)
    a = softmax(_logits(x, c, tau, metric))  # (N, K)
    return _m_step(x, a, c, metric, anchor, prior_mass, min_mass, frozen)[0], a


def em_refine(
    features: np.ndarray,
    centres: np.ndarray,
    tau: float,
    T: int = 3,
    metric: str = "cosine",
    prior_mass: float = 0.0,
    min_mass: float = 1e-6,
    frozen: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """T EM rounds. features (N, D), centres (K, D) -> (centres (K, D), assignments A (N, K)).

    The returned centres have the input centres' float dtype; A = softmax of the returned centres'
    logits (the assignment that goes with them). A centre that no round moved (mass below
    min_mass every time, or frozen) is returned as its input row, bit for bit; so is everything
    for T = 0. The prior (prior_mass > 0) is centred on the initial centres.
    """
    _check(features, centres, tau, metric)
    if T < 0:
        raise ValueError(f"T={T}: the number of EM rounds must be >= 0")
    out_dtype = centres.dtype if np.issubdtype(centres.dtype, np.floating) else np.float64
    x, c = _prepare(features, metric), _prepare(centres, metric)
    anchor = c
    moved = np.zeros(len(c), bool)  # (K,)
    for _ in range(T):
        a = softmax(_logits(x, c, tau, metric))
        c, keep = _m_step(x, a, c, metric, anchor, prior_mass, min_mass, frozen)
        moved |= ~keep
    a = softmax(_logits(x, c, tau, metric))
    out = np.array(centres, dtype=out_dtype, copy=True)
    out[moved] = c[moved]
    return out, a


def soft_kmeans_objective(
    features: np.ndarray,
    centres: np.ndarray,
    tau: float,
    metric: str = "cosine",
    anchor: np.ndarray | None = None,
    prior_mass: float = 0.0,
) -> float:
    """L(C) of the module docstring: the quantity that em_step never increases.

    cosine: -tau * sum_n logsumexp_k(x_n.c_k / tau) - m0 * sum_k c_k.a_k  (x, c, a normalised)
    euclidean: -tau * sum_n logsumexp_k(-||x_n - c_k||^2 / (2 tau)) + m0/2 * sum_k ||c_k - a_k||^2
    """
    _check(features, centres, tau, metric)
    x, c = _prepare(features, metric), _prepare(centres, metric)
    value = -tau * logsumexp(_logits(x, c, tau, metric)).sum()
    if prior_mass > 0:
        if anchor is None:
            raise ValueError("prior_mass > 0 needs the anchor (the initial centres)")
        a = _prepare(anchor, metric)
        value += -prior_mass * (c * a).sum() if metric == "cosine" else 0.5 * prior_mass * ((c - a) ** 2).sum()
    return float(value)


def _check_mapping(mapping: np.ndarray, k: int, num_classes: int) -> None:
    if mapping.shape != (k,):
        raise ValueError(f"mapping of shape {mapping.shape} for {k} centroids")
    bad = (mapping != IGNORE) & ((mapping < 0) | (mapping >= num_classes))
    if bad.any():
        raise ValueError(f"mapping holds class ids outside [0, {num_classes}) and {IGNORE}: {np.unique(mapping[bad])}")


def refine_semantic(
    features: np.ndarray,
    centroids: np.ndarray,
    mapping: np.ndarray,
    tau: float = 0.05,
    T: int = 3,
    prior_mass: float = 0.0,
    min_mass: float = 1.0,
    adapt_unassigned: bool = True,
    num_classes: int = NUM_CLASSES,
) -> np.ndarray:
    """Per-image adaptation of the global centroids (Dreamy-Start: class centres).

    features (D, gh, gw) raw patch features; centroids (K, D) unit rows (as fit_kmeans gives);
    mapping (K,) class ids, 255 = cluster without a class. Returns refined centroids (K, D), unit
    rows, centroids' dtype; the mapping is unchanged. A cluster whose attention mass in this image
    is below `min_mass` (in patches) keeps its global centre; adapt_unassigned=False also keeps the
    255 clusters global (they still compete in the E-step). T = 0: the centroids, bit for bit.
    """
    d, gh, gw = features.shape
    _check_mapping(np.asarray(mapping), len(centroids), num_classes)
    x = features.reshape(d, gh * gw).T  # (P, D)
    frozen = None if adapt_unassigned else (np.asarray(mapping) == IGNORE)
    refined, _ = em_refine(x, centroids, tau, T, "cosine", prior_mass, min_mass, frozen)
    return refined


def grid_scale(image_hw, grid_hw, resized_hw, patch_size) -> tuple[float, float]:
    """Patch cells per map pixel along (y, x). With resized_hw/patch_size the grid may overhang
    the (resized) image, as core.labelling.assign handles it; without, the grid spans the map exactly."""
    if resized_hw is None or patch_size is None:
        return grid_hw[0] / image_hw[0], grid_hw[1] / image_hw[1]
    return resized_hw[0] / image_hw[0] / patch_size, resized_hw[1] / image_hw[1] / patch_size


def _taps_at(pixels: np.ndarray, n_grid: int, scale: float):
    """core.labelling.assign's bilinear taps (lo, hi, frac) for the given pixel indices."""
    return (t.numpy() for t in taps_at(torch.from_numpy(np.asarray(pixels, np.int64)), n_grid, scale))


def sample_features(features: np.ndarray, ys: np.ndarray, xs: np.ndarray, scale: tuple[float, float]) -> np.ndarray:
    """features (D, gh, gw), pixel rows/cols (N,) -> bilinear features (N, D) float32."""
    d, gh, gw = features.shape
    flat = np.ascontiguousarray(features.reshape(d, gh * gw).T, dtype=np.float32)  # (gh*gw, D)
    y0, y1, fy = _taps_at(ys, gh, scale[0])
    x0, x1, fx = _taps_at(xs, gw, scale[1])
    fy, fx = fy[:, None], fx[:, None]
    top = flat[y0 * gw + x0]
    top += fx * (flat[y0 * gw + x1] - top)
    bottom = flat[y1 * gw + x0]
    bottom += fx * (flat[y1 * gw + x1] - bottom)
    top += fy * (bottom - top)
    return top


def upsample_features(features: np.ndarray, image_hw, resized_hw=None, patch_size=None) -> np.ndarray:
    """features (D, gh, gw) -> (H, W, D) float32, separable bilinear (two matrix products)."""
    d, gh, gw = features.shape
    sy, sx = grid_scale(image_hw, (gh, gw), resized_hw, patch_size)
    wy, wx = (
        bilinear_weights(image_hw[0], gh, sy).numpy(),
        bilinear_weights(image_hw[1], gw, sx).numpy(),
    )  # (H, gh), (W, gw)
    cols = np.asarray(features, np.float32) @ wx.T  # (D, gh, W)
    return np.tensordot(wy, cols, axes=(1, 1)).transpose(0, 2, 1)  # (H, D, W) -> (H, W, D) view
