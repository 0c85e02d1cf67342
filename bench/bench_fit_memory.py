"""Benchmark: the fit stage's driver peak RSS against the number of feature shards.

For each --shards N: write a finished extract stage of N synthetic shards (16 images of 23 x 46
patches, 96-d float16, with markers and the stage's plan) under --work, then run the fit stage
(`ray_jobs.fit.run_fit`, fit.max_samples=1000, k=20 and k=10) in a fresh process and read its
peak RSS (ru_maxrss), so that writing the data does not count. Prints the peaks and their ratio
to the smallest N, and writes bench/results/fit_memory.json. The target: the peak does not grow
with N (the sample is drawn in one pass holding at most fit.max_samples rows plus one shard).

    nice -n 10 .venv/bin/python -m bench.bench_fit_memory --shards 4 400 --work /tmp/fit_memory
"""

import argparse
import json
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

IMAGES, GRID, DIM = 16, (23, 46), 96


def config(out: Path):
    from configs.schema import parse_config

    return parse_config(
        {
            "output_dir": str(out),
            "model": {"vit": {"embed_dim": DIM, "num_heads": 2}},
            "fit": {"k": 20, "k_sweep": [10], "max_samples": 1000, "n_iter": 5},
        }
    )


def stage(num_shards: int, out: Path):
    """The records, shard names and plans of the synthetic extract stage."""
    from storage.datasets import ImageRecord
    from storage.run.plans import extract_plan, fit_plan, model_identity

    cfg = config(out)
    names = [f"shard-{s:05d}" for s in range(num_shards)]
    ids = {name: [f"s{s:05d}_i{i:02d}" for i in range(IMAGES)] for s, name in enumerate(names)}
    records = [ImageRecord(i, "g", f"/synthetic/{i}.png") for v in ids.values() for i in v]
    extract = extract_plan(cfg, records, model_identity(cfg))
    return cfg, records, ids, extract, fit_plan(cfg, extract)


def write(num_shards: int, out: Path) -> None:
    import numpy as np

    from storage.features import feature_path, patch_schema, patch_table
    from storage.run.atomic import write_parquet_atomic
    from storage.run.markers import mark_done, output_records
    from storage.run.plans import check_plan

    cfg, _, ids, extract, _ = stage(num_shards, out)
    features = out / "features"
    check_plan(features, extract)
    rng = np.random.default_rng(0)
    for name, image_ids in ids.items():
        table = patch_table(
            image_ids,
            [rng.normal(size=(DIM, *GRID)).astype(np.float32) for _ in image_ids],
            [rng.integers(0, 19, size=GRID).astype(np.uint8) for _ in image_ids],
            patch_schema(DIM),
            [(322, 644)] * IMAGES,
        )
        path = feature_path(features, name)
        write_parquet_atomic(table, path)
        mark_done(
            features,
            name,
            {
                "plan_key": extract.key,
                "num_images": IMAGES,
                "image_ids": image_ids,
                "failed": [],
                "outputs": output_records(out, [path]),
            },
        )


def fit(num_shards: int, out: Path) -> None:
    from ray_jobs.fit import run_fit
    from storage.run.shards import dataset_fingerprint

    cfg, records, ids, extract, fit_plan_ = stage(num_shards, out)
    start = time.perf_counter()
    run_fit(cfg, fit_plan_, extract, list(ids), dataset_fingerprint(records, "/synthetic"))
    print(
        json.dumps(
            {
                "shards": num_shards,
                "rows": num_shards * IMAGES * GRID[0] * GRID[1],
                "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                "fit_seconds": round(time.perf_counter() - start, 2),
            }
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", type=int, nargs="+", default=[4, 400])
    parser.add_argument("--work", type=Path, default=Path("/tmp/fit_memory"))
    parser.add_argument("--step", choices=["write", "fit"], help=argparse.SUPPRESS)  # one step, in a child process
    args = parser.parse_args()
    if args.step:
        (write if args.step == "write" else fit)(args.shards[0], args.work)
        return
    results = []
    for n in args.shards:
        out = args.work / f"shards-{n}"
        shutil.rmtree(out, ignore_errors=True)
        for step in ("write", "fit"):
            done = subprocess.run(
                [sys.executable, __file__, "--step", step, "--shards", str(n), "--work", str(out)],
                check=True,
                capture_output=True,
                text=True,
            )
        results.append(json.loads(done.stdout.strip().splitlines()[-1]))
        shutil.rmtree(out, ignore_errors=True)
    for r in results:
        r["peak_vs_smallest"] = round(r["peak_rss_mib"] / results[0]["peak_rss_mib"], 3)
        print(r)
    (ROOT / "bench" / "results").mkdir(exist_ok=True)
    (ROOT / "bench" / "results" / "fit_memory.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
