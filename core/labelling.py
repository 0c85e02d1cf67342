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
from core.mapping import predict_classes

BLOCK_ELEMENTS = 1 << 25  # cosine scores held at once per block (128 MiB of float32)


def bilinear_taps(out_len: int, grid_len: int, scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For each output pixel: the two patch indices it interpolates between and the weight of the second.

    Output pixel i sits at patch-grid coordinate u = (i + 0.5) * scale - 0.5 where `scale` is patch
    cells per output pixel, so patch j's feature is exact at its own centre; coordinates beyond
    the first or last centre take the edge value (as align_corners=False interpolation does).
    """
    u = ((torch.arange(out_len, dtype=torch.float64) + 0.5) * scale - 0.5).clamp(0, grid_len - 1)
    lo = u.floor().long().clamp(max=grid_len - 1)
    hi = (lo + 1).clamp(max=grid_len - 1)
    return lo, hi, (u - lo).float()


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
    product per pixel).
    """

    def __init__(self, centroids: list[np.ndarray], device: torch.device | str = "cpu", candidates: int | None = 8):
        self.candidates = candidates  # None: score every cluster at every pixel (see _assign_pruned)
        self.sizes = [len(c) for c in centroids]
        self.offsets = np.cumsum([0, *self.sizes])
        self.device = torch.device(device)
        self.all_centroids = torch.from_numpy(np.concatenate(centroids).astype(np.float32)).to(self.device)  # (K, D)

    def assign(self, feature_grids: list[tuple[np.ndarray, tuple[int, int]]], patch_size: int,
               image_hw: tuple[int, int], first_fit_mapping: np.ndarray | None = None,
               num_classes: int = 19) -> tuple[list[np.ndarray], np.ndarray | None]:
        """feature_grids: one (features (D, gh, gw), resized (h, w)) per scale; the cosine scores are
        averaged over scales. Returns one (H, W) int32 cluster map per fit and, when the first fit's
        mapping is given, its class logits (C+1, H, W) float32: per class the best cosine among its
        clusters (channel C = unassigned clusters; -1 where a class has none), e.g. for a CRF."""
        height, width = image_hw
        # argmax ignores the positive per-pixel norm, so one scale can skip it; logits need it
        single = len(feature_grids) == 1 and first_fit_mapping is None
        scales = []
        for features, (rh, rw) in feature_grids:
            _, gh, gw = features.shape
            f = torch.from_numpy(np.ascontiguousarray(features, dtype=np.float32)).to(self.device)  # (D, gh, gw)
            wx = bilinear_weights(width, gw, rw / width / patch_size).to(self.device)  # (W, gw)
            # Columns once per scale, laid out (gh, W, K) so a row block is a gather of whole rows.
            dot_cols = torch.einsum("dhw,kd,xw->hxk", f, self.all_centroids, wx).contiguous()
            feat_cols = None if single else torch.einsum("dhw,xw->hxd", f, wx).contiguous()
            taps = tuple(t.to(self.device) for t in bilinear_taps(height, gh, rh / height / patch_size))
            scales.append((dot_cols, feat_cols, taps))
        if single and self.candidates is not None:
            return self._assign_pruned(scales[0][0], scales[0][2], height, width), None
        maps = [np.empty((height, width), np.int32) for _ in self.sizes]
        logits = None
        if first_fit_mapping is not None:
            logits = torch.full((height, width, num_classes + 1), -float(len(feature_grids)), device=self.device)
            channel = torch.from_numpy(np.where(first_fit_mapping == IGNORE, num_classes, first_fit_mapping)).to(self.device)
        rows_per_block = max(1, BLOCK_ELEMENTS // (len(self.all_centroids) * width))
        for r0 in range(0, height, rows_per_block):
            r1 = min(height, r0 + rows_per_block)
            scores = None
            for dot_cols, feat_cols, (lo, hi, frac) in scales:
                w = frac[r0:r1, None, None]
                rows = torch.lerp(dot_cols[lo[r0:r1]], dot_cols[hi[r0:r1]], w)  # (b, W, K)
                if feat_cols is not None:
                    rows /= torch.lerp(feat_cols[lo[r0:r1]], feat_cols[hi[r0:r1]], w).norm(dim=2, keepdim=True).clamp_min(1e-12)
                scores = rows if scores is None else scores.add_(rows)
            for i, (a, b) in enumerate(zip(self.offsets[:-1], self.offsets[1:])):
                maps[i][r0:r1] = scores[:, :, a:b].argmax(dim=2).cpu().numpy()
            if logits is not None:
                first = scores[:, :, : self.sizes[0]]
                logits[r0:r1].scatter_reduce_(2, channel.expand_as(first), first, reduce="amax")
        mean_logits = None if logits is None else (logits / len(feature_grids)).permute(2, 0, 1).contiguous().cpu().numpy()
        return maps, mean_logits

    def _assign_pruned(self, dot_cols: torch.Tensor, taps, height: int, width: int) -> list[np.ndarray]:
        """One scale, exact and cheaper: a pixel's scores are a lerp between two rows of the
        column-interpolated scores, so a cluster outside both rows' top m cannot beat the lerp of
        the two rows' (m+1)-th best scores. Each pixel scores only those 2m candidates; the few
        whose best candidate does not clear that bound are scored against all k clusters."""
        lo, hi, frac = taps
        # Output rows between the same two patch rows share their candidates: gather once per pair.
        starts = [0, *(torch.nonzero(lo[1:] != lo[:-1]).flatten() + 1).tolist(), height]
        maps = []
        for a, b in zip(self.offsets[:-1], self.offsets[1:]):
            scores = dot_cols[:, :, a:b].contiguous()  # (gh, W, k)
            m = min(self.candidates, b - a - 1)
            top_values, top_ids = scores.topk(m + 1, dim=2)  # (gh, W, m+1)
            outside_best, candidates = top_values[:, :, m], top_ids[:, :, :m]
            out = np.empty((height, width), np.int32)
            for r0, r1 in zip(starts[:-1], starts[1:]):
                l, h, w = int(lo[r0]), int(hi[r0]), frac[r0:r1, None, None]  # rows r0..r1 lie between patch rows l, h
                ids = torch.cat([candidates[l], candidates[h]], dim=1)  # (W, 2m)
                values = torch.lerp(scores[l].gather(1, ids)[None], scores[h].gather(1, ids)[None], w)  # (n, W, 2m)
                best, position = values.max(dim=2)
                winner = ids[None].expand_as(values).gather(2, position[..., None])[..., 0]  # (n, W)
                unsure = best <= torch.lerp(outside_best[l][None], outside_best[h][None], w[:, :, 0])
                if unsure.any():
                    yy, xx = unsure.nonzero(as_tuple=True)
                    full = torch.lerp(scores[l, xx], scores[h, xx], w[yy, 0])  # (n_unsure, k)
                    winner[yy, xx] = full.argmax(dim=1)
                out[r0:r1] = winner.cpu().numpy()
            maps.append(out)
        return maps


def clusters_to_train_ids(cluster_map: np.ndarray, mapping: np.ndarray) -> np.ndarray:
    """(H, W) cluster ids -> (H, W) uint8 trainIds (255 where the cluster has no class)."""
    return predict_classes(cluster_map, mapping).astype(np.uint8)
