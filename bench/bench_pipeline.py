"""Extract throughput, old design vs new, against a stand-in device of fixed latency (run on demand).

Real 1024x2048 PNGs (the demo generator at Cityscapes size) and the Cityscapes geometry (322x644,
322 px windows at stride 161, flipped: 6 window forwards per image). The model is a stand-in for
one accelerator: a sleep of `latency` per window forward (it releases the GIL, as a GPU kernel
does), returning 90-d features like the CAUSE head. For each latency, in one Ray session:

  old  one actor per device does read -> decode -> windows -> model -> stitch -> labels -> write
       for the images of a shard, one after the other (the design before the streaming plan);
  new  `ray_jobs.extract.run_extract` with the stand-in as its model actor: CPU tasks decode and
       cut windows, the model actor only runs windows, CPU tasks stitch and write.

Both use the same per-image functions, so they differ only in how the work is scheduled.
Measured per run:
  images_per_s            images over the time from the start of the device's first batch to the
                          last image's completion (Ray's and the actors' start-up left out, the
                          pipeline's fill and drain kept, for both designs alike)
  device_busy_fraction    the stand-in's sleep time over that time
  fraction_of_bound       images_per_s / min(device bound, CPU bound), where device bound =
                          1 / (latency x window forwards per image) and CPU bound = the CPUs the
                          new design's CPU steps get / the CPU seconds per image of those steps,
                          measured in this run (the steps timed one image at a time in the driver)

  nice python -m bench.bench_pipeline [--images 192] [--files 48] [--latencies-ms 0.3 3 30]
"""

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import ray

from actors.extract import finish_features, image_windows, write_features
from actors.window_features import WindowFeatures
from configs.schema import parse_config
from ray_jobs.extract import run_extract
from ray_jobs.session import init_ray
from storage.datasets import ImageRecord, list_cityscapes
from storage.run.markers import read_done
from storage.run.plans import extract_plan, model_identity
from storage.run.shards import plan_shards, shard_records
from storage.synth import generate_demo_dataset

FEATURE_DIM = 90
CPUS = 2
MODEL_CPUS = 0.1  # the stand-in device's actor: it only sleeps and copies


class SleepModel:
    """Stand-in for a model on an accelerator: `latency` seconds per window forward (x2 with flip)."""

    def __init__(self, latency: float, flip: bool, log_dir: Path):
        self.latency, self.flip = latency, flip
        self.log = (log_dir / f"busy-{os.getpid()}-{time.monotonic_ns()}.txt").open("a")

    def __call__(self, windows: np.ndarray) -> np.ndarray:
        n, size = len(windows), windows.shape[1] // 14
        start = time.time()
        time.sleep(self.latency * n * (2 if self.flip else 1))
        self.log.write(f"{start} {time.time()}\n")
        self.log.flush()
        return np.zeros((n, FEATURE_DIM, size, size), np.float32)


def stand_in_actor(latency: float, log_dir: Path):
    """A WindowFeatures whose model is the stand-in (the new design's model actor)."""

    class StandInWindowFeatures(WindowFeatures):
        def setup(self) -> None:
            self.model = SleepModel(latency, self.cfg.inference.flip, log_dir)
            self.description = f"stand-in device, {latency * 1e3:g} ms per window"
            self.crop_models, self.head_dim = (
                None,
                None,
            )  # no CAUSE crop, no backbone tokens (protocol official, backbone kind)

    return StandInWindowFeatures


def old_design_actor(latency: float, log_dir: Path):
    """One actor per device doing every step of a shard's images in turn (the old design)."""

    class OldDesignExtractor:
        def __init__(self, cfg, stage_dir: str, plan_key: str):
            self.config, self.stage_dir, self.plan_key = cfg, stage_dir, plan_key
            self.model = stand_in_actor(latency, log_dir)(cfg)
            self.model.setup()

        def __call__(self, batch: dict) -> dict:
            for shard, records in zip(batch["shard"], batch["records"]):
                shard_row = {"shard": shard, "records": records}
                written, failed = [], []
                for row in image_windows(shard_row, self.config):
                    out = self.model({k: np.array([v]) for k, v in row.items()})
                    status = write_features(
                        {k: v[0] for k, v in out.items()}, self.config, self.stage_dir, self.plan_key
                    )
                    (failed if status["error"] else written).append(status["image_id"])
                finish_features(self.stage_dir, shard_row, written, [], self.plan_key, self.config)
            return {"shard": batch["shard"]}

    return OldDesignExtractor


