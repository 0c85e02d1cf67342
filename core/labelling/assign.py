"""Patch features + centroids -> the nearest centroid of every pixel, for several fits at once.

As the paper does it: the patch features are upsampled bilinearly to the image size, each pixel's
feature is L2-normalised and compared by cosine with every centroid; the pixel takes its nearest
centroid's class (mapping[cluster]; 255 for a cluster a one-to-one matching left unassigned).
Taking the class of the best cluster is the same as "class logit = max over the class's
clusters, then argmax", so the per-pixel cluster map carries everything the scores need: the
pixel-level cluster x class counts of an image give its confusion matrix under *any* mapping
(same-set majority, held-out, label-free), without labelling the image again.

A fit may be scored on a strided pixel subsample (`stride` s: the pixels (s//2 + s*i, s//2 + s*j),
`subsample` takes the same pixels of a ground-truth map), e.g. the k sweep's extra fits, whose
full-resolution labels nobody reads.
"""

import numba
import numpy as np
import torch

from core.classes import IGNORE
from core.labelling.maps import first_sample
from core.mapping.majority import predict_classes

BLOCK_ELEMENTS = 1 << 25  # cosine scores held at once per block (128 MiB of float32)


def sample_positions(length: int, stride: int = 1) -> torch.Tensor:
    """Pixel indices a stride-s subsample keeps along one axis: s//2, s//2 + s, ..."""
    return torch.arange(first_sample(length, stride), length, stride)


