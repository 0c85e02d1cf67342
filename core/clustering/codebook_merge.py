"""Clusters per concept, not per mass: a fine k-means codebook merged into k clusters along its
density bridges (issue 29; `bench/bench_balanced_sampling.py` measures it against the alternatives).

Why not k-means on a rebalanced sample: k-means spends its clusters where its objective gains most.
It splits a large, spread-out mode in two before it separates a small mode from the large one next
to it. In `bench_rare_classes` (rare classes at cosine 0.5 to a host class), k-means also does this
on a sample that holds exactly the same number of rows of every generating component: 50 % mIoU at
k = 300, against 81 % for the generating means. So the fit's objective must change, not only its rows.

The method, in four steps (all rows are L2-normalised, as everywhere in `core.clustering`):

1. Codebook (`fit_codebook`): spherical k-means with k1 = `codebook_ratio` x k entries on a bounded
   sample (`fit_kmeans`, on at most `codebook_rows` rows per entry). It is fine enough that a rare
   mode gets entries of its own, and a large mode gets many.
2. Graph pass (`graph_partial`, a map over row blocks or shards): each row finds its best and
   second-best entry by cosine. It adds 1 to its best entry's count and itself to that entry's sum.
   It also adds exp(-margin / tau) to the edge between the two entries, where margin = best cosine -
   second cosine. A row on the bisector of two cells weighs 1 there; a row deep inside its cell weighs
   ~0. So an edge's weight measures how many rows lie on the boundary between two cells. tau is the
   median margin of the sample's head rows, which makes the weighting independent of the feature
   scale. Counts, fixed-point sums and weights are integers, so partials add up exactly in any order
   (`add_graph_partials`, the reduce). The result is byte-identical for any split of the rows.
3. Merge (`merge_groups`, on the driver; its size is the codebook's, not the rows'): it joins the two
   groups with the largest bridge W(G, H) / min(n_G, n_H), until k groups remain. The bridge is the
   boundary weight between the groups as a share of the smaller group's rows. Pieces of one mode
   share a wide boundary. Two modes meet across a density dip, so they join last, whatever their
   masses.
4. Centroids (`merged_centroids`): each group's normalised row sum.

Step 2 is the only step that reads every row. It costs one assignment pass against k1 entries,
i.e. `codebook_ratio` times a Lloyd pass at k.
"""

import heapq
from dataclasses import dataclass

import numpy as np
import scipy.sparse

from core.clustering.kmeans import check_features, fit_kmeans, l2_normalize
from core.clustering.lloyd import TIE_MARGIN

# Fixed-point scales: the partials are sums of integers, exact in any order. The sums are of unit
# rows, so |entry| <= 2**24 per row: int64 holds 2**39 rows. The weights are <= 2**20 per row.
SUM_SCALE = 1 << 24
WEIGHT_SCALE = 1 << 20
TAU_ROWS = 16384  # rows at the head of the sample whose median margin sets tau
BLOCK_ROWS = 8192  # rows per block of the graph pass: 8192 x k1 float32 cosines (98 MB at k1 = 3000)


