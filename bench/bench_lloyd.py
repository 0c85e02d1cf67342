"""Benchmark: distributed Lloyd (ray_jobs.distributed_lloyd) per iteration, one k against the whole
k sweep in one pass, with the driver's and the largest worker's peak RSS, vs rows.

For each --rows: write Parquet shards in the extract stage's schema (float16 features, 23 x 46
patches per image, --images-per-shard images per shard; bench/synthetic.py's mixture, k = 300
components, 90-d) under --workdir (kept and reused by later runs), then start a *fresh driver
process* that starts a local Ray (num_cpus=--num-cpus), seeds centroids for every k by k-means++
on a sample of the first shard, runs one untimed warm-up pass over the first shard (Ray's workers
start and import their libraries), then times --iters Lloyd iterations (tol = 0) for k = --k alone
and for the whole --sweep in one pass per iteration. Each timed run reports seconds per iteration,
rows / s per CPU, the driver's peak RSS (Linux VmHWM, reset through /proc/<pid>/clear_refs just
before the run) and the largest peak RSS among the driver's Ray worker processes (reset alike).
The smallest size also runs the one-k pass sequentially in another fresh process
(`lloyd_partial` over the row groups, no Ray) as the reference for Ray's overhead. Prints the
ratios of this one run and writes --out after every size.

    nice -n 10 .venv/bin/python -m bench.bench_lloyd --rows 1000000 20000000
    nice -n 10 .venv/bin/python -m bench.bench_lloyd --rows 100000000 --iters 1 \
        --out bench/results/bench_lloyd_100m.json
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from bench.synthetic import Mixture
from storage.features import patch_schema, patch_table
from storage.run.atomic import write_json_atomic, write_parquet_atomic

REPO = Path(__file__).resolve().parent.parent

RESULTS = Path(__file__).resolve().parent / "results"
GRID = (23, 46)  # patches per Cityscapes image at 322 x 644, patch 14


def write_shards(directory: Path, rows: int, images_per_shard: int, k: int, dim: int, seed: int) -> list[Path]:
    """Parquet shards of ceil(rows / patches per image) images; reused when already written with these settings."""
    per_image = GRID[0] * GRID[1]
    num_images = -(-rows // per_image)
    settings = {
        "rows": rows,
        "images": num_images,
        "images_per_shard": images_per_shard,
        "k": k,
        "dim": dim,
        "seed": seed,
    }
    manifest = directory / "manifest.json"
    if manifest.exists() and json.loads(manifest.read_text()) == settings:
        return sorted(directory.glob("shard-*.parquet"))
    for old in directory.glob("shard-*.parquet"):
        old.unlink()
    mixture, schema = Mixture(k, dim, seed=seed), patch_schema(dim, "float16")
    for shard, first in enumerate(range(0, num_images, images_per_shard)):
        count = min(images_per_shard, num_images - first)
        x, comp = mixture.sample(count * per_image, seed=seed * 100003 + shard)
        feats = [x[i * per_image : (i + 1) * per_image].reshape(*GRID, dim).transpose(2, 0, 1) for i in range(count)]
        labels = [(comp[i * per_image : (i + 1) * per_image] % 19).reshape(GRID) for i in range(count)]
        ids = [f"img{first + i:07d}" for i in range(count)]
        write_parquet_atomic(
            patch_table(ids, feats, labels, schema, [(1024, 2048)] * count), directory / f"shard-{shard:05d}.parquet"
        )
    write_json_atomic(settings, manifest)
    return sorted(directory.glob("shard-*.parquet"))


def _peak_rss_mib(pid: str = "self") -> float:
    """Peak resident set size of a process since its start or since the last _reset_peak_rss (VmHWM)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _reset_peak_rss(pid: str = "self") -> bool:
    """Linux: writing 5 to /proc/<pid>/clear_refs resets VmHWM to the current RSS."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _ray_workers() -> list[str]:
    """This driver's Ray worker processes: its descendants (local Ray: driver -> raylet -> workers)
    whose command line starts with ray::, so another job's Ray on the machine is not counted."""
    parent = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parent[stat.parent.name] = fields[1]
    mine, me = [], str(os.getpid())
    for pid in parent:
        ancestor = parent.get(pid)
        while ancestor and ancestor not in ("0", "1", me):
            ancestor = parent.get(ancestor)
        try:
            if ancestor == me and Path(f"/proc/{pid}/cmdline").read_bytes().startswith(b"ray::"):
                mine.append(pid)
        except OSError:
            continue
    return mine


