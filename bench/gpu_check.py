"""The GPU path measured in one call: extract and apply through Ray Data on synthetic Cityscapes-size
images, with DINOv2 ViT-B/14 + CAUSE Segment_TR shapes (random weights) in bf16.

Steps (`bench/gpu_check.sh` runs this; `--cpu-smoke` runs the same steps tiny, on the CPU, in the tests):
  1. `--images` synthetic 1024x2048 scenes in the Cityscapes layout, rendered in parallel;
  2. `submit.py`'s extract and fit stages (configs/cityscapes_cause_k300.yaml: one model actor on the
     GPU, CPU tasks decode / cut windows / stitch / write), then apply with the fit (the model and the
     labelling actors share the GPU);
  3. prints, for extract and for apply: images/s end to end, the fraction of the time the GPU was busy
     (nvidia-smi's utilization.gpu, sampled every 100 ms while the stage ran), the CPU seconds per
     image that fed it (all cores' busy time over the stage, /proc/stat, per image); the model alone
     on the same windows (images/s, TFLOP/s and the fraction of the bf16 peak, FLOPs counted as in
     bench/bench_extract.py); the label assignment on CUDA against the CPU on a few images' features
     (the labels must be identical).

    bash bench/gpu_check.sh                 # 256 images, on one GPU (about 3-5 minutes on an H100)
    bash bench/gpu_check.sh --cpu-smoke     # 6 small images on the CPU (no GPU needed)
"""

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
H100_BF16_DENSE_TFLOPS = 989.0  # NVIDIA H100 SXM datasheet, dense bf16 (half the sparse figure)


class GpuBusy:
    """The mean of nvidia-smi's utilization.gpu (percent of the time a kernel ran) while it is open."""

    def __init__(self):
        self.samples, self.proc = [], None

    def __enter__(self):
        try:
            self.proc = subprocess.Popen(
                ["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits", "-lms", "100"],
                stdout=subprocess.PIPE,
                text=True,
            )
        except FileNotFoundError:
            return self
        threading.Thread(
            target=lambda: [
                self.samples.append(float(line.split(",")[0])) for line in self.proc.stdout if line.strip()
            ],
            daemon=True,
        ).start()
        return self

    def __exit__(self, *exc):
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait()

    @property
    def fraction(self) -> float | None:
        return round(float(np.mean(self.samples)) / 100, 4) if self.samples else None


