"""Benchmark: how well each k-means fit serves the rare classes after many-to-one majority mapping.

Inertia alone hides whether rare classes get clusters of their own, and that is what overclustering
is for. So three fits of the same rows are compared on the classes a majority mapping recovers:

- **faiss**: `fit_kmeans(engine="faiss")` with its project defaults (k-means++ on k x 64 sampled
  rows, 50 faiss spherical Lloyd iterations on k x 256 sampled rows).
- **faiss + Lloyd**: that fit, then `core.clustering.lloyd` over *all* training rows (at most
  --lloyd-iter = 20 passes, stopping once the inertia changes by less than --lloyd-tol = 1e-4, the
  default `fit.lloyd_tol`; the project runs this when `fit.lloyd_iterations` > 0).
- **paper MBK**: `fit_paper_minibatch`, the paper's MiniBatchKMeans (PAPER_MINIBATCH: batch_size=10000,
  max_iter=300, n_init=3, random_state=42) on all training rows; its rows are then assigned as the
  paper does (`assign_euclidean`, nearest of its non-unit centres).
- **generating means**: the scenario's 300 component means as if they were a k = 300 fit, through
  the same mapping and scoring: a reference for what the features allow, not an upper bound.

Scenario (seeded, deterministic): `bench.synthetic.Mixture` geometry (300 anisotropic Gaussians on
the unit sphere, 90-d) with its component sizes replaced: the components are grouped into 27
classes, the 19 Cityscapes evaluation classes with roughly Cityscapes' pixel shares (SHARES, rounded,
the shape of the imbalance only: motorcycle 0.09 %, rider 0.12 %, traffic light 0.18 %, bus and
train 0.21 %, ...) and 8 void classes that share the remaining 11.5 % and are ignored (255) in the
mapping and the scoring, as Cityscapes' void pixels are. A class gets components in proportion to
the square root of its share (at least 1), split within the class by a Zipf-like law: the 10
classes below 1 % get 2-7 components of 0.025-0.26 % of the rows each (motorcycle: 0.057 + 0.033 %).
To make the rare classes hard in the way real ones are (a rider looks like a person, a bus like a
car), each component of a class below 1 % has its mean moved to cosine --host-cosine (0.5) with a
component of a frequent "host" class (HOSTS).
A row's class is its component's class.

Per seed: one scenario, a training draw of --rows rows (fitted on, and its class counts map each
cluster to a class with `majority_mapping`) and a separate held-out draw of --test-rows rows
(scored: per-class IoU, mIoU, pixel accuracy; `core.evaluation.metrics`). "Recovered" = held-out IoU >=
--recovered-iou; "with a cluster" = at least one cluster mapped to the class. Inertia = sum over
the training rows of 1 - cosine to the most similar (normalised) centre, the same for every fit.
Prints a markdown table of the means over the seeds and writes bench/results/bench_rare_classes.json
after every seed.

    nice -n 10 .venv/bin/python -m bench.bench_rare_classes    # 1M rows, seeds 0 1: ~9 min per seed on 2 shared cores
"""

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np

from bench.synthetic import Mixture
from core.classes import CLASS_NAMES, IGNORE, NUM_CLASSES
from core.clustering.kmeans import (
    PAPER_MINIBATCH,
    assign_clusters,
    assign_euclidean,
    fit_kmeans,
    fit_paper_minibatch,
    inertia,
    l2_normalize,
)
from core.clustering.lloyd import lloyd
from core.evaluation.metrics import confusion_matrix, iou_per_class, mean_iou, pixel_accuracy
from core.mapping.majority import cluster_class_counts, majority_mapping, predict_classes

RESULTS = Path(__file__).resolve().parent / "results"
# % of rows of the 19 evaluation classes in trainId order (roughly Cityscapes' pixel shares, rounded).
SHARES = [
    32.6,
    5.4,
    20.2,
    0.58,
    0.78,
    1.09,
    0.18,
    0.49,
    14.1,
    1.03,
    3.56,
    1.08,
    0.12,
    6.19,
    0.24,
    0.21,
    0.21,
    0.09,
    0.37,
]
VOID_CLASSES = 8
HOSTS = {
    "wall": "building",
    "fence": "building",
    "traffic light": "pole",
    "traffic sign": "pole",
    "rider": "person",
    "truck": "car",
    "bus": "car",
    "train": "car",
    "motorcycle": "car",
    "bicycle": "person",
}
RAREST = [CLASS_NAMES[c] for c in np.argsort(SHARES, kind="stable")[:5]]
FITS = ("faiss", "faiss + Lloyd", "paper MBK", "generating means")


