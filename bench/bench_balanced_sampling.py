"""Benchmark: which way of choosing or fitting the rows gives the rare classes clusters (issue 29).

Scenario: `bench_rare_classes` (300 components, Cityscapes-like class shares; every component of the
10 classes below 1 % sits at cosine --host-cosine 0.5 to a component of a frequent host class). Per
seed: one training draw of --rows rows, which is fitted on and whose class counts map each cluster
by majority, and one held-out draw of --test-rows rows, which is scored (`bench_rare_classes.score`:
held-out IoU, classes recovered at IoU >= 10 %, inertia on the training rows). Every method gets
the same rows and the same k. Each fit is timed from the training rows to its k centroids, in the
same process, one after the other, after an untimed warm-up fit. Today's fit (`uniform`) is timed
first and again last, and every ratio is to the mean of its two times, so the ratios are fair
within a run. Absolute seconds depend on the load of the machine.

Methods (k = 300 or 100; "the sample" = today's k x 256 uniform rows, as in `fit_kmeans`):
- uniform: today's fit, `fit_kmeans(engine="faiss")`: k-means++ on k x 64 rows, 50 faiss
  spherical Lloyd iterations on k x 256 rows.
- reference: Vo et al. 2024 (facebookresearch/ssl-data-curation) at this scale. Hierarchical
  k-means: level 1 on the rows, each higher level on the centroids of the level below. Each level
  runs k-means, then "resampling steps": take the `sample size` points closest to each centroid,
  run k-means on those, and assign all points again. Then the hierarchical balanced sampling ('r'):
  k x 256 rows, split as evenly as possible over the top clusters, and within each cluster over its
  children, down to random rows of level-1 clusters. Then `fit_kmeans` on those rows. Two shapes:
  2 levels [10k/3 (3 steps, 150 closest), k (10 steps, 2)]; 3 levels [10k (no resampling, as the
  reference's 4-level config does at level 1; k-means on 25 rows per centroid), 10k/3 (10 steps, 2),
  k (10 steps, 2)]. Every k-means in the hierarchy is `fit_kmeans` with 20 iterations (the
  reference: 50).
- inverse density: a k-means codebook of 10k entries (25 sampled rows per entry, 8 iterations).
  Every row is weighted by (rows in its cell)^-beta. Then k x 256 rows are drawn by weight without
  replacement (Efraimidis-Spirakis keys), and `fit_kmeans` runs on them. beta = 1 balances the cells
  (one level of the reference's sampling); beta = 0.5 is a soft balance.
- size-penalised Lloyd: today's seeding and sample, then 50 Lloyd iterations that assign each row
  to argmax cos - lambda x ln(n_j / mean n). n_j are the cluster sizes of the previous iteration,
  so a large cluster repels rows toward small ones.
- bisect by spread / by SSE: `fit_kmeans` at k/2 on the sample, then repeatedly split (2-means) the
  cluster with the largest mean 1 - cosine (spread) or the largest sum (SSE), until k.
- farthest-point / k-means|| seeding: today's sample and Lloyd, seeded by greedy farthest-point
  (k-center) on k x 64 rows, or by k-means|| (Bahmani et al. 2012: 5 rounds of 2k expected
  draws, candidates weighted by their cells, weighted k-means++ down to k).
- codebook as points: the inverse-density codebook's centroids, weighted by (rows in cell)^beta
  (beta 0 or 0.5), fitted to k by faiss k-means (k-means++ seeding).
- codebook merge: `core.clustering.codebook_merge.fit_codebook_merge` (this issue's method, its module
  docstring): the codebook, one graph pass over all training rows, merge to k groups. The
  "graph on the sample" variant uses only the codebook's 25 rows per entry for the graph pass.
- oracle, balanced by component: `fit_kmeans` on k x 256 rows drawn equally from every generating
  component (needs the labels): the best any sample-then-k-means method could do.
- generating means (k = 300 only): the 300 component means as centroids (`bench_rare_classes`).
- generating means, k chosen by class (k < 300): k of the means, chosen with the labels: round robin
  over the 19 evaluation classes, largest components first, no void ones. What the features allow
  when there are fewer clusters than components.

    nice -n 10 env OMP_NUM_THREADS=1 .venv/bin/python -m bench.bench_balanced_sampling
    # 300k training / 200k held-out rows, k 300 100, seeds 0 1 2; writes bench/results/bench_balanced_sampling.json
"""

import argparse
import dataclasses
import json
import math
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import scipy.sparse

