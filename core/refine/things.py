"""The thing mode: connected regions of a thing class split into instances by EM, with seeds picked in the
image (farthest-point sampling), instead of connected components.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from core.classes import THING_TRAIN_IDS
from core.refine.em import EPS, em_refine, grid_scale, sample_features


def _farthest_point_seeds(z: np.ndarray, candidates: np.ndarray, max_seeds: int, split_dist: float) -> np.ndarray:
    """z (n, Dz), candidates (m,) row indices -> seed rows (s,), s >= 1.

    First seed: the candidate nearest the mean of z. Then the candidate farthest from every seed,
    accepted while that distance (the evidence of another object) is >= split_dist.
    """
    zc = z[candidates]  # (m, Dz)
    first = int(((zc - z.mean(0)) ** 2).sum(1).argmin())
    seeds = [first]
    nearest = ((zc - zc[first]) ** 2).sum(1)  # (m,) squared distance to the nearest seed
    while len(seeds) < max_seeds:
        nxt = int(nearest.argmax())
        if nearest[nxt] < split_dist**2:
            break
        seeds.append(nxt)
        nearest = np.minimum(nearest, ((zc - zc[nxt]) ** 2).sum(1))
    return candidates[np.array(seeds)]


def split_things(
    features: np.ndarray,
    train_ids: np.ndarray,
    thing_ids=THING_TRAIN_IDS,
    tau: float = 0.05,
    T: int = 3,
    pos_weight: float = 1.0,
    split_dist: float = 0.6,
    max_instances: int = 8,
    min_area: int | None = None,
    seed_margin: float | None = None,
    max_points: int = 4096,
    connectivity: int = 8,
    resized_hw=None,
    patch_size=None,
    block_rows: int = 65536,
) -> np.ndarray:
    """Thing instances by EM instead of connected components.

    features (D, gh, gw) patch features (or per-pixel: gh, gw = H, W); train_ids (H, W) semantic
    map (full resolution or the patch grid), thing_ids the classes to split. Returns (H, W) int32
    instance ids 1..M, consecutive over the image; 0 = stuff, ignore, or a dropped region. It is
    the `instances` argument of core.panoptic.panoptic_from_train_ids (which then builds the
    labelId*1000+n ids); T-independent parts (regions, areas, connectivity 4/8, default 8) match
    that function's connected-component baseline.

    Per class, per connected region (scipy.ndimage.label with `connectivity` 4 or 8):
    - a region of fewer than `min_area` pixels is dropped (0). Default min_area: one patch cell
      of the map (1 pixel at patch resolution, (H/gh)*(W/gw) at full resolution);
    - each pixel gets z = [unit bilinear feature, pos_weight * (y, x) / max(H, W)];
    - seeds (Dreamy-Start from the image): farthest-point sampling over the region's *feature
      sites* (the pixels at patch centres, where features are extracted rather than
      interpolated) at least `seed_margin` pixels inside the region (default half a patch cell;
      border features mix with the background), falling back to all sites, then all pixels.
      A new seed needs a point at distance >= split_dist from all seeds (unit features: 0.6 =
      cosine 0.82), and there are at most min(max_instances, area // min_area) seeds;
    - T EM rounds (euclidean metric, temperature tau) on at most `max_points` region pixels (an
      even raster subsample), then every region pixel joins its nearest centre;
    - seed evidence check: an instance with fewer than min_area pixels is dissolved into the
      nearest remaining centres (smallest first), so an instance needs its own seed *and* area.
    T = 0 assigns the pixels to the seeds. Instances are not forced to be connected.
    """
    height, width = train_ids.shape
    d, gh, gw = features.shape
    scale = grid_scale((height, width), (gh, gw), resized_hw, patch_size)
    cell_h, cell_w = 1.0 / scale[0], 1.0 / scale[1]  # map pixels per patch cell
    if min_area is None:
        min_area = max(1, int(round(cell_h * cell_w)))
    if seed_margin is None:
        seed_margin = 0.5 * max(cell_h, cell_w)
    # Feature sites: the map pixel nearest each patch centre, along each axis.
    site_rows = np.zeros(height, bool)
    site_cols = np.zeros(width, bool)
    for n_grid, cell, sites in ((gh, cell_h, site_rows), (gw, cell_w, site_cols)):
        pos = np.round((np.arange(n_grid) + 0.5) * cell - 0.5).astype(np.int64)
        sites[pos[(pos >= 0) & (pos < len(sites))]] = True
    long_side = float(max(height, width))
    if connectivity not in (4, 8):
        raise ValueError(f"connectivity must be 4 or 8, got {connectivity}")
    structure = np.ones((3, 3), bool) if connectivity == 8 else None
    out = np.zeros((height, width), np.int32)
    next_id = 1

    def embed(ys, xs):  # (n,) pixel coordinates -> z (n, D + 2) float32
        f = sample_features(features, ys, xs, scale)
        f /= np.maximum(np.linalg.norm(f, axis=1, keepdims=True), EPS)
        return np.concatenate([f, (pos_weight / long_side) * np.stack([ys, xs], 1).astype(np.float32)], 1)

    for cls in thing_ids:
        regions, count = ndimage.label(train_ids == cls, structure=structure)
        if count == 0:
            continue
        areas = np.bincount(regions.ravel(), minlength=count + 1)
        for label, box in enumerate(ndimage.find_objects(regions), start=1):
            if box is None or areas[label] < min_area:
                continue
            inside = regions[box] == label  # (h, w) region mask in its bounding box
            ys, xs = np.nonzero(inside)
            n_seeds_max = int(min(max_instances, areas[label] // min_area))
            if n_seeds_max <= 1:
                out[ys + box[0].start, xs + box[1].start] = next_id
                next_id += 1
                continue
            depth = ndimage.distance_transform_edt(np.pad(inside, 1))[1:-1, 1:-1][ys, xs]  # (n,)
            ys, xs = ys + box[0].start, xs + box[1].start
            is_site = site_rows[ys] & site_cols[xs]
            sites = np.flatnonzero(is_site)
            sites = sites[np.linspace(0, len(sites) - 1, min(len(sites), max_points)).astype(np.int64)]
            pick = np.linspace(0, len(ys) - 1, min(len(ys), max_points)).astype(np.int64)  # EM subsample
            pick = np.union1d(pick, sites)  # (n_em,) the sites always take part
            z = embed(ys[pick], xs[pick]).astype(np.float64)  # (n_em, Dz)
            for rule in (is_site[pick] & (depth[pick] >= seed_margin), is_site[pick], np.ones(len(pick), bool)):
                candidates = np.flatnonzero(rule)
                if candidates.size:
                    break
            seeds = _farthest_point_seeds(z, candidates, n_seeds_max, split_dist)
            if len(seeds) == 1:  # no evidence of a second object: the region is one instance
                out[ys, xs] = next_id
                next_id += 1
                continue
            centres, _ = em_refine(z, z[seeds], tau, T, "euclidean")  # (K, Dz)
            # Nearest centre for every region pixel, in blocks: squared distances (n, K).
            sq = np.empty((len(ys), len(centres)), np.float32)
            for r0 in range(0, len(ys), block_rows):
                zb = embed(ys[r0 : r0 + block_rows], xs[r0 : r0 + block_rows])  # (b, Dz)
                c32 = centres.astype(np.float32)
                sq[r0 : r0 + len(zb)] = (zb * zb).sum(1)[:, None] - 2 * zb @ c32.T + (c32 * c32).sum(1)
            alive = np.ones(len(centres), bool)
            while True:
                owner = np.where(alive, sq, np.inf).argmin(1)  # (n,)
                sizes = np.bincount(owner, minlength=len(centres))
                small = np.flatnonzero(alive & (sizes < min_area))
                if small.size == 0 or alive.sum() == 1:
                    break
                alive[small[sizes[small].argmin()]] = False
            ids = np.cumsum(alive) - 1 + next_id  # alive centre -> instance id
            out[ys, xs] = ids[owner]
            next_id += int(alive.sum())
    return out