class RareClassMixture(Mixture):
    """Mixture geometry with class-grouped, Cityscapes-like component sizes and rare classes near hosts."""

    def __init__(self, components: int, dim: int, seed: int, host_cosine: float):
        super().__init__(components, dim, seed=seed)
        share = np.array(SHARES + [(100 - sum(SHARES)) / VOID_CLASSES] * VOID_CLASSES) / 100
        per_class = np.maximum(1, np.round(components * np.sqrt(share) / np.sqrt(share).sum())).astype(int)
        per_class[0] += components - per_class.sum()  # rounding remainder to road, the largest class
        self.component_class = np.repeat(np.arange(len(share)), per_class)
        zipf = [1 / np.arange(1, m + 1) ** 0.8 for m in per_class]
        self.weights = np.concatenate([s * z / z.sum() for s, z in zip(share, zipf)])
        means = self.means.copy()
        for rare, host in HOSTS.items():
            hosts = np.flatnonzero(self.component_class == CLASS_NAMES.index(host))
            for i, comp in enumerate(np.flatnonzero(self.component_class == CLASS_NAMES.index(rare))):
                h = self.means[hosts[i % len(hosts)]]
                own = self.means[comp] - (self.means[comp] @ h) * h  # its own direction, orthogonal to the host's
                means[comp] = host_cosine * h + np.sqrt(1 - host_cosine**2) * own / np.linalg.norm(own)
        self.means = l2_normalize(means)

    def labelled(self, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
        """(n, dim) unit rows and their (n,) uint8 trainIds (void classes -> IGNORE)."""
        x, comp = self.sample(n, seed)
        cls = self.component_class[comp]
        return x, np.where(cls < NUM_CLASSES, cls, IGNORE).astype(np.uint8)


def score(
    name: str,
    k: int,
    train_ids: np.ndarray,
    test_ids: np.ndarray,
    y_train: np.ndarray,
    y_test: np.ndarray,
    train_inertia: float,
    fit_s: float | None,
    extra: dict,
    recovered_iou: float,
) -> dict:
    mapping = majority_mapping(cluster_class_counts(train_ids, y_train, k, NUM_CLASSES))
    conf = confusion_matrix(y_test, predict_classes(test_ids, mapping), NUM_CLASSES)
    iou = iou_per_class(conf)
    return {
        "fit": name,
        "k": k,
        "fit_s": fit_s,
        "inertia": train_inertia,
        "empty_clusters": int((np.bincount(train_ids, minlength=k) == 0).sum()),
        "miou": mean_iou(conf),
        "pixel_accuracy": pixel_accuracy(conf),
        "recovered": int((np.nan_to_num(iou) >= recovered_iou).sum()),
        "with_a_cluster": len(set(mapping.tolist())),
        "clusters_per_class": dict(zip(CLASS_NAMES, np.bincount(mapping, minlength=NUM_CLASSES).tolist())),
        "per_class_iou": dict(zip(CLASS_NAMES, iou.tolist())),
        **extra,
    }


def run_seed(args, seed: int) -> list[dict]:
    mixture = RareClassMixture(args.components, args.dim, seed, args.host_cosine)
    x, y = mixture.labelled(args.rows, seed=2 * seed)
    x_test, y_test = mixture.labelled(args.test_rows, seed=2 * seed + 1)

    out = []
    for k in args.k:
        start = time.perf_counter()
        faiss_c = fit_kmeans(x, k, seed=seed, engine="faiss")
        faiss_s = time.perf_counter() - start
        start = time.perf_counter()
        lloyd_c, history = lloyd(x, faiss_c, max_iter=args.lloyd_iter, tol=args.lloyd_tol)
        lloyd_s = time.perf_counter() - start
        start = time.perf_counter()
        seed_c = fit_paper_minibatch(x, k)
        seed_s = time.perf_counter() - start
        fits = [
            ("faiss", faiss_c, faiss_s, {}),
            ("faiss + Lloyd", lloyd_c, faiss_s + lloyd_s, {"lloyd_passes": len(history)}),
            ("paper MBK", seed_c, seed_s, {}),
        ]
        if k == args.components:
            fits.append(("generating means", mixture.means, None, {}))
        for name, c, fit_s, extra in fits:
            nearest = assign_clusters(x, c)  # cosine: every fit's inertia, and the labels of the unit-centre fits
            # The paper labels by Euclidean distance to its non-unit centres (sklearn's predict), as the paper
            # protocol does.
            assign = assign_euclidean if name == "paper MBK" else assign_clusters
            train_ids = assign(x, c) if name == "paper MBK" else nearest
            result = score(
                name,
                k,
                train_ids,
                assign(x_test, c),
                y,
                y_test,
                inertia(x, l2_normalize(c), nearest),
                fit_s,
                extra,
                args.recovered_iou,
            )
            out.append({"seed": seed, **result})
            print(
                f"seed {seed} k {k:>3} {name:<16} fit {fit_s or 0:7.1f} s  inertia {result['inertia']:.5g}  "
                f"mIoU {result['miou']:.3f}  recovered {result['recovered']:>2}  "
                f"with a cluster {result['with_a_cluster']:>2}  "
                + "  ".join(f"{c} {result['per_class_iou'][c]:.2f}" for c in RAREST),
                flush=True,
            )
    return out


def summary(runs: list[dict]) -> list[dict]:
    """Means over the seeds for each (k, fit); inertia also relative to the faiss fit of the same seed and k."""
    faiss_inertia = {(r["seed"], r["k"]): r["inertia"] for r in runs if r["fit"] == "faiss"}
    rows = []
    for k in sorted({r["k"] for r in runs}):
        for name in FITS:
            group = [r for r in runs if r["k"] == k and r["fit"] == name]
            if not group:
                continue

            def mean(f, group=group) -> float:
                return float(np.mean([f(r) for r in group]))

            rows.append(
                {
                    "k": k,
                    "fit": name,
                    "seeds": len(group),
                    "fit_s": None if name == "generating means" else mean(lambda r: r["fit_s"]),
                    "inertia_vs_faiss": mean(lambda r, k=k: r["inertia"] / faiss_inertia[(r["seed"], k)]),
                    **{
                        key: mean(lambda r, key=key: r[key])
                        for key in ("miou", "pixel_accuracy", "recovered", "with_a_cluster")
                    },
                    "rarest_iou": {c: mean(lambda r, c=c: r["per_class_iou"][c]) for c in RAREST},
                }
            )
    return rows


def markdown(rows: list[dict], recovered_iou: float) -> str:
    lines = [
        f"| k | fit | fit s | inertia / faiss | mIoU | pixel acc. | recovered (IoU >= {recovered_iou:.2f}) | "
        f"with a cluster | {' | '.join(RAREST)} |",
        "|---:|---|---:|---:|---:|---:|---:|---:|" + "---:|" * len(RAREST),
    ]
    for r in rows:
        lines.append(
            f"| {r['k']} | {r['fit']} | {'-' if r['fit_s'] is None else format(r['fit_s'], '.1f')} | "
            f"{r['inertia_vs_faiss']:.4f} | {100 * r['miou']:.1f} | {100 * r['pixel_accuracy']:.1f} | "
            f"{r['recovered']:.1f} / {NUM_CLASSES} | {r['with_a_cluster']:.1f} | "
            + " | ".join(f"{100 * v:.1f}" for v in r["rarest_iou"].values())
            + " |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000, help="training rows per seed (fitted and mapped on)")
    parser.add_argument("--test-rows", type=int, default=500_000, help="held-out rows per seed (scored)")
    parser.add_argument("--k", type=int, nargs="+", default=[300, 100])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--components", type=int, default=300)
    parser.add_argument("--dim", type=int, default=90)
    parser.add_argument(
        "--host-cosine", type=float, default=0.5, help="cosine of a rare component's mean to its host's"
    )
    parser.add_argument("--lloyd-iter", type=int, default=20)
    parser.add_argument("--lloyd-tol", type=float, default=1e-4)
    parser.add_argument("--recovered-iou", type=float, default=0.1)
    parser.add_argument("--out", type=Path, default=RESULTS / "bench_rare_classes.json")
    args = parser.parse_args()

    report = {
        "benchmark": "bench_rare_classes",
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "shares_percent": dict(zip(CLASS_NAMES, SHARES)),
        "hosts": HOSTS,
        "rarest": RAREST,
        "seed_minibatch": PAPER_MINIBATCH,
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
        args.out.write_text(json.dumps(report, indent=2))  # after every seed: a run that is stopped keeps its results
        # The table so far after every seed, too: the last one printed is the result of a run stopped early.
        print(
            f"\nmeans over seeds {sorted({r['seed'] for r in report['runs']})}, {args.rows:,} training / "
            f"{args.test_rows:,} held-out rows, {report['total_s']} s so far\n\n"
            f"{markdown(report['summary'], args.recovered_iou)}\n",
            flush=True,
        )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