def _timed_lloyd(files: list[Path], inits: dict[str, np.ndarray], args) -> dict:
    """--iters Lloyd passes (tol = 0) for the fits in `inits`, all in one pass per iteration: seconds
    per pass, the driver's and the largest worker's peak RSS during them."""
    from ray_jobs.distributed_lloyd import distributed_lloyd

    workers = _ray_workers()
    for pid in ["self", *workers]:
        _reset_peak_rss(pid)
    start_rss = _peak_rss_mib()
    out = distributed_lloyd(files, inits, max_iter=args.iters, tol=0.0, batch_rows=args.batch_rows, assign=args.assign)
    history = next(iter(out.values()))[1]
    worker_peaks = {pid: _peak_rss_mib(pid) for pid in _ray_workers() if Path(f"/proc/{pid}").exists()}
    return {
        "ks": [len(c) for c in inits.values()],
        "iteration_s": [h["seconds"] for h in history],
        "inertia": {name: [h["inertia"] for h in hist] for name, (_, hist) in out.items()},
        "rss_at_lloyd_start_mib": start_rss,
        "peak_rss_during_lloyd_mib": _peak_rss_mib(),
        "largest_worker_peak_rss_mib": max(worker_peaks.values(), default=None),
        "workers": len(worker_peaks),
    }


