"""Synthetic patch features for the benchmarks: an imbalanced mixture of anisotropic Gaussians on the unit sphere.

Each of `components` clusters has a random unit mean, spreads along `rank` random directions with
decaying scales (anisotropic, like real feature clusters that stretch along a few directions), plus
isotropic noise; cluster sizes follow a Zipf-like law (a few road/building-like clusters hold most
rows). Rows are L2-normalised float32, as the fit sees them. With the defaults the clusters overlap:
the generating mean of highest cosine is a row's own for ~96 % of rows (mean cosine 0.55 to its
own mean, 0.30 to the next best).
"""

import numpy as np

from core.clustering.kmeans import l2_normalize


class Mixture:
    def __init__(self, components: int = 300, dim: int = 90, seed: int = 0, rank: int = 8, noise: float = 0.1):
        rng = np.random.default_rng([seed, 0])
        self.dim, self.noise = dim, noise
        self.means = l2_normalize(rng.standard_normal((components, dim)))
        self.bases = (rng.standard_normal((components, rank, dim)) / np.sqrt(dim)).astype(np.float32)
        self.scales = (rng.uniform(0.5, 1.5, (components, 1)) * np.exp(-np.arange(rank) / 3)).astype(np.float32)
        weights = 1.0 / (np.arange(components) + 1) ** 0.8
        self.weights = rng.permutation(weights / weights.sum())

    def sample(self, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
        """(n, dim) float32 unit rows and their (n,) component index; the same (n, seed) gives the same rows."""
        rng = np.random.default_rng([seed, 1])
        comp = rng.choice(len(self.weights), n, p=self.weights)
        x = self.noise * rng.standard_normal((n, self.dim), dtype=np.float32)
        x += self.means[comp]
        order = np.argsort(comp, kind="stable")
        bounds = np.searchsorted(comp[order], np.arange(len(self.weights) + 1))
        for c in range(len(self.weights)):
            rows = order[bounds[c] : bounds[c + 1]]
            if len(rows):
                z = rng.standard_normal((len(rows), self.bases.shape[1]), dtype=np.float32) * self.scales[c]
                x[rows] += z @ self.bases[c]
        return l2_normalize(x), comp

    def fill(self, out: np.ndarray, seed: int, chunk_rows: int = 1 << 20) -> None:
        """Fill a preallocated (n, dim) float32 array chunk by chunk (bounded extra memory)."""
        for i, start in enumerate(range(0, len(out), chunk_rows)):
            stop = min(start + chunk_rows, len(out))
            out[start:stop] = self.sample(stop - start, seed=seed * 100003 + i)[0]
