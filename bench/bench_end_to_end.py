"""End-to-end throughput of the whole job on the demo set with 1 and 2 workers (run on demand).

Runs `python submit.py run` semantics in-process (Pipeline) on the demo config, once per worker
count, each in a fresh output folder and a fresh local Ray, and reports images/s of the actor
stages (extract + label) and of the whole job. The ratio 2 workers / 1 worker shows how the pool
scales on this machine (2 cores: expect < 2x, Ray and the driver share them).

  nice python -m bench.bench_end_to_end [--images 40] [--workers 1 2]
"""

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import ray

from configs.schema import load_config
from ray_jobs.pipeline import Pipeline


def run_once(config: Path, images: int, workers: int, work: Path) -> dict:
    out = work / f"workers{workers}"
    cfg = load_config(
        config,
        [
            f"output_dir={out}",
            f"dataset.max_images={images}",
            "dataset.images_per_shard=5",
            f"extract.model.num_actors={workers}",
            f"label.workers.num_actors={workers}",
            "extract.model.cpus_per_actor=0.75",
            "label.workers.cpus_per_actor=0.9",
        ],
    )
    start = time.perf_counter()
    Pipeline(cfg).run()
    total = time.perf_counter() - start
    ray.shutdown()
    timing = json.loads((out / "timing.json").read_text())
    actor_seconds = timing["extract"]["seconds"] + timing["label"]["seconds"]
    return {
        "workers": workers,
        "images": images,
        "timing": timing,
        "total_seconds": total,
        "actor_stage_images_per_s": images / actor_seconds,
        "job_images_per_s": images / total,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=Path(__file__).resolve().parents[1] / "configs" / "demo.yaml")
    parser.add_argument("--images", type=int, default=40)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "end_to_end.json")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench_e2e_"))
    try:
        runs = [run_once(args.config, args.images, w, work) for w in args.workers]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result = {"config": str(args.config), "runs": runs}
    if len(runs) > 1:
        result["speedup_last_vs_first"] = runs[-1]["actor_stage_images_per_s"] / runs[0]["actor_stage_images_per_s"]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