def taps_at(positions: torch.Tensor, grid_len: int, scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For each output pixel index: the two patch indices it interpolates between and the weight of the second.

    Output pixel i sits at patch-grid coordinate u = (i + 0.5) * scale - 0.5 where `scale` is patch
    cells per output pixel, so patch j's feature is exact at its own centre; coordinates beyond
    the first or last centre take the edge value (as align_corners=False interpolation does).
    """
    u = ((positions.to(torch.float64) + 0.5) * scale - 0.5).clamp(0, grid_len - 1)
    lo = u.floor().long().clamp(max=grid_len - 1)
    hi = (lo + 1).clamp(max=grid_len - 1)
    return lo, hi, (u - lo).float()


def bilinear_taps(out_len: int, grid_len: int, scale: float, stride: int = 1):
    """`taps_at` for every pixel of an axis of `out_len` pixels (or its stride-s subsample)."""
    return taps_at(sample_positions(out_len, stride), grid_len, scale)


def bilinear_weights(out_len: int, grid_len: int, scale: float, stride: int = 1) -> torch.Tensor:
    """The same interpolation as a dense (out_len, grid_len) matrix (rows: the stride's pixels)."""
    lo, hi, frac = bilinear_taps(out_len, grid_len, scale, stride)
    w = torch.zeros(len(lo), grid_len)
    w[torch.arange(len(lo)), lo] += 1 - frac
    w[torch.arange(len(lo)), hi] += frac
    return w


class PixelAssigner:
    """Nearest centroid per pixel for a list of fits; centroids (k_i, D) must be L2-normalised.

    Bilinear upsampling is linear, so a pixel's dot product with a centroid is the upsampled
    patch-level dot product: scores are computed on the patch grid (P x K x D) and only they are
    interpolated (2 taps per axis), then divided by the norm of the upsampled feature. Exactly
    the paper's "upsample features, normalise, cosine", at a fraction of the cost (no D-wide
    product per pixel). On the CPU, one scale without class logits takes `_nearest_by_envelope`,
    which does not even score every cluster at every pixel; a GPU scores them all.
    """

    def __init__(
        self, centroids: list[np.ndarray], device: torch.device | str = "cpu", strides: list[int] | None = None
    ):
        self.strides = strides or [1] * len(centroids)
        self.device = torch.device(device)
        self.centroids = [torch.from_numpy(np.array(c, np.float32)).to(self.device) for c in centroids]

    def assign(
        self,
        feature_grids: list[tuple[np.ndarray, tuple[int, int]]],
        patch_size: int,
        image_hw: tuple[int, int],
        first_fit_mapping: np.ndarray | None = None,
        num_classes: int = 19,
    ) -> tuple[list[np.ndarray], np.ndarray | None]:
        """feature_grids: one (features (D, gh, gw), resized (h, w)) per scale; the cosine scores are
        averaged over scales. Returns one cluster map (int32) per fit, (H, W) or its stride-s
        subsample, and, when the first fit's mapping is given, its class logits (C+1, H, W)
        float32: per class the best cosine among its clusters (channel C = unassigned clusters;
        -1 where a class has none), e.g. for a CRF (the first fit must then have stride 1)."""
        grids = [
            (torch.from_numpy(np.ascontiguousarray(f, dtype=np.float32)).to(self.device), r) for f, r in feature_grids
        ]
        maps = []
        logits = None
        for i, (centroids, stride) in enumerate(zip(self.centroids, self.strides)):
            with_logits = i == 0 and first_fit_mapping is not None
            if len(grids) == 1 and not with_logits and self.device.type == "cpu":  # argmax ignores the per-pixel norm
                maps.append(_nearest_by_envelope(*grids[0], centroids, patch_size, image_hw, stride))
                continue
            if with_logits and stride != 1:
                raise ValueError("class logits need the first fit at stride 1")
            cluster_map, fit_logits = _nearest_per_pixel(
                grids, centroids, patch_size, image_hw, stride, first_fit_mapping if with_logits else None, num_classes
            )
            maps.append(cluster_map)
            logits = fit_logits if with_logits else logits
        return maps, logits


def _column_weights(
    features: torch.Tensor, resized: tuple[int, int], patch_size: int, width: int, stride: int
) -> torch.Tensor:
    """(W_s, gw): the interpolation along x at the output columns, as a matrix. Applied with one
    matrix product, faster than gathering two taps."""
    return bilinear_weights(width, features.shape[2], resized[1] / width / patch_size, stride).to(features.device)


def _column_scores(features: torch.Tensor, centroids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Patch-level dot products interpolated along x at the output columns: (gh, W_s, k)."""
    patch_scores = torch.einsum("dhw,kd->hwk", features, centroids)  # (gh, gw, k)
    return torch.matmul(weights, patch_scores)


def _nearest_by_envelope(
    features: torch.Tensor,
    resized: tuple[int, int],
    centroids: torch.Tensor,
    patch_size: int,
    image_hw: tuple[int, int],
    stride: int,
) -> np.ndarray:
    """Exact nearest centroid of every pixel from one scale on the CPU, without scoring every
    cluster at every pixel (see `_envelope_rows`)."""
    height = image_hw[0]
    weights = _column_weights(features, resized, patch_size, image_hw[1], stride)
    q = _column_scores(features, centroids, weights).numpy()  # (gh, W_s, k)
    lo, _, frac = bilinear_taps(height, features.shape[1], resized[0] / height / patch_size, stride)
    return _envelope_rows(q, lo.numpy(), frac.numpy())


@numba.njit(cache=True)
def _envelope_rows(q: np.ndarray, lo: np.ndarray, frac: np.ndarray) -> np.ndarray:
    """q (gh, W, k): scores at the output columns on each patch row; lo, frac (H,): each output
    row's patch row above it and its weight towards the next. -> (H, W) int32 winners.

    Down a column, between patch rows i and i+1, every cluster's score is linear in the row
    weight w in [0, 1], so the winner along the band is the upper envelope of k lines:
      - if the same cluster wins at w = 0 and w = 1 it wins the whole band (most bands);
      - else, with a winning at the left end of an interval and b at the right, a and b cross at
        w*, the envelope's low point between them. A third cluster wins somewhere in the interval
        only if it beats them at w* (its score minus the envelope is concave on each side of w*),
        so one scoring of the k clusters at w* either confirms the breakpoint a -> b or finds c,
        and the halves (a, c) and (c, b) are settled the same way (depth first, left first, so
        the breakpoints come out in order).
    A tolerance (1e-6 of the scores' size) keeps near-ties of float rounding from recursing; such
    pixels may differ from per-pixel scoring by less than that.
    """
    gh, width, k = q.shape
    height = lo.shape[0]
    best = np.empty((gh, width), np.int64)
    for i in range(gh):
        for x in range(width):
            best[i, x] = np.argmax(q[i, x])
    out = np.empty((height, width), np.int32)
    stack = np.empty((4 * k + 8, 4))  # intervals (w_left, a, w_right, b) still to settle
    max_breaks = 2 * k + 2
    n_breaks = np.zeros(width, np.int64)  # per column of the band: its breakpoints (w, winner after)
    break_w = np.empty((width, max_breaks))
    break_c = np.empty((width, max_breaks), np.int64)
    winner = np.empty(width, np.int64)
    slope = np.empty(k, np.float32)  # per column of a band: each cluster's score change down the band
    scores = np.empty(k, np.float32)
    position = np.empty(width, np.int64)
    r0 = 0
    while r0 < height:
        band = lo[r0]
        r1 = r0
        while r1 < height and lo[r1] == band:
            r1 += 1
        for x in range(width):
            n_breaks[x] = 0
            a = best[band, x]
            if band == gh - 1 or best[band + 1, x] == a:
                continue
            top = q[band, x]
            for c in range(k):
                slope[c] = q[band + 1, x, c] - top[c]
            depth = 1
            stack[0, 0], stack[0, 1], stack[0, 2], stack[0, 3] = 0.0, a, 1.0, best[band + 1, x]
            while depth:
                depth -= 1
                w_left, left, w_right, right = (
                    stack[depth, 0],
                    int(stack[depth, 1]),
                    stack[depth, 2],
                    int(stack[depth, 3]),
                )
                lead = top[left] - top[right]  # >= 0: left wins at w_left
                gain = slope[right] - slope[left]  # > 0: right wins at w_right
                w = np.float32(min(max(lead / gain if gain > 0 else w_left, w_left), w_right))
                for c in range(k):  # every cluster's score at w (a loop the compiler vectorises)
                    scores[c] = top[c] + w * slope[c]
                envelope = scores[left]
                scores[left] = scores[right] = -np.inf
                third = np.argmax(scores)
                # relative to the scores' size: features are not normalised, their scale is arbitrary
                if scores[third] <= envelope + 1e-6 * max(abs(envelope), abs(top[left]), abs(top[right])):
                    third = -1
                n = n_breaks[x]
                if third < 0 or depth + 2 > stack.shape[0] or n + 2 > max_breaks:
                    break_w[x, n], break_c[x, n] = w, right
                    n_breaks[x] = n + 1
                else:
                    stack[depth, 0], stack[depth, 1], stack[depth, 2], stack[depth, 3] = w, third, w_right, right
                    stack[depth + 1, 0], stack[depth + 1, 1], stack[depth + 1, 2], stack[depth + 1, 3] = (
                        w_left,
                        left,
                        w,
                        third,
                    )
                    depth += 2
        for x in range(width):  # the band's rows, row by row (the output is row-major)
            winner[x], position[x] = best[band, x], 0
        for r in range(r0, r1):
            for x in range(width):
                p = position[x]
                while p < n_breaks[x] and frac[r] > break_w[x, p]:
                    winner[x] = break_c[x, p]
                    p += 1
                position[x] = p
                out[r, x] = winner[x]
        r0 = r1
    return out


def _nearest_per_pixel(
    grids: list[tuple[torch.Tensor, tuple[int, int]]],
    centroids: torch.Tensor,
    patch_size: int,
    image_hw: tuple[int, int],
    stride: int,
    mapping: np.ndarray | None,
    num_classes: int,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Every cluster scored at every pixel: scores averaged over scales (each divided by the norm
    of its upsampled feature), and the class logits where a mapping is given."""
    height, width = image_hw
    scales = []
    for features, resized in grids:
        gh = features.shape[1]
        weights = _column_weights(features, resized, patch_size, width, stride)
        dot_cols = _column_scores(features, centroids, weights)  # (gh, W_s, k)
        feat_cols = torch.matmul(weights, features.permute(1, 2, 0))  # (gh, W_s, D)
        taps = tuple(t.to(features.device) for t in bilinear_taps(height, gh, resized[0] / height / patch_size, stride))
        scales.append((dot_cols, feat_cols, taps))
    out_h, out_w = len(scales[0][2][0]), scales[0][0].shape[1]
    cluster_map = np.empty((out_h, out_w), np.int32)
    logits = None
    if mapping is not None:
        logits = torch.full((out_h, out_w, num_classes + 1), -float(len(grids)), device=centroids.device)
        channel = torch.from_numpy(np.where(mapping == IGNORE, num_classes, mapping)).to(centroids.device)
    rows_per_block = max(1, BLOCK_ELEMENTS // (len(centroids) * out_w))
    for r0 in range(0, out_h, rows_per_block):
        r1 = min(out_h, r0 + rows_per_block)
        scores = None
        for dot_cols, feat_cols, (lo, hi, frac) in scales:
            w = frac[r0:r1, None, None]
            rows = torch.lerp(dot_cols[lo[r0:r1]], dot_cols[hi[r0:r1]], w)  # (b, W_s, k)
            rows /= torch.lerp(feat_cols[lo[r0:r1]], feat_cols[hi[r0:r1]], w).norm(dim=2, keepdim=True).clamp_min(1e-12)
            scores = rows if scores is None else scores.add_(rows)
        cluster_map[r0:r1] = scores.argmax(dim=2).cpu().numpy()
        if logits is not None:
            logits[r0:r1].scatter_reduce_(2, channel.expand_as(scores), scores, reduce="amax")
    mean_logits = None if logits is None else (logits / len(grids)).permute(2, 0, 1).contiguous().cpu().numpy()
    return cluster_map, mean_logits


def clusters_to_train_ids(cluster_map: np.ndarray, mapping: np.ndarray) -> np.ndarray:
    """(H, W) cluster ids -> (H, W) uint8 trainIds (255 where the cluster has no class)."""
    return predict_classes(cluster_map, mapping).astype(np.uint8)


def window_cluster_maps(
    windows: np.ndarray,
    axis_weights: tuple[list[np.ndarray], list[np.ndarray]],
    centroids: list[np.ndarray],
    device: torch.device | str = "cpu",
    first_fit_mapping: np.ndarray | None = None,
    num_classes: int = 19,
) -> tuple[list[np.ndarray], np.ndarray | None]:
    """The paper's pixel labelling at the resized size: windows (N, D, g, g) -> their pixel map
    (sum over windows of Wy f Wx^T, `core.inference.windows.layout_axis_weights`), each pixel L2-normalised,
    nearest unit centroid by cosine. Returns one (h, w) int32 cluster map per fit and, when the
    first fit's mapping is given, its class logits (C, h, w) float32 as the paper makes them for
    its CRF: per class the best cosine among its clusters, 0 for a class with none. Rows go in
    blocks, so the map is never held whole at feature width."""
    rows, cols = ([torch.from_numpy(np.asarray(m, np.float32)).to(device) for m in ms] for ms in axis_weights)
    feats = torch.from_numpy(np.ascontiguousarray(windows, dtype=np.float32)).to(device)
    units = [torch.from_numpy(np.array(c, np.float32)).to(device) for c in centroids]
    (height, width), dim = (rows[0].shape[0], cols[0].shape[0]), feats.shape[1]
    # column interpolation of every window once: (N, D, g, w)
    along_x = [torch.einsum("dij,xj->dix", f, wx) for f, wx in zip(feats, cols)]
    maps = [np.empty((height, width), np.int32) for _ in units]
    logits = None
    if first_fit_mapping is not None:
        mapped = torch.from_numpy(np.flatnonzero(first_fit_mapping != IGNORE)).to(device)
        channel = torch.from_numpy(first_fit_mapping[first_fit_mapping != IGNORE].astype(np.int64)).to(device)
        logits = torch.zeros((num_classes, height, width), device=device)
        has_cluster = torch.zeros(num_classes, dtype=torch.bool, device=device)
        has_cluster[channel] = True
    block = max(1, BLOCK_ELEMENTS // (max(dim, max(len(c) for c in units)) * width))
    for r0 in range(0, height, block):
        r1 = min(height, r0 + block)
        pixel = sum(torch.einsum("yi,dix->dyx", wy[r0:r1], ax) for wy, ax in zip(rows, along_x))  # (D, b, w)
        pixel = pixel / pixel.norm(dim=0, keepdim=True).clamp_min(1e-12)
        for i, (out, c) in enumerate(zip(maps, units)):
            scores = torch.einsum("kd,dyx->kyx", c, pixel)
            out[r0:r1] = scores.argmax(dim=0).cpu().numpy()
            if i == 0 and logits is not None:
                best = torch.full((num_classes, r1 - r0, width), -float("inf"), device=device)
                best.scatter_reduce_(
                    0, channel[:, None, None].expand(-1, r1 - r0, width), scores[mapped], reduce="amax"
                )
                logits[:, r0:r1] = torch.where(has_cluster[:, None, None], best, 0.0)
    return maps, None if logits is None else logits.cpu().numpy()
