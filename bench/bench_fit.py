"""Benchmark: our fit_kmeans (faiss: k-means++ on a sample + faiss spherical Lloyd on k*256 rows) against
scikit-learn MiniBatchKMeans (the paper's choice) on the same features, k = 300, 90-d.

For each --rows: generate a synthetic mixture (bench/synthetic.py), fit both, and evaluate both
fits' spherical inertia (sum of 1 - cosine to the nearest centroid) the same way on the *full* set
(core.clustering.lloyd.lloyd_partial, block-wise). Prints the time and inertia ratios of this one run and
writes bench/results/bench_fit.json. Sizes whose float32 array would exceed --max-gib are skipped
and reported as such.

MiniBatchKMeans runs with scikit-learn's defaults (batch_size=1024, n_init='auto' = 1 k-means++
init on 3 * 1024 rows, max_iter=100, max_no_improvement=10): the paper names MiniBatchKMeans but no
settings. Its input is the L2-normalised rows and its centres are normalised afterwards, as the
project's sklearn engine does.

    nice -n 10 .venv/bin/python -m bench.bench_fit --rows 500000 5000000
"""

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np
from sklearn.cluster import MiniBatchKMeans

from bench.synthetic import Mixture
from core.clustering.kmeans import FAISS_THREADS, fit_kmeans, l2_normalize
from core.clustering.lloyd import lloyd_partial

RESULTS = Path(__file__).resolve().parent / "results"


def full_inertia(x: np.ndarray, centroids: np.ndarray) -> float:
    return lloyd_partial(x, centroids)[2]


def run_size(rows: int, args) -> dict:
    mixture = Mixture(args.k, args.dim, seed=args.seed)
    x = np.empty((rows, args.dim), np.float32)
    start = time.perf_counter()
    mixture.fill(x, seed=args.seed)
    gen_s = time.perf_counter() - start

    start = time.perf_counter()
    ours = fit_kmeans(
        x,
        args.k,
        seed=args.seed,
        engine="faiss",
        n_iter=args.n_iter,
        max_points_per_centroid=args.max_points_per_centroid,
    )
    ours_s = time.perf_counter() - start

    start = time.perf_counter()
    mbk = MiniBatchKMeans(n_clusters=args.k, random_state=args.seed).fit(x)  # x is already unit rows
    sk_s = time.perf_counter() - start
    theirs = l2_normalize(mbk.cluster_centers_)

    start = time.perf_counter()
    ours_inertia, theirs_inertia = full_inertia(x, ours), full_inertia(x, theirs)
    eval_s = time.perf_counter() - start
    truth_inertia = full_inertia(x, mixture.means)  # the generating means, for scale
    result = {
        "rows": rows,
        "generate_s": round(gen_s, 2),
        "eval_s": round(eval_s, 2),
        "faiss_fit_s": round(ours_s, 2),
        "sklearn_fit_s": round(sk_s, 2),
        "sklearn_steps": int(mbk.n_steps_),
        "sklearn_epochs": round(mbk.n_steps_ * 1024 / rows, 3),
        "faiss_inertia": ours_inertia,
        "sklearn_inertia": theirs_inertia,
        "generating_means_inertia": truth_inertia,
        "time_ratio_sklearn_over_faiss": round(sk_s / ours_s, 2),
        "inertia_ratio_faiss_over_sklearn": round(ours_inertia / theirs_inertia, 4),
    }
    print(
        f"rows={rows:>10,}  faiss {ours_s:7.1f} s  sklearn MBK {sk_s:7.1f} s  "
        f"-> sklearn/faiss time x{sk_s / ours_s:.2f}; "
        f"inertia faiss/sklearn {ours_inertia / theirs_inertia:.4f} "
        f"(faiss {ours_inertia:.4g}, sklearn {theirs_inertia:.4g}, generating means {truth_inertia:.4g})",
        flush=True,
    )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[500_000, 5_000_000, 20_000_000])
    parser.add_argument("--k", type=int, default=300)
    parser.add_argument("--dim", type=int, default=90)
    parser.add_argument("--n-iter", type=int, default=50)
    parser.add_argument("--max-points-per-centroid", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--max-gib", type=float, default=8.0, help="skip sizes whose features + working copies would exceed this (GiB)"
    )
    parser.add_argument("--out", type=Path, default=RESULTS / "bench_fit.json")
    args = parser.parse_args()

    report = {
        "benchmark": "bench_fit",
        "k": args.k,
        "dim": args.dim,
        "faiss_n_iter": args.n_iter,
        "max_points_per_centroid": args.max_points_per_centroid,
        "faiss_threads": FAISS_THREADS,
        "sklearn": "MiniBatchKMeans defaults (batch_size=1024, n_init='auto', max_iter=100)",
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "results": [],
        "skipped": [],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for rows in args.rows:
        need_gib = rows * args.dim * 4 * 1.25 / 2**30  # the array + sklearn's labels/weights and block buffers
        if need_gib > args.max_gib:
            print(f"rows={rows:>10,}  skipped: needs ~{need_gib:.1f} GiB > --max-gib {args.max_gib}", flush=True)
            report["skipped"].append({"rows": rows, "reason": f"needs ~{need_gib:.1f} GiB > --max-gib {args.max_gib}"})
        else:
            report["results"].append(run_size(rows, args))
        args.out.write_text(
            json.dumps(report, indent=2)
        )  # after every size: a long run that is stopped keeps its results
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