def config(data: Path, out: Path, images_per_shard: int) -> dict:
    return {
        "run_name": "bench-pipeline",
        "output_dir": str(out),
        "dataset": {"root": str(data), "images_per_shard": images_per_shard},
        "model": {
            "vit": {"embed_dim": 192, "depth": 1, "num_heads": 3},
            "feature_kind": "head",
        },  # 90-d, as the stand-in
        "inference": {"short_side": 322, "crop": 322, "stride": 161, "flip": True},
        "extract": {
            "read": {"num_cpus": (CPUS - MODEL_CPUS) / 4},
            "write": {"num_cpus": (CPUS - MODEL_CPUS) / 4},
            "model": {"num_actors": 1, "cpus_per_actor": MODEL_CPUS, "batch_images": 4},
        },
        "ray": {"local_num_cpus": CPUS},
    }


PROBE_PLAN = "bench-cpu-probe"  # the plan key of the timing probe's parts (no stage plan there)


def cpu_seconds_per_image(cfg_dict: dict, records, work: Path, images_per_shard: int) -> float:
    """CPU seconds of the new design's CPU steps per image (decode + windows, stitch + labels +
    part, the shards' finish), timed in this process one image at a time, after one warm-up pass."""
    cfg = parse_config(cfg_dict)
    stand_in = stand_in_actor(0.0, work)(cfg)
    stand_in.setup()
    stage = work / "cpu_probe"
    seconds = 0.0
    for attempt in range(2):  # the first pass warms caches and lazy imports; the second is timed
        seconds = 0.0
        for shard_row in plan_shards(records, images_per_shard):
            shard_row = {**shard_row, "shard": f"{shard_row['shard']}-{attempt}"}
            written = []
            for record in shard_records(shard_row):
                one = {"shard": shard_row["shard"], "records": json.dumps([record.to_dict()])}
                start = time.process_time()
                (row,) = list(image_windows(one, cfg))
                seconds += time.process_time() - start
                out = stand_in({k: np.array([v]) for k, v in row.items()})
                start = time.process_time()
                written.append(
                    write_features({k: v[0] for k, v in out.items()}, cfg, str(stage), PROBE_PLAN)["image_id"]
                )
                seconds += time.process_time() - start
            start = time.process_time()
            finish_features(str(stage), shard_row, written, [], PROBE_PLAN, cfg)
            seconds += time.process_time() - start
    shutil.rmtree(stage)
    return seconds / len(records)


def throughput(stage_dir: Path, log_dir: Path) -> dict:
    """Images/s and device busy fraction from the start of the device's first batch (start-up of
    Ray, actors and imports left out, for both designs alike) to the last image's completion (each
    image's completion = when its part was written)."""
    done = sorted(t for d in read_done(stage_dir).values() for t in d["images_written_at"])
    intervals = [
        tuple(map(float, line.split()))
        for log in log_dir.glob("busy-*.txt")
        for line in log.read_text().split("\n")
        if line
    ]
    t0, t1 = min(a for a, _ in intervals), done[-1]
    busy = sum(min(b, t1) - a for a, b in intervals)
    return {
        "images_per_s": len(done) / (t1 - t0),
        "device_busy_fraction": busy / (t1 - t0),
        "measured_s": t1 - t0,
        "device_batches": len(intervals),
    }