def cpu_busy_seconds() -> float:
    """Every core's busy time since boot (user, nice, system, irq, softirq), from /proc/stat."""
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq = (int(v) for v in fields[:7])
    return (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")


def timed_stage(name: str, images: int, work) -> dict:
    cpu, start = cpu_busy_seconds(), time.perf_counter()
    with GpuBusy() as busy:
        work()
    seconds = time.perf_counter() - start
    row = {
        "stage": name,
        "images": images,
        "seconds": round(seconds, 2),
        "images_per_s": round(images / seconds, 3),
        "gpu_busy_fraction": busy.fraction,
        "cpu_seconds_per_image": round((cpu_busy_seconds() - cpu) / images, 3),
    }
    print(json.dumps(row), flush=True)
    return row


def model_alone(cfg, images: list[np.ndarray], cuda: bool) -> dict:
    """The model on the windows of `images`, without Ray (its throughput ceiling), and its FLOPs."""
    import torch

    from bench.bench_extract import flops_per_window
    from configs.geometry import window_spec
    from configs.specs import model_spec
    from core.inference.dense import DenseFeatureExtractor
    from core.inference.windows import patch_grid, window_starts
    from core.models import build_feature_model

    device = torch.device("cuda" if cuda else "cpu")
    model = build_feature_model(model_spec(cfg)).to(device)
    i = cfg.inference
    spec = window_spec(cfg)  # the windows the extract stage cuts; fp32 on the CPU, which has no fast bf16
    spec = dataclasses.replace(spec, precision=spec.precision if cuda else "fp32")
    dense = DenseFeatureExtractor(model, spec, device)
    dense(images[:1])
    if cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    dense(images)
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    gh, gw = patch_grid(*images[0].shape[:2], i.short_side, model.patch_size)
    p = model.patch_size
    windows = (
        (2 if i.flip else 1)
        * len(window_starts(gh * p, i.crop, i.stride))
        * len(window_starts(gw * p, i.crop, i.stride))
    )
    flops = flops_per_window(model, i.crop)
    tflops = len(images) * windows * flops["total"] / seconds / 1e12
    row = {
        "stage": "model alone",
        "images": len(images),
        "images_per_s": round(len(images) / seconds, 3),
        "flops_per_window": flops["total"],
        "windows_per_image": windows,
        "tflops": round(tflops, 3),
        "fraction_of_bf16_peak": round(tflops / H100_BF16_DENSE_TFLOPS, 4) if cuda else None,
    }
    print(json.dumps(row), flush=True)
    return row


def assignment_agreement(cfg, fit_dir: Path, cuda: bool, images: int = 4) -> dict:
    """The fit's labels of a few images' stored features, on CUDA and on the CPU: identical?"""
    if not cuda:
        return {"stage": "assignment cuda vs cpu", "skipped": "no CUDA device"}
    import pyarrow.parquet as pq

    from core.clustering.fit_artifact import FitArtifact
    from core.inference.windows import resized_size
    from core.labelling.assign import PixelAssigner
    from storage.features import image_grids

    fit = FitArtifact.load(fit_dir)
    table = pq.read_table(sorted((cfg.output_dir / "features").glob("shard-*.parquet"))[0])
    equal, pixels = [], 0
    for grid, hw in list(image_grids(table).values())[:images]:
        grids = [(grid.astype(np.float32), resized_size(*hw, cfg.inference.short_side))]
        maps = [
            PixelAssigner([fit.centroids], device=d).assign(grids, cfg.model.vit.patch_size, hw)[0][0]
            for d in ("cpu", "cuda")
        ]
        equal.append(bool(np.array_equal(*maps)))
        pixels += maps[0].size
    row = {"stage": "assignment cuda vs cpu", "images": len(equal), "pixels": pixels, "identical": all(equal)}
    print(json.dumps(row), flush=True)
    return row


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--cpu-smoke", action="store_true", help="6 images of 128x256, a tiny ViT, on the CPU")
    parser.add_argument(
        "--work", type=Path, default=None, help="an empty folder for the data and runs (default: a new temp folder)"
    )
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "gpu_check.json")
    args = parser.parse_args(argv)
    import torch

    from configs.geometry import image_limits
    from configs.schema import load_config
    from ray_jobs.apply import run_apply
    from ray_jobs.pipeline import Pipeline
    from ray_jobs.session import init_ray
    from storage.images import read_rgb
    from storage.synth import generate_demo_dataset

    cuda = torch.cuda.is_available() and not args.cpu_smoke
    n, (height, width) = (6, (128, 256)) if args.cpu_smoke else (args.images, (1024, 2048))
    cores = os.cpu_count() or 2
    work = args.work or Path(tempfile.mkdtemp(prefix="gpu_check_"))
    if work.exists() and any(work.iterdir()):
        parser.error(f"--work {work} is not empty: a resumed run would skip the work it should time")
    data, run, applied = work / "data", work / "run", work / "apply"
    start = time.perf_counter()
    generate_demo_dataset(data, num_images=n, height=height, width=width, seed=0, workers=min(cores, 16))
    print(
        json.dumps(
            {
                "stage": "synthetic data",
                "images": n,
                "size": [height, width],
                "seconds": round(time.perf_counter() - start, 1),
            }
        ),
        flush=True,
    )
    gpu = 1 if cuda else 0
    overrides = [
        f"dataset.root={data}",
        f"output_dir={run}",
        "model.cause_root=null",
        "fit.baseline=kmeans_hungarian",
        "fit.k_sweep=[300]",
        "atlas.enabled=false",
        f"ray.local_num_cpus={cores}",
        f"extract.model.gpus_per_actor={gpu}",
        "extract.read.num_cpus=1",
        "extract.write.num_cpus=1",
        f"label.workers.gpus_per_actor={0.5 * gpu}",
        f"label.workers.num_actors={1 if cuda else 1}",
        "apply.model_actors=1",
        "apply.label_actors=1",
    ]
    if args.cpu_smoke:  # the same steps, small enough for the tests
        overrides += [
            "model.feature_kind=backbone",
            "model.vit.embed_dim=32",
            "model.vit.depth=1",
            "model.vit.num_heads=2",
            "inference.short_side=112",
            "inference.crop=112",
            "inference.stride=56",
            "inference.precision=fp32",
            "fit.k=16",
            "fit.k_sweep=[16]",
            "fit.max_patches_per_image=64",
            "ray.local_num_cpus=2",
            "extract.read.num_cpus=0.25",
            "extract.write.num_cpus=0.25",
            "extract.model.cpus_per_actor=0.5",
            "extract.model.batch_images=2",
            "label.workers.cpus_per_actor=0.5",
            "label.read.num_cpus=0.25",
        ]
    else:
        overrides += ["model.feature_kind=head", "inference.precision=bf16"]
    cfg = load_config(REPO / "configs" / "cityscapes_cause_k300.yaml", overrides)
    init_ray(cfg)
    pipeline = Pipeline(cfg)
    rows = [
        timed_stage("extract", n, lambda: pipeline.run(("extract",))),
        timed_stage("fit", n, lambda: pipeline.run(("fit",))),
    ]
    apply_cfg = load_config(
        REPO / "configs" / "cityscapes_cause_k300.yaml",
        [*overrides, f"output_dir={applied}", "apply.write_features=false"],
    )
    fit_dir = run / "fits" / f"k{cfg.fit.k}"
    rows.append(timed_stage("apply", n, lambda: run_apply(apply_cfg, fit_dir)))
    sample = [read_rgb(p, image_limits(cfg)) for p in sorted(data.glob("leftImg8bit/*/*/*.png"))[: min(n, 32)]]
    rows.append(model_alone(cfg, sample, cuda))
    rows.append(assignment_agreement(cfg, fit_dir, cuda))
    report = {
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "cpu_cores": cores,
        "cpu_smoke": args.cpu_smoke,
        "images": n,
        "size": [height, width],
        "precision": cfg.inference.precision if cuda else "fp32",
        "results": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")
    return report


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
