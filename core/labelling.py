"""Patch features + centroids -> the nearest centroid of every pixel, for several fits at once.

As the seed does it: the patch features are upsampled bilinearly to the image size, each pixel's
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

import numpy as np
import torch

from core.labels import IGNORE
from core.mapping import predict_classes

BLOCK_ELEMENTS = 1 << 25  # cosine scores held at once per block (128 MiB of float32)


def sample_positions(length: int, stride: int = 1) -> torch.Tensor:
    """Pixel indices a stride-s subsample keeps along one axis: s//2, s//2 + s, ..."""
    return torch.arange(stride // 2, length, stride)


def subsample(array: np.ndarray, stride: int) -> np.ndarray:
    """The pixels of an (H, W, ...) map that `PixelAssigner` labels at this stride."""
    return array if stride == 1 else array[stride // 2::stride, stride // 2::stride]


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


def bilinear_weights(out_len: int, grid_len: int, scale: float) -> torch.Tensor:
    """The same interpolation as a dense (out_len, grid_len) matrix."""
    lo, hi, frac = bilinear_taps(out_len, grid_len, scale)
    w = torch.zeros(out_len, grid_len)
    w[torch.arange(out_len), lo] += 1 - frac
    w[torch.arange(out_len), hi] += frac
    return w


class PixelAssigner:
    """Nearest centroid per pixel for a list of fits; centroids (k_i, D) must be L2-normalised.

    Bilinear upsampling is linear, so a pixel's dot product with a centroid is the upsampled
    patch-level dot product: scores are computed on the patch grid (P x K x D) and only they are
    interpolated (2 taps per axis), then divided by the norm of the upsampled feature. Exactly
    the seed's "upsample features, normalise, cosine", at a fraction of the cost (no D-wide
    product per pixel). One scale without class logits takes `_nearest_by_envelope`, which does
    not even score every cluster at every pixel.
    """

    def __init__(self, centroids: list[np.ndarray], device: torch.device | str = "cpu", strides: list[int] | None = None):
        self.sizes = [len(c) for c in centroids]
        self.offsets = np.cumsum([0, *self.sizes])
        self.strides = strides or [1] * len(centroids)
        self.device = torch.device(device)
        self.centroids = [torch.from_numpy(np.array(c, np.float32)).to(self.device) for c in centroids]

    def assign(self, feature_grids: list[tuple[np.ndarray, tuple[int, int]]], patch_size: int,
               image_hw: tuple[int, int], first_fit_mapping: np.ndarray | None = None,
               num_classes: int = 19) -> tuple[list[np.ndarray], np.ndarray | None]:
        """feature_grids: one (features (D, gh, gw), resized (h, w)) per scale; the cosine scores are
        averaged over scales. Returns one cluster map (int32) per fit, (H, W) or its stride-s
        subsample, and, when the first fit's mapping is given, its class logits (C+1, H, W)
        float32: per class the best cosine among its clusters (channel C = unassigned clusters;
        -1 where a class has none), e.g. for a CRF (the first fit must then have stride 1)."""
        grids = [(torch.from_numpy(np.ascontiguousarray(f, dtype=np.float32)).to(self.device), r) for f, r in feature_grids]
        maps = []
        logits = None
        for i, (centroids, stride) in enumerate(zip(self.centroids, self.strides)):
            with_logits = i == 0 and first_fit_mapping is not None
            if len(grids) == 1 and not with_logits:  # argmax ignores the positive per-pixel norm
                maps.append(_nearest_by_envelope(*grids[0], centroids, patch_size, image_hw, stride))
                continue
            if with_logits and stride != 1:
                raise ValueError("class logits need the first fit at stride 1")
            cluster_map, fit_logits = _nearest_per_pixel(grids, centroids, patch_size, image_hw, stride,
                                                         first_fit_mapping if with_logits else None, num_classes)
            maps.append(cluster_map)
            logits = fit_logits if with_logits else logits
        return maps, logits


def _column_scores(features: torch.Tensor, centroids: torch.Tensor, resized: tuple[int, int], patch_size: int,
                   width: int, stride: int) -> torch.Tensor:
    """Patch-level dot products interpolated along x at the output columns: (gh, W_s, k)."""
    _, _, gw = features.shape
    lo, hi, frac = (t.to(features.device) for t in bilinear_taps(width, gw, resized[1] / width / patch_size, stride))
    patch_scores = torch.einsum("dhw,kd->hwk", features, centroids)  # (gh, gw, k)
    step = patch_scores.index_select(1, hi) - patch_scores.index_select(1, lo)  # (gh, W_s, k)
    return torch.addcmul(patch_scores.index_select(1, lo), step, frac[None, :, None], out=step)


def _nearest_by_envelope(features: torch.Tensor, resized: tuple[int, int], centroids: torch.Tensor, patch_size: int,
                         image_hw: tuple[int, int], stride: int) -> np.ndarray:
    """Exact nearest centroid of every pixel from one scale, at about the cost of the column scores.

    Columns are interpolated explicitly (q: (gh, W, k)). Down a column, between patch rows i and
    i+1, every cluster's score is linear in the row weight w in [0, 1], so the winner along the
    band is the upper envelope of k lines, found without scoring every pixel:
      - if the same cluster wins at w = 0 and w = 1 it wins the whole band (most bands);
      - else, with a winning at the left end of an interval and b at the right, the envelope of
        a and b has its low point where they cross, w*. A third cluster wins somewhere in the
        interval only if it beats them at w* (its score minus the envelope is concave on each
        side of w*), so one scoring of the k clusters at w* either confirms the breakpoint a -> b
        or finds c, and the two halves (a, c) and (c, b) are settled the same way.
    Rows then take the winner of the last breakpoint above them. A tolerance keeps near-ties of
    float rounding from recursing forever; their answers differ from per-pixel scoring by < 1e-6.
    """
    height, width = image_hw
    gh = features.shape[1]
    q = _column_scores(features, centroids, resized, patch_size, width, stride)  # (gh, W_s, k)
    best = q.argmax(dim=2)  # (gh, W_s): the winner on each patch row
    lo, _, frac = (t.to(q.device) for t in bilinear_taps(height, gh, resized[0] / height / patch_size, stride))
    out_w = best.shape[1]
    if gh == 1:
        return best[lo].to(torch.int32).cpu().numpy()
    # First round on every (band, column) at once, on views of q: the winners a (top row) and b.
    a, b = best[:-1, :, None], best[1:, :, None]  # (gh-1, W_s, 1)
    top, slope = q[:-1], q[1:] - q[:-1]
    w = _crossing(top, slope, a, b, torch.zeros_like(a, dtype=q.dtype), torch.ones_like(a, dtype=q.dtype))
    third, c = _third_winner(top, slope, a, b, w)
    resolved = (a != b) & ~third
    band, col, _ = torch.nonzero(resolved, as_tuple=True)
    breaks = [(band, col, w[resolved], b[resolved])]
    band, col, _ = torch.nonzero(third, as_tuple=True)
    flat = q.view(-1, q.shape[2])  # (gh * W_s, k): rows of q by (band, col)
    left, mid, right, w_mid = a[third], c[third], b[third], w[third]
    band, col = band.repeat(2), col.repeat(2)  # each interval split at w*: (a, c) and (c, b)
    left, right = torch.cat([left, mid]), torch.cat([mid, right])
    w_left = torch.cat([torch.zeros_like(w_mid), w_mid])
    w_right = torch.cat([w_mid, torch.ones_like(w_mid)])
    while band.numel():
        top = flat.index_select(0, band * out_w + col)  # (n, k) scores at w = 0
        slope = flat.index_select(0, (band + 1) * out_w + col).sub_(top)
        a, b = left[:, None], right[:, None]
        w = _crossing(top, slope, a, b, w_left[:, None], w_right[:, None])
        third, c = _third_winner(top, slope, a, b, w)
        third, c, w = third[:, 0], c[:, 0], w[:, 0]
        done = ~third
        breaks.append((band[done], col[done], w[done], right[done]))
        band, col = band[third].repeat(2), col[third].repeat(2)
        left, right = torch.cat([left[third], c[third]]), torch.cat([c[third], right[third]])
        w_left, w_right = torch.cat([w_left[third], w[third]]), torch.cat([w[third], w_right[third]])
    return _fill_rows(best, lo, frac, [torch.cat(parts) for parts in zip(*breaks)], out_w)


def _crossing(top, slope, a, b, w_left, w_right):
    """Where the lines of clusters a (winning at w_left) and b (winning at w_right) cross."""
    gain = top.gather(-1, a) - top.gather(-1, b)  # a's lead at w = 0
    w = gain / (slope.gather(-1, b) - slope.gather(-1, a)).clamp_min(1e-30)
    return torch.minimum(torch.maximum(w, w_left), w_right)


def _third_winner(top, slope, a, b, w):
    """(does a cluster other than a and b beat them at w, which one): scores of every cluster at w."""
    scores = torch.addcmul(top, slope, w)
    envelope = scores.gather(-1, a)
    scores.scatter_(-1, a, -float("inf")).scatter_(-1, b, -float("inf"))
    value, c = scores.max(dim=-1, keepdim=True)
    return (value > envelope + 1e-6 * (envelope.abs() + 1)) & (a != b), c


def _fill_rows(best: torch.Tensor, lo: torch.Tensor, frac: torch.Tensor, breaks, out_w: int) -> np.ndarray:
    """Each output row takes its band's top winner, then the winner after the last breakpoint
    (band, col, w, winner) with w < its row weight."""
    out_h = len(lo)
    value = best[lo]  # (H_s, W_s): the winner at w = 0 of each row's band
    change_row = torch.full((out_h, out_w), -1, dtype=torch.long, device=best.device)
    firsts = torch.cat([torch.zeros(1, dtype=torch.long, device=lo.device), torch.nonzero(lo[1:] != lo[:-1])[:, 0] + 1])
    change_row[firsts] = firsts[:, None]
    if breaks is not None and len(breaks[0]):
        band, col, w, winner = breaks
        position = lo.double() + frac.double()  # increasing down the rows
        first_after = torch.searchsorted(position, band.double() + w.double(), right=True)  # first row with weight > w
        band_end = torch.searchsorted(lo, band, right=True)
        keep = first_after < band_end
        row, col, w, winner = first_after[keep], col[keep], w[keep], winner[keep]
        order = torch.argsort(w, stable=True)  # the breakpoint with the largest w at a (row, col) is the last
        key = (row * out_w + col)[order]
        order = order[torch.argsort(key, stable=True)]
        key = (row * out_w + col)[order]
        last = torch.ones(len(key), dtype=torch.bool, device=key.device)
        last[:-1] = key[1:] != key[:-1]
        row, col, winner = row[order][last], col[order][last], winner[order][last]
        value[row, col] = winner
        change_row[row, col] = row
    last_change = torch.cummax(change_row, dim=0).values
    return value.gather(0, last_change).to(torch.int32).cpu().numpy()


def _nearest_per_pixel(grids: list[tuple[torch.Tensor, tuple[int, int]]], centroids: torch.Tensor, patch_size: int,
                       image_hw: tuple[int, int], stride: int, mapping: np.ndarray | None,
                       num_classes: int) -> tuple[np.ndarray, np.ndarray | None]:
    """Every cluster scored at every pixel: scores averaged over scales (each divided by the norm
    of its upsampled feature), and the class logits where a mapping is given."""
    height, width = image_hw
    scales = []
    for features, resized in grids:
        _, gh, gw = features.shape
        lo, hi, frac = (t.to(features.device) for t in bilinear_taps(width, gw, resized[1] / width / patch_size, stride))
        dot_cols = _column_scores(features, centroids, resized, patch_size, width, stride)  # (gh, W_s, k)
        feat_cols = torch.lerp(features[:, :, lo], features[:, :, hi], frac).permute(1, 2, 0).contiguous()  # (gh, W_s, D)
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