import core.clustering as clustering
from bench.bench_rare_classes import HOSTS, RAREST, SHARES, RareClassMixture, score
from core.classes import CLASS_NAMES, IGNORE, NUM_CLASSES
from core.clustering.codebook_merge import (
    CodebookMergeSettings,
    fit_codebook,
    fit_codebook_merge,
    graph_partial,
    merged_centroids,
)
from core.clustering.kmeans import assign_clusters, fit_kmeans, inertia, kmeans_plusplus, l2_normalize

RESULTS = Path(__file__).resolve().parent / "results"
SAMPLE_PER_CLUSTER = 256  # fit_kmeans's max_points_per_centroid: today's sample is k x 256 rows
INIT_PER_CLUSTER = 64  # and its k-means++ runs on k x 64 of them
CODEBOOK = CodebookMergeSettings()  # the codebook every codebook-based method shares: 10k entries
HIERARCHY_ITERATIONS = 20


def faiss_lloyd(xs: np.ndarray, init: np.ndarray, n_iter: int = 50, weights: np.ndarray | None = None) -> np.ndarray:
    """Spherical Lloyd with faiss from given centroids on all of xs (as `fit_kmeans` runs it)."""
    import faiss

    km = faiss.Kmeans(
        xs.shape[1],
        len(init),
        niter=n_iter,
        spherical=True,
        verbose=False,
        max_points_per_centroid=len(xs),
        min_points_per_centroid=1,
    )
    km.train(
        np.ascontiguousarray(xs, np.float32),
        init_centroids=np.ascontiguousarray(init, np.float32),
        weights=None if weights is None else np.ascontiguousarray(weights, np.float32),
    )
    return l2_normalize(km.centroids)