def child(args) -> None:
    """One fresh driver over the shards in args.child; prints a JSON line.

    Default: start Ray, warm its workers up on one shard, then time Lloyd for k = --k alone and for
    the whole --sweep in one pass per iteration. --sequential: the one-k pass in this one process, no Ray.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    from core.clustering.kmeans import kmeans_plusplus, l2_normalize
    from core.clustering.lloyd import lloyd_partial
    from ray_jobs.distributed_lloyd import lloyd_pass, row_groups
    from storage.features import features_from_table

    files = sorted(Path(args.child).glob("shard-*.parquet"))
    first = next(pq.ParquetFile(files[0]).iter_batches(batch_size=max(args.sweep + [args.k]) * 64, columns=["feature"]))
    sample = l2_normalize(features_from_table(pa.Table.from_batches([first])))
    inits = {k: sample[kmeans_plusplus(sample, k, args.seed)] for k in sorted(set(args.sweep + [args.k]))}
    init = inits[args.k]
    del first, sample
    out = {"files": len(files), "rows": sum(pq.ParquetFile(f).metadata.num_rows for f in files)}
    if args.sequential:
        start = time.perf_counter()
        k, d = init.shape
        sums, counts, total = np.zeros((k, d)), np.zeros(k, np.int64), 0.0
        for item in row_groups([str(f) for f in files]):
            for batch in pq.ParquetFile(item["path"]).iter_batches(
                batch_size=args.batch_rows, row_groups=[item["row_group"]], columns=["feature"]
            ):
                part = lloyd_partial(features_from_table(pa.Table.from_batches([batch])), init, assign=args.assign)
                sums, counts, total = sums + part[0], counts + part[1], total + part[2]
        out["sequential_pass_s"] = time.perf_counter() - start
        out["inertia"] = [total]
        print("RESULT " + json.dumps(out), flush=True)
        return

    import ray

    start = time.perf_counter()
    ray.init(
        address="local",
        num_cpus=args.num_cpus,
        include_dashboard=False,
        log_to_driver=False,
        runtime_env={"env_vars": {"PYTHONPATH": str(REPO)}},
    )
    ray.data.DataContext.get_current().enable_progress_bars = False
    out["ray_start_s"] = time.perf_counter() - start
    start = time.perf_counter()  # the workers start and import numpy/faiss/torch once, outside the timed passes
    lloyd_pass([str(files[0])], {f"k{k}": c for k, c in inits.items()}, batch_rows=args.batch_rows, assign=args.assign)
    out["warm_up_s"] = time.perf_counter() - start
    out["peak_rss_before_lloyd_mib"] = _peak_rss_mib()
    out["one_k"] = _timed_lloyd(files, {f"k{args.k}": init}, args)
    if args.sweep:
        out["sweep"] = _timed_lloyd(files, {f"k{k}": inits[k] for k in args.sweep}, args)
    ray.shutdown()
    print("RESULT " + json.dumps(out), flush=True)


def _run_child(directory: Path, args, sequential: bool) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--child",
        str(directory),
        "--iters",
        str(args.iters),
        "--k",
        str(args.k),
        "--batch-rows",
        str(args.batch_rows),
        "--num-cpus",
        str(args.num_cpus),
        "--seed",
        str(args.seed),
        "--assign",
        args.assign,
        "--sweep",
        *map(str, args.sweep),
    ]
    proc = subprocess.run(
        cmd + (["--sequential"] if sequential else []),
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode or not lines:
        sys.exit(f"child for {directory} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(lines[-1][len("RESULT ") :])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[1_000_000, 10_000_000])
    parser.add_argument("--iters", type=int, default=4)
    parser.add_argument("--k", type=int, default=300)
    parser.add_argument(
        "--sweep",
        type=int,
        nargs="*",
        default=[19, 50, 100, 200, 300],
        help="the k of the one-pass sweep timed beside --k alone (nothing: one k only)",
    )
    parser.add_argument("--assign", choices=["numpy", "torch", "faiss"], default="numpy")
    parser.add_argument("--dim", type=int, default=90)
    parser.add_argument("--images-per-shard", type=int, default=100)
    parser.add_argument("--batch-rows", type=int, default=65536)
    parser.add_argument("--num-cpus", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/overclust_bench_lloyd"))
    parser.add_argument("--out", type=Path, default=RESULTS / "bench_lloyd.json")
    parser.add_argument(
        "--write-only", action="store_true", help="write (or check) the shards of every --rows, time nothing"
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--sequential", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)

    if args.write_only:
        for rows in args.rows:
            start = time.perf_counter()
            files = write_shards(args.workdir / f"rows{rows}", rows, args.images_per_shard, args.k, args.dim, args.seed)
            print(f"rows={rows:,}: {len(files)} shards in {time.perf_counter() - start:.0f} s", flush=True)
        return
    results = []
    for i, rows in enumerate(args.rows):
        directory = args.workdir / f"rows{rows}"
        start = time.perf_counter()
        files = write_shards(directory, rows, args.images_per_shard, args.k, args.dim, args.seed)
        write_s = time.perf_counter() - start
        r = _run_child(directory, args, sequential=False)
        r["write_s"] = round(write_s, 1)
        r["parquet_mib"] = round(sum(f.stat().st_size for f in files) / 2**20, 1)
        for run in [r["one_k"]] + ([r["sweep"]] if "sweep" in r else []):
            run["mean_iteration_s"] = float(np.mean(run["iteration_s"]))
            run["rows_per_s_per_cpu"] = r["rows"] / run["mean_iteration_s"] / args.num_cpus
        line = (
            f"rows={r['rows']:>11,} in {r['files']} shards ({r['parquet_mib']:.0f} MiB): k={args.k} "
            f"{r['one_k']['mean_iteration_s']:.2f} s/iteration "
            f"({r['one_k']['rows_per_s_per_cpu'] / 1e6:.3f} M rows/s/CPU), "
            f"driver peak {r['one_k']['peak_rss_during_lloyd_mib']:.0f} MiB, largest worker "
            f"{r['one_k']['largest_worker_peak_rss_mib']:.0f} MiB"
        )
        if "sweep" in r:
            r["sweep_over_one_k"] = r["sweep"]["mean_iteration_s"] / r["one_k"]["mean_iteration_s"]
            line += (
                f"; sweep {args.sweep} {r['sweep']['mean_iteration_s']:.2f} s/iteration = "
                f"{r['sweep_over_one_k']:.2f} x one k (driver {r['sweep']['peak_rss_during_lloyd_mib']:.0f} MiB, "
                f"worker {r['sweep']['largest_worker_peak_rss_mib']:.0f} MiB)"
            )
        if i == 0:
            reference = _run_child(directory, args, sequential=True)
            r["sequential_pass_s"] = reference["sequential_pass_s"]
            r["sequential_inertia_matches"] = bool(
                np.isclose(reference["inertia"][0], r["one_k"]["inertia"][f"k{args.k}"][0], rtol=1e-6)
            )
            line += f"; sequential in-process pass {r['sequential_pass_s']:.1f} s"
        results.append(r)
        print(line, flush=True)
        _write_report(args, results)
    print(f"wrote {args.out}")


def _write_report(args, results: list[dict]) -> None:
    """Written after every size, so a long run's finished sizes are kept."""
    report = {
        "benchmark": "bench_lloyd",
        "k": args.k,
        "sweep": args.sweep,
        "assign": args.assign,
        "dim": args.dim,
        "iters": args.iters,
        "num_cpus": args.num_cpus,
        "batch_rows": args.batch_rows,
        "images_per_shard": args.images_per_shard,
        "machine": f"{os.cpu_count()} CPUs",
        "results": results,
    }
    if len(results) > 1:
        first, last = results[0]["one_k"], results[-1]["one_k"]
        report["rows_ratio"] = results[-1]["rows"] / results[0]["rows"]
        report["time_per_iteration_ratio"] = last["mean_iteration_s"] / first["mean_iteration_s"]
        report["driver_peak_rss_ratio"] = last["peak_rss_during_lloyd_mib"] / first["peak_rss_during_lloyd_mib"]
    report["ray_over_sequential_time_ratio"] = results[0]["one_k"]["mean_iteration_s"] / results[0]["sequential_pass_s"]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