def run_design(design: str, latency: float, cfg_dict: dict, records, work: Path) -> dict:
    out = work / f"{design}-{latency * 1e3:g}ms"
    logs = out / "busy"
    logs.mkdir(parents=True)
    cfg_dict = {**cfg_dict, "output_dir": str(out)}
    cfg = parse_config(cfg_dict)
    start = time.perf_counter()
    plan = extract_plan(cfg, records, model_identity(cfg))
    if design == "new":
        run_extract(cfg, records, plan, model_actor=stand_in_actor(latency, logs))
    else:
        shards = plan_shards(records, cfg.dataset.images_per_shard)
        ds = ray.data.from_items(shards, override_num_blocks=len(shards)).map_batches(
            old_design_actor(latency, logs),
            batch_size=1,
            fn_constructor_kwargs={"cfg": cfg, "stage_dir": str(out / "features"), "plan_key": plan.key},
            compute=ray.data.ActorPoolStrategy(size=1),
            num_cpus=1,
        )
        ds.materialize()
    wall = time.perf_counter() - start
    assert sum(len(shard_records(s)) for s in plan_shards(records, cfg.dataset.images_per_shard)) == len(records)
    assert sum(d["num_images"] for d in read_done(out / "features").values()) == len(records), f"{design}: images lost"
    return {**throughput(out / "features", logs), "wall_s": wall, "images": len(records)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=192)
    parser.add_argument("--files", type=int, default=48, help="distinct 1024x2048 PNGs the images are read from")
    parser.add_argument("--images-per-shard", type=int, default=4)
    parser.add_argument("--latencies-ms", type=float, nargs="+", default=[0.3, 3.0, 30.0])
    parser.add_argument("--work", type=Path, default=Path(__file__).parent / "results" / "tmp" / "pipeline")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "bench_pipeline.json")
    args = parser.parse_args()
    data = args.work / "data"
    if len(list(data.glob("leftImg8bit/val/*/*.png"))) != args.files:
        shutil.rmtree(data, ignore_errors=True)
        print(f"writing {args.files} demo images at 1024x2048 to {data}")
        generate_demo_dataset(data, num_images=args.files, height=1024, width=2048, seed=0)
    files = list_cityscapes(data, "val")
    # --images records over --files files (each read and decoded every time), so a long run needs little disk
    records = sorted(
        (
            ImageRecord(
                **{**files[i % len(files)].to_dict(), "image_id": f"{files[i % len(files)].image_id}_{i // len(files)}"}
            )
            for i in range(args.images)
        ),
        key=lambda r: r.image_id,
    )
    work = Path(tempfile.mkdtemp(prefix="runs-", dir=args.work))
    cfg_dict = config(data, work, args.images_per_shard)
    init_ray(parse_config(cfg_dict))
    cpu_per_image = cpu_seconds_per_image(cfg_dict, records[:8], work, args.images_per_shard)
    cpu_bound = (CPUS - MODEL_CPUS) / cpu_per_image
    forwards = 6  # 3 windows of 322 over 322x644, each also flipped
    result = {
        "what": __doc__.split("\n\n")[0],
        "cpus": CPUS,
        "images": args.images,
        "files": args.files,
        "images_per_shard": args.images_per_shard,
        "cpu_seconds_per_image": cpu_per_image,
        "cpu_bound_images_per_s": cpu_bound,
        "latencies": {},
    }
    try:
        for design in ("old", "new"):  # warm-up: start Ray's worker processes once, outside every measurement
            run_design(design, 0.0, cfg_dict, records[:16], work / "warm-up")
        for latency_ms in args.latencies_ms:
            device_bound = 1.0 / (latency_ms * 1e-3 * forwards)
            bound = min(device_bound, cpu_bound)
            entry = {"device_bound_images_per_s": device_bound, "bound_images_per_s": bound}
            for design in ("old", "new"):
                run = run_design(design, latency_ms * 1e-3, cfg_dict, records, work)
                entry[design] = {**run, "fraction_of_bound": run["images_per_s"] / bound}
                print(
                    f"{latency_ms:g} ms/window, {design}: {run['images_per_s']:.2f} images/s, device busy "
                    f"{run['device_busy_fraction']:.1%}, {entry[design]['fraction_of_bound']:.1%} of the bound "
                    f"({bound:.2f} images/s)",
                    flush=True,
                )
            entry["new_over_old"] = entry["new"]["images_per_s"] / entry["old"]["images_per_s"]
            result["latencies"][f"{latency_ms:g}ms"] = entry
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(result, indent=2))
    finally:
        ray.shutdown()
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps({k: v for k, v in result.items() if k != "latencies"}, indent=2))


if __name__ == "__main__":
    main()