@dataclass(frozen=True)
class CodebookMergeSettings:
    """codebook_ratio: codebook entries per final cluster (k1 = ratio x k). codebook_rows: sample rows
    per entry that its k-means is fitted on. codebook_iterations: its Lloyd iterations."""

    codebook_ratio: int = 10
    codebook_rows: int = 25
    codebook_iterations: int = 8

    def check(self) -> None:
        for name, low in (("codebook_ratio", 2), ("codebook_rows", 1), ("codebook_iterations", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name}={value!r}: must be an integer >= {low}")


@dataclass(frozen=True)
class Codebook:
    centroids: np.ndarray  # (k1, D) float32 unit rows
    tau: float  # the margin scale of the edge weights


@dataclass(frozen=True)
class GraphPartial:
    """What a block of rows adds to the graph: integers only, so partials add exactly in any order."""

    counts: np.ndarray  # (k1,) int64: rows whose best entry is each entry
    sums: np.ndarray  # (k1, D) int64: their unit rows, times SUM_SCALE, rounded
    edge_ids: np.ndarray  # (E,) int64, sorted and unique: i * k1 + j for the entry pair i < j
    edge_weights: np.ndarray  # (E,) int64: sum of the rows' WEIGHT_SCALE * exp(-margin / tau), rounded


def fit_codebook(sample: np.ndarray, k: int, seed: int, settings: CodebookMergeSettings) -> Codebook:
    """The codebook of k1 = codebook_ratio x k entries, fitted on at most codebook_rows x k1 rows of the
    (n, D) sample (raw or unit rows); its k-means++ runs on k1 rows, so it starts from k1 random rows.
    tau comes from the sample's first TAU_ROWS rows, which should be a uniform draw (the fit stage's
    sample is: `sample_patches` returns it in priority order)."""
    settings.check()
    if k < 2:
        raise ValueError(f"k={k}: k-means needs at least 2 clusters")
    check_features(sample, "codebook sample")
    entries = settings.codebook_ratio * k
    if entries > len(sample):
        raise ValueError(
            f"fit.codebook_ratio={settings.codebook_ratio}: a codebook of {entries} entries (k={k}) needs "
            f"at least as many sample rows, and there are {len(sample)}; lower fit.codebook_ratio or k"
        )
    centroids = fit_kmeans(
        sample,
        entries,
        seed,
        engine="faiss",
        n_iter=settings.codebook_iterations,
        max_points_per_centroid=settings.codebook_rows,
        init_points_per_centroid=1,
    )
    columns, c64 = np.ascontiguousarray(centroids.T), centroids.astype(np.float64)
    margins = [
        _best_two(l2_normalize(sample[start : start + BLOCK_ROWS]), columns, c64)[2]
        for start in range(0, min(len(sample), TAU_ROWS), BLOCK_ROWS)
    ]
    return Codebook(centroids, max(float(np.median(np.concatenate(margins))), 1e-12))


def _best_two(xn: np.ndarray, columns: np.ndarray, c64: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Unit rows (b, D), the codebook as contiguous (D, k1) float32 columns and as (k1, D) float64 ->
    (best entry, second entry, best cosine - second cosine in float64).

    float32 products find each row's top three; rows whose top three are within TIE_MARGIN of each
    other are re-scored in float64 (as `core.clustering` does for its assignment), so a row's pair
    does not depend on the block it came in. The margin is re-computed in float64 for every row."""
    cos = xn @ columns  # contiguous columns: OpenBLAS took ~4x longer with the transposed (k1, D) view
    rows = np.arange(len(xn))
    top = np.empty((len(xn), 3), np.int64)
    top_cos = np.empty((len(xn), 3), np.float32)
    for place in range(3):  # three arg-max passes: far cheaper than a partition of the (b, k1) block
        top[:, place] = cos.argmax(axis=1)
        top_cos[:, place] = cos[rows, top[:, place]]
        cos[rows, top[:, place]] = -np.inf
    near = (top_cos[:, 0] - top_cos[:, 1] < TIE_MARGIN) | (top_cos[:, 1] - top_cos[:, 2] < TIE_MARGIN)
    if near.any():
        exact = xn[near].astype(np.float64) @ c64.T
        top[near, :2] = np.argsort(-exact, axis=1, kind="stable")[:, :2]
    best, second = top[:, 0].astype(np.int64), top[:, 1].astype(np.int64)
    x64 = xn.astype(np.float64)
    margin = np.einsum("nd,nd->n", x64, c64[best]) - np.einsum("nd,nd->n", x64, c64[second])
    return best, second, np.maximum(margin, 0.0)


def empty_graph(codebook: Codebook) -> GraphPartial:
    k1, d = codebook.centroids.shape
    return GraphPartial(
        np.zeros(k1, np.int64), np.zeros((k1, d), np.int64), np.zeros(0, np.int64), np.zeros(0, np.int64)
    )


def graph_partial(features: np.ndarray, codebook: Codebook, block_rows: int = BLOCK_ROWS) -> GraphPartial:
    """The map step over (n, D) raw features (any block of rows, in any order): counts, fixed-point
    sums and boundary weights against the codebook. Memory is bounded by block_rows x (k1 + D) numbers
    plus the partial: (k1, D) int64 sums and one edge per entry pair that some row has as its best two."""
    c = codebook.centroids
    if features.ndim != 2 or features.shape[1] != c.shape[1]:
        raise ValueError(f"features of shape {features.shape} do not match the codebook's {c.shape}")
    k1 = len(c)
    columns, c64 = np.ascontiguousarray(c.T), c.astype(np.float64)
    total = empty_graph(codebook)
    for start in range(0, len(features), block_rows):
        xn = l2_normalize(features[start : start + block_rows])
        if not np.isfinite(xn).all():
            raise ValueError("feature rows contain NaN or inf")
        best, second, margin = _best_two(xn, columns, c64)
        b = len(xn)
        onehot = scipy.sparse.csr_array((np.ones(b, np.int64), (best, np.arange(b))), shape=(k1, b))
        fixed = np.rint(xn.astype(np.float64) * SUM_SCALE).astype(np.int64)
        weights = np.rint(WEIGHT_SCALE * np.exp(-margin / codebook.tau)).astype(np.int64)
        ids = np.minimum(best, second) * k1 + np.maximum(best, second)
        counts = np.bincount(best, minlength=k1).astype(np.int64)
        total = add_graph_partials(total, GraphPartial(counts, onehot @ fixed, *_sum_by_id(ids, weights)))
    return total


def _sum_by_id(ids: np.ndarray, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sorted unique ids and the integer sum of the weights of each (exact: no float on the way)."""
    if len(ids) == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    order = np.argsort(ids, kind="stable")
    ids, weights = ids[order], weights[order]
    starts = np.flatnonzero(np.r_[True, ids[1:] != ids[:-1]])
    return ids[starts], np.add.reduceat(weights, starts)


def add_graph_partials(a: GraphPartial, b: GraphPartial) -> GraphPartial:
    """The reduce step: two partials of disjoint row sets -> the partial of their union."""
    if a.sums.shape != b.sums.shape:
        raise ValueError(f"graph partials of different codebooks ({a.sums.shape} and {b.sums.shape})")
    ids, weights = _sum_by_id(
        np.concatenate([a.edge_ids, b.edge_ids]), np.concatenate([a.edge_weights, b.edge_weights])
    )
    return GraphPartial(a.counts + b.counts, a.sums + b.sums, ids, weights)


def merge_groups(graph: GraphPartial, k: int) -> np.ndarray:
    """(k1,) group of each codebook entry (0..k-1, numbered by their lowest entry; -1: an entry no row
    chose). Greedy: the pair of groups with the largest W(G, H) / min(n_G, n_H) joins first, ties to
    the lowest entry numbers. If the graph falls apart into more than k pieces, the smallest piece
    then joins the group of most similar centroid until k remain."""
    k1 = len(graph.counts)
    size = graph.counts.tolist()
    live = [i for i in range(k1) if size[i] > 0]
    if len(live) < k:
        raise ValueError(
            f"only {len(live)} of the {k1} codebook entries are the best entry of any row, fewer than "
            f"k={k}: give the graph pass more rows, or lower k"
        )
    neighbours: list[dict[int, int]] = [{} for _ in range(k1)]
    for pair, weight in zip(graph.edge_ids.tolist(), graph.edge_weights.tolist()):
        i, j = divmod(pair, k1)
        if size[i] and size[j] and weight > 0:  # an entry that is only ever second best is no cluster
            neighbours[i][j] = neighbours[j][i] = weight
    parent = list(range(k1))
    version = [0] * k1
    heap = [(-w / min(size[i], size[j]), i, j, 0, 0) for i in live for j, w in neighbours[i].items() if i < j]
    heapq.heapify(heap)
    groups = len(live)
    while groups > k and heap:
        _, i, j, vi, vj = heapq.heappop(heap)
        if parent[i] != i or parent[j] != j or version[i] != vi or version[j] != vj:
            continue  # a stale entry: one side has merged since it was pushed
        parent[j] = i  # j joins i (i < j); i's bridges are the sums of both
        size[i] += size[j]
        version[i] += 1
        for h, w in neighbours[j].items():
            del neighbours[h][j]
            if h != i:
                neighbours[i][h] = neighbours[h][i] = neighbours[i].get(h, 0) + w
        neighbours[i].pop(j, None)
        neighbours[j] = {}
        for h, w in neighbours[i].items():
            a, b = min(i, h), max(i, h)
            heapq.heappush(heap, (-w / min(size[i], size[h]), a, b, version[a], version[b]))
        groups -= 1
    roots = [i for i in live if parent[i] == i]
    sums = {r: np.zeros(graph.sums.shape[1], np.int64) for r in roots}
    for i in live:
        sums[_root(parent, i)] += graph.sums[i]
    while len(roots) > k:  # a graph in pieces (few rows): join by centroid cosine, smallest piece first
        small = min(roots, key=lambda r: (size[r], r))
        others = [r for r in roots if r != small]
        unit = l2_normalize(np.stack([sums[r] for r in others]).astype(np.float64))
        target = others[int(np.argmax(unit @ l2_normalize(sums[small].astype(np.float64))))]
        parent[small] = target
        size[target] += size[small]
        sums[target] = sums[target] + sums.pop(small)
        roots.remove(small)
    labels = np.full(k1, -1, np.int64)
    group_of_root = {r: g for g, r in enumerate(sorted(roots))}
    for i in live:
        labels[i] = group_of_root[_root(parent, i)]
    return labels


def _root(parent: list[int], i: int) -> int:
    while parent[i] != i:
        parent[i] = parent[parent[i]]
        i = parent[i]
    return i


def merged_centroids(graph: GraphPartial, k: int) -> np.ndarray:
    """(k, D) float32 unit centroids: the normalised row sum of each merged group."""
    labels = merge_groups(graph, k)
    live = labels >= 0
    sums = np.zeros((k, graph.sums.shape[1]), np.int64)
    np.add.at(sums, labels[live], graph.sums[live])
    return np.ascontiguousarray(l2_normalize(sums.astype(np.float64)), dtype=np.float32)


def fit_codebook_merge(
    x: np.ndarray,
    k: int,
    seed: int,
    settings: CodebookMergeSettings = CodebookMergeSettings(),
    block_rows: int = BLOCK_ROWS,
) -> np.ndarray:
    """(n, D) raw or unit features -> (k, D) float32 unit centroids, in one process: the codebook on a
    seeded sample of x, the graph pass over every row of x, the merge. Same input and seed, same bytes."""
    codebook = fit_codebook(x, k, seed, settings)
    return merged_centroids(graph_partial(x, codebook, block_rows), k)