def today_sample(x: np.ndarray, k: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """fit_kmeans's rows: (k x 256 unit rows, the k x 64 of them its k-means++ runs on)."""
    rng = np.random.default_rng(seed)
    chosen = rng.choice(len(x), min(len(x), k * SAMPLE_PER_CLUSTER), replace=False)
    return l2_normalize(x[np.sort(chosen)]), l2_normalize(x[np.sort(chosen[: k * INIT_PER_CLUSTER])])


def weighted_draw(weights: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """n row indices drawn by weight without replacement (Efraimidis-Spirakis: the n smallest Exp(1) / w)."""
    keys = rng.exponential(size=len(weights)) / weights
    return np.sort(np.argpartition(keys, n - 1)[:n])


def codebook_cells(x: np.ndarray, k: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The shared codebook (10k entries), each row's cell and each cell's row count."""
    centroids = fit_codebook(x, k, seed, CODEBOOK).centroids
    cell = assign_clusters(x, centroids)
    return centroids, cell, np.bincount(cell, minlength=len(centroids))


# --- the reference: hierarchical k-means with resampling, then hierarchical balanced sampling ---


def kmeans_level(
    points: np.ndarray, clusters: int, steps: int, sample_size: int, seed: int, init: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """One level: k-means (or `init`), then steps - 1 resampling steps, each k-means on the
    `sample_size` points closest to each centroid and a new assignment of all points."""
    centroids = fit_kmeans(points, clusters, seed, n_iter=HIERARCHY_ITERATIONS) if init is None else init
    assignment = assign_clusters(points, centroids)
    for step in range(1, steps):
        cos = np.einsum("nd,nd->n", points, centroids[assignment])
        order = np.lexsort((-cos, assignment))  # by cluster, closest first
        starts = np.searchsorted(assignment[order], np.arange(clusters))
        rank = np.arange(len(points)) - starts[assignment[order]]
        chosen = np.sort(order[rank < sample_size])
        centroids = fit_kmeans(points[chosen], min(clusters, len(chosen)), seed + step, n_iter=HIERARCHY_ITERATIONS)
        assignment = assign_clusters(points, centroids)
    return centroids, assignment


def balanced_quotas(sizes: np.ndarray, target: int, rng: np.random.Generator) -> np.ndarray:
    """As even a split of `target` over clusters of `sizes` as they allow: the largest cap t with
    sum(min(t, sizes)) <= target, the remainder one each to random clusters larger than t."""
    if sizes.sum() <= target:
        return sizes.copy()
    low, high = 0, int(sizes.max())
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (mid, high) if np.minimum(mid, sizes).sum() <= target else (low, mid)
    quotas = np.minimum(low, sizes)
    extra = target - int(quotas.sum())
    quotas[rng.choice(np.flatnonzero(sizes > low), extra, replace=False)] += 1
    return quotas


def hierarchical_sample(
    parents: list[np.ndarray], clusters: list[int], target: int, rng: np.random.Generator
) -> np.ndarray:
    """parents[0]: each row's level-1 cluster; parents[l]: each level-l cluster's level-(l+1) cluster;
    clusters[l]: the number of level-(l+1) clusters. Quotas go down the tree by `balanced_quotas`; a
    level-1 cluster gives random rows ('r')."""
    counts = [np.bincount(parents[0], minlength=clusters[0])]  # rows under each cluster, per level
    for parent, n in zip(parents[1:], clusters[1:]):
        counts.append(np.bincount(parent, weights=counts[-1], minlength=n).astype(np.int64))
    quotas = balanced_quotas(counts[-1], target, rng)
    for level in range(len(parents) - 1, 0, -1):
        children = parents[level]
        below = np.zeros(len(children), np.int64)
        for cluster in np.flatnonzero(quotas):
            members = np.flatnonzero(children == cluster)
            below[members] = balanced_quotas(counts[level - 1][members], int(quotas[cluster]), rng)
        quotas = below
    order = rng.permutation(len(parents[0]))
    order = order[np.argsort(parents[0][order], kind="stable")]  # rows by level-1 cluster, random within
    starts = np.r_[0, np.cumsum(counts[0])[:-1]]
    return np.sort(np.concatenate([order[s : s + q] for s, q in zip(starts, quotas) if q]))


def reference(levels: list[tuple[int, int, int]], first_from_codebook: bool) -> Callable:
    """levels: (clusters as a multiple of k, resampling steps, sample size) from the bottom up."""

    def fit(x: np.ndarray, k: int, seed: int) -> tuple[np.ndarray, dict]:
        xn = l2_normalize(x)
        points, parents, clusters = xn, [], []
        for depth, (ratio, steps, size) in enumerate(levels):
            clusters.append(max(2, round(ratio * k)))
            init = fit_codebook(x, k, seed, CODEBOOK).centroids if depth == 0 and first_from_codebook else None
            points, assignment = kmeans_level(points, clusters[-1], steps, size, seed + 1000 * depth, init)
            parents.append(assignment)
        rows = hierarchical_sample(parents, clusters, k * SAMPLE_PER_CLUSTER, np.random.default_rng(seed))
        return fit_kmeans(xn[rows], k, seed), {"sample_rows": len(rows)}

    return fit


# --- the other candidates ---


def uniform(x, k, seed):
    return fit_kmeans(x, k, seed, engine="faiss"), {}


def inverse_density(beta: float) -> Callable:
    def fit(x, k, seed):
        _, cell, counts = codebook_cells(x, k, seed)
        weights = counts[cell].astype(np.float64) ** -beta
        rows = weighted_draw(weights, k * SAMPLE_PER_CLUSTER, np.random.default_rng(seed))
        return fit_kmeans(x[rows], k, seed), {}

    return fit


def size_penalised(penalty: float, n_iter: int = 50) -> Callable:
    def fit(x, k, seed):
        xs, init_rows = today_sample(x, k, seed)
        c = init_rows[kmeans_plusplus(init_rows, k, seed)]
        counts = np.full(k, len(xs) / k)
        for _ in range(n_iter):
            scores = xs @ np.ascontiguousarray(c.T) - penalty * np.log(np.maximum(counts, 1) / (len(xs) / k))
            assignment = scores.argmax(axis=1)
            counts = np.bincount(assignment, minlength=k)
            onehot = scipy.sparse.csr_array((np.ones(len(xs)), (assignment, np.arange(len(xs)))), shape=(k, len(xs)))
            sums = onehot @ xs.astype(np.float64)
            c = np.where(counts[:, None] > 0, l2_normalize(sums), c).astype(np.float32)
        return c, {"empty_in_sample": int((counts == 0).sum())}

    return fit


def bisect(by: str) -> Callable:
    def fit(x, k, seed):
        xs, _ = today_sample(x, k, seed)
        c = list(fit_kmeans(xs, k // 2, seed))
        assignment = assign_clusters(xs, np.stack(c))
        while len(c) < k:
            cos = np.einsum("nd,nd->n", xs, np.stack(c)[assignment])
            sse = np.bincount(assignment, weights=1 - cos, minlength=len(c))
            sizes = np.bincount(assignment, minlength=len(c))
            spread = sse / np.maximum(sizes, 1) if by == "spread" else sse
            worst = int(np.where(sizes >= 2, spread, -1.0).argmax())
            members = np.flatnonzero(assignment == worst)
            halves = fit_kmeans(xs[members], 2, seed + len(c))
            c[worst] = halves[0]
            c.append(halves[1])
            assignment[members] = np.where(assign_clusters(xs[members], halves) == 0, worst, len(c) - 1)
        return np.stack(c), {}

    return fit


def farthest_point(x, k, seed):
    xs, init_rows = today_sample(x, k, seed)
    chosen = [int(np.random.default_rng(seed).integers(len(init_rows)))]
    nearest = init_rows @ init_rows[chosen[0]]
    for _ in range(1, k):
        chosen.append(int(nearest.argmin()))  # the row least similar to every centre so far
        nearest = np.maximum(nearest, init_rows @ init_rows[chosen[-1]])
    return faiss_lloyd(xs, init_rows[chosen]), {}


def weighted_kmeans_plusplus(points: np.ndarray, weights: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """Greedy k-means++ on weighted points (weight x squared distance), 2 + ln k trials per centre."""
    trials = 2 + int(math.log(k))
    chosen = [int(rng.choice(len(points), p=weights / weights.sum()))]
    closest = 2 - 2 * points @ points[chosen[0]]
    for _ in range(1, k):
        potential = np.cumsum(weights * np.maximum(closest, 0))
        candidates = np.minimum(np.searchsorted(potential, rng.random(trials) * potential[-1]), len(points) - 1)
        options = np.minimum(closest[None], 2 - 2 * points[candidates] @ points.T)
        best = int((options * weights).sum(axis=1).argmin())
        chosen.append(int(candidates[best]))
        closest = options[best]
    return np.array(chosen)


def kmeans_parallel(x, k, seed, rounds: int = 5):
    xs, _ = today_sample(x, k, seed)
    rng = np.random.default_rng(seed)
    candidates = [int(rng.integers(len(xs)))]
    closest = 2 - 2 * xs @ xs[candidates[0]]
    for _ in range(rounds):  # each round draws ~2k rows, each by its squared distance to the candidates
        drawn = np.flatnonzero(rng.random(len(xs)) < np.minimum(1.0, 2 * k * closest / closest.sum()))
        candidates += drawn.tolist()
        closest = np.minimum(closest, (2 - 2 * xs @ xs[drawn].T).min(axis=1)) if len(drawn) else closest
    points = xs[candidates]
    weights = np.bincount(assign_clusters(xs, points), minlength=len(points)).astype(np.float64) + 1e-9
    return faiss_lloyd(xs, points[weighted_kmeans_plusplus(points, weights, k, rng)]), {"candidates": len(points)}


def codebook_points(beta: float) -> Callable:
    def fit(x, k, seed):
        centroids, _, counts = codebook_cells(x, k, seed)
        keep = counts > 0
        points, weights = centroids[keep], counts[keep].astype(np.float64) ** beta
        init = points[weighted_kmeans_plusplus(points, weights, k, np.random.default_rng(seed))]
        return faiss_lloyd(points, init, weights=weights), {}

    return fit


def codebook_merge(x, k, seed):
    return fit_codebook_merge(x, k, seed, CODEBOOK), {}


def codebook_merge_on_sample(x, k, seed):
    """The graph pass over 25 rows per codebook entry (a seeded uniform subset), not every row."""
    codebook = fit_codebook(x, k, seed, CODEBOOK)
    n = min(len(x), len(codebook.centroids) * CODEBOOK.codebook_rows)
    rows = np.sort(np.random.default_rng(seed).choice(len(x), n, replace=False))
    return merged_centroids(graph_partial(x[rows], codebook), k), {"graph_rows": len(rows)}


def oracle_balanced(component: np.ndarray) -> Callable:
    def fit(x, k, seed):
        rng = np.random.default_rng(seed)
        rows = balanced_quotas(np.bincount(component), k * SAMPLE_PER_CLUSTER, rng)
        order = rng.permutation(len(x))
        order = order[np.argsort(component[order], kind="stable")]
        starts = np.r_[0, np.cumsum(np.bincount(component))[:-1]]
        chosen = np.sort(np.concatenate([order[s : s + q] for s, q in zip(starts, rows) if q]))
        return fit_kmeans(x[chosen], k, seed), {}

    return fit


METHODS = {
    "uniform (today)": uniform,
    "reference, 2 levels [10k/3 (3 steps, 150), k (10, 2)]": reference([(10 / 3, 3, 150), (1, 10, 2)], False),
    "reference, 3 levels [10k (codebook), 10k/3 (10, 2), k (10, 2)]": reference(
        [(10, 1, 0), (10 / 3, 10, 2), (1, 10, 2)], True
    ),
    "inverse density, beta 1": inverse_density(1.0),
    "inverse density, beta 0.5": inverse_density(0.5),
    "size-penalised Lloyd, lambda 0.05": size_penalised(0.05),
    "size-penalised Lloyd, lambda 0.2": size_penalised(0.2),
    "bisect by spread": bisect("spread"),
    "bisect by SSE": bisect("sse"),
    "farthest-point seeding": farthest_point,
    "k-means|| seeding": kmeans_parallel,
    "codebook as points, beta 0": codebook_points(0.0),
    "codebook as points, beta 0.5": codebook_points(0.5),
    "codebook merge (core.clustering.codebook_merge)": codebook_merge,
    "codebook merge, graph on the sample": codebook_merge_on_sample,
}
ORACLES = ("oracle, balanced by component", "generating means", "generating means, k chosen by class")


def run_seed(args, seed: int) -> list[dict]:
    mixture = RareClassMixture(args.components, args.dim, seed, args.host_cosine)
    x, component = mixture.sample(args.rows, seed=2 * seed)
    x_test, y_test = mixture.labelled(args.test_rows, seed=2 * seed + 1)
    cls = mixture.component_class[component]
    y = np.where(cls < NUM_CLASSES, cls, IGNORE).astype(np.uint8)
    methods = {name: fit for name, fit in METHODS.items() if not args.only or any(s in name for s in args.only)}
    methods["oracle, balanced by component"] = oracle_balanced(component)
    out = []
    for k in args.k:
        fit_kmeans(x[: k * INIT_PER_CLUSTER], k, seed)  # untimed warm-up: imports, thread pools, first-touch pages
        means = mixture.means if k == args.components else by_class_means(mixture, k)
        runs = []
        for name, fit in [*methods.items(), (ORACLES[1] if k == args.components else ORACLES[2], None)]:
            load = os.getloadavg()[0]
            start = time.perf_counter()
            c, extra = (means, {}) if fit is None else fit(x, k, seed)
            fit_s = None if fit is None else time.perf_counter() - start
            c = l2_normalize(c)
            train_ids = assign_clusters(x, c)
            result = score(
                name,
                k,
                train_ids,
                assign_clusters(x_test, c),
                y,
                y_test,
                inertia(x, c, train_ids),
                fit_s,
                {**extra, "load_average": load},
                args.recovered_iou,
            )
            runs.append({"seed": seed, **result})
            rarest = " ".join(f"{100 * result['per_class_iou'][c]:4.1f}" for c in RAREST)
            print(
                f"seed {seed} k {k:>3} {name[:44]:<44} fit {fit_s or 0:6.1f} s  mIoU {100 * result['miou']:5.1f} "
                f"recovered {result['recovered']:>2} with a cluster {result['with_a_cluster']:>2}  {rarest}",
                flush=True,
            )
        # today's fit is timed a second time after all the others, and the ratios are to the mean of its two
        # times: a load change during the run then biases no method's ratio by much more than it biases uniform's
        uniform_runs = [r for r in runs if r["fit"] == "uniform (today)"]
        if uniform_runs:
            start = time.perf_counter()
            uniform(x, k, seed)
            uniform_runs[0]["fit_s_again"] = time.perf_counter() - start
            reference_s = (uniform_runs[0]["fit_s"] + uniform_runs[0]["fit_s_again"]) / 2
            for r in runs:
                r["fit_vs_uniform"] = None if r["fit_s"] is None else r["fit_s"] / reference_s
        out += runs
    return out


def by_class_means(mixture: RareClassMixture, k: int) -> np.ndarray:
    """k of the generating means chosen with the labels: round robin over the 19 evaluation classes,
    each class's components largest first, no void component. A reference for k < components."""
    queues = []
    for c in range(NUM_CLASSES):
        members = np.flatnonzero(mixture.component_class == c)
        queues.append(list(members[np.argsort(-mixture.weights[members], kind="stable")]))
    chosen: list[int] = []
    while len(chosen) < k and any(queues):
        chosen += [q.pop(0) for q in queues if q][: k - len(chosen)]
    return mixture.means[chosen]


def summary(runs: list[dict]) -> list[dict]:
    """Means over the seeds per (k, method); inertia relative to uniform's of the same seed and k."""
    base = {(r["seed"], r["k"]): r["inertia"] for r in runs if r["fit"] == "uniform (today)"}
    rows = []
    for k in sorted({r["k"] for r in runs}, reverse=True):
        for name in [*METHODS, *ORACLES]:
            group = [r for r in runs if r["k"] == k and r["fit"] == name]
            if not group:
                continue

            def mean(f, group=group) -> float:
                return float(np.mean([f(r) for r in group]))

            timed = [r for r in group if r["fit_s"] is not None]
            rows.append(
                {
                    "k": k,
                    "fit": name,
                    "seeds": len(group),
                    "fit_s": float(np.mean([r["fit_s"] for r in timed])) if timed else None,
                    "fit_vs_uniform": float(np.mean([r["fit_vs_uniform"] for r in timed]))
                    if timed and all(r["fit_vs_uniform"] is not None for r in timed)
                    else None,
                    "inertia_vs_uniform": mean(lambda r, k=k: r["inertia"] / base[(r["seed"], k)])
                    if all((r["seed"], k) in base for r in group)
                    else None,
                    **{key: mean(lambda r, key=key: r[key]) for key in ("miou", "recovered", "with_a_cluster")},
                    "recovered_min": min(r["recovered"] for r in group),
                    "miou_min": min(r["miou"] for r in group),
                    "rarest_iou": {c: mean(lambda r, c=c: r["per_class_iou"][c]) for c in RAREST},
                }
            )
    return rows


def markdown(rows: list[dict]) -> str:
    lines = [
        "| k | method | fit s | fit / uniform | inertia / uniform | mIoU (min) | recovered (min) | "
        "with a cluster | " + " | ".join(RAREST) + " |",
        "|---:|---|---:|---:|---:|---:|---:|---:|" + "---:|" * len(RAREST),
    ]
    fmt = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
    for r in rows:
        lines.append(
            f"| {r['k']} | {r['fit']} | {fmt(r['fit_s'], '.1f')} | {fmt(r['fit_vs_uniform'], '.2f')} | "
            f"{fmt(r['inertia_vs_uniform'], '.3f')} | {100 * r['miou']:.1f} ({100 * r['miou_min']:.1f}) | "
            f"{r['recovered']:.1f} ({r['recovered_min']}) | {r['with_a_cluster']:.1f} | "
            + " | ".join(f"{100 * v:.1f}" for v in r["rarest_iou"].values())
            + " |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=300_000, help="training rows per seed (fitted and mapped on)")
    parser.add_argument("--test-rows", type=int, default=200_000, help="held-out rows per seed (scored)")
    parser.add_argument("--k", type=int, nargs="+", default=[300, 100])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--components", type=int, default=300)
    parser.add_argument("--dim", type=int, default=90)
    parser.add_argument("--host-cosine", type=float, default=0.5)
    parser.add_argument("--recovered-iou", type=float, default=0.1)
    parser.add_argument(
        "--threads", type=int, default=1, help="faiss threads of every fit (fit_kmeans uses 8 otherwise)"
    )
    parser.add_argument("--only", nargs="*", default=[], help="run only the methods whose name contains one of these")
    parser.add_argument("--out", type=Path, default=RESULTS / "bench_balanced_sampling.json")
    args = parser.parse_args()

    import faiss

    clustering.FAISS_THREADS = args.threads  # fit_kmeans sets this count around each faiss fit
    faiss.omp_set_num_threads(args.threads)  # and this one holds for the methods' own faiss calls
    report = {
        "benchmark": "bench_balanced_sampling",
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "codebook": dataclasses.asdict(CODEBOOK),
        "shares_percent": dict(zip(CLASS_NAMES, SHARES)),
        "hosts": HOSTS,
        "rarest": RAREST,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "runs": [],
        "summary": [],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    for seed in args.seeds:
        report["runs"] += run_seed(args, seed)
        report["summary"] = summary(report["runs"])
        report["total_s"] = round(time.perf_counter() - start, 1)
        args.out.write_text(json.dumps(report, indent=2))  # after every seed: a stopped run keeps its results
        print(
            f"\nmeans over seeds {sorted({r['seed'] for r in report['runs']})}, {args.rows:,} training / "
            f"{args.test_rows:,} held-out rows, {report['total_s']} s so far\n\n{markdown(report['summary'])}\n",
            flush=True,
        )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
