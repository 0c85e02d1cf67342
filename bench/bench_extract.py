"""Dense-extraction throughput of DINOv2 ViT-B/14 + CAUSE Segment_TR head (run on demand, not a test).

Random weights with the official shapes (a fully random `head` model), Cityscapes geometry: each
1024x2048 image is resized to 322x644 and covered by 322x322 windows at stride 161 (3 windows), each
also run flipped (6 window forwards per image), through core.inference.dense.DenseFeatureExtractor.

FLOPs per window (multiply-add = 2 FLOPs), 530 tokens (1 CLS + 23x23 patches):
  ViT   2 * params * tokens                (every weight is used once per token: the usual estimate)
      + 4 * depth * tokens^2 * dim         (attention scores q k^T and the weighted sum over values)
  head  2 * head_ema params * 529 + 4 * 2 * 529^2 * 768   (one decoder layer: self- and cross-attention)
Achieved TFLOP/s = windows/s * FLOPs per window; the fraction is of --peak-tflops (default 989, an
H100 SXM's dense bf16 peak; pass the peak of your card and precision). On CPU only fp32 is run
(core.inference.dense uses autocast on CUDA only) and the fraction is against --cpu-peak-tflops if given.

  nice python -m bench.bench_extract --images 2            # CPU
  python -m bench.bench_extract --device cuda --images 64  # + bf16/fp16 and a batch sweep
"""

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch

from core.inference.dense import DenseFeatureExtractor
from core.inference.windows import WindowSpec, patch_grid, window_starts
from core.models import ModelSpec, build_feature_model


def flops_per_window(model, crop: int) -> dict[str, float]:
    vit, head = model.backbone, model.head
    patches = (crop // model.patch_size) ** 2
    tokens = patches + 1
    vit_params = sum(p.numel() for p in vit.parameters()) - vit.pos_embed.numel() - vit.mask_token.numel()
    depth, dim = len(vit.blocks), vit.embed_dim
    vit_flops = 2 * vit_params * tokens + 4 * depth * tokens**2 * dim
    head_flops = 0.0
    if head is not None:
        head_params = sum(p.numel() for p in head.head_ema.parameters()) - head.head_ema.query_pos.numel()
        head_flops = 2 * head_params * patches + 2 * 4 * patches**2 * dim
    return {
        "vit": float(vit_flops),
        "head": float(head_flops),
        "total": float(vit_flops + head_flops),
        "vit_params": int(vit_params),
        "tokens": tokens,
    }


def run(dense: DenseFeatureExtractor, images: list[np.ndarray], device: torch.device) -> float:
    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    dense(images[:1])  # warm-up (allocations, kernels)
    sync()
    start = time.perf_counter()
    for image in images:
        dense([image])
    sync()
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--images", type=int, default=None, help="images per setting (default 2 on CPU, 64 on CUDA)")
    parser.add_argument("--height", type=int, default=1024)
    parser.add_argument("--width", type=int, default=2048)
    parser.add_argument("--batch-sizes", default="8,16,32,64", help="CUDA window batch sweep (CPU uses the first)")
    parser.add_argument("--precisions", default="fp32,bf16,fp16", help="CUDA precisions (CPU: fp32 only)")
    parser.add_argument(
        "--peak-tflops", type=float, default=989.0, help="GPU peak for the fraction (H100 bf16 dense: 989)"
    )
    parser.add_argument("--cpu-peak-tflops", type=float, default=None)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "extract.json")
    args = parser.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    use_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if use_cuda else [])
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but CUDA is not available")
    if args.device == "cuda":
        devices = [torch.device("cuda")]

    model = build_feature_model(ModelSpec(feature_kind="head"))  # official shapes, random weights
    crop, stride, short = 322, 161, 322
    flops = flops_per_window(model, crop)
    rng = np.random.default_rng(0)
    results = []
    for device in devices:
        model.to(device)
        cuda = device.type == "cuda"
        n = args.images or (64 if cuda else 2)
        images = [rng.integers(0, 255, (args.height, args.width, 3), dtype=np.uint8) for _ in range(n)]
        batches = [int(b) for b in args.batch_sizes.split(",")] if cuda else [int(args.batch_sizes.split(",")[0])]
        precisions = args.precisions.split(",") if cuda else ["fp32"]
        for precision in precisions:
            for batch in batches:
                spec = WindowSpec(
                    short_side=short, crop=crop, stride=stride, flip=True, batch_size=batch, precision=precision
                )
                dense = DenseFeatureExtractor(model, spec, device)
                gh, gw = patch_grid(args.height, args.width, short, model.patch_size)  # 23 x 46 for 1024x2048
                p = model.patch_size
                windows_per_image = (
                    2 * len(window_starts(gh * p, crop, stride)) * len(window_starts(gw * p, crop, stride))
                )
                seconds = run(dense, images, device)
                ips = n / seconds
                tflops = ips * windows_per_image * flops["total"] / 1e12
                peak = args.peak_tflops if cuda else args.cpu_peak_tflops
                row = {
                    "device": torch.cuda.get_device_name() if cuda else f"cpu ({torch.get_num_threads()} threads)",
                    "precision": precision,
                    "batch_size": batch,
                    "images": n,
                    "seconds": round(seconds, 3),
                    "images_per_s": round(ips, 4),
                    "windows_per_image": windows_per_image,
                    "achieved_tflops": round(tflops, 4),
                    "fraction_of_peak": round(tflops / peak, 5) if peak else None,
                }
                results.append(row)
                print(json.dumps(row), flush=True)
    report = {
        "what": "DenseFeatureExtractor, DINOv2 ViT-B/14 + Segment_TR head (random weights, official shapes), "
        f"{args.height}x{args.width} -> 322x644, crop 322, stride 161, flip",
        "flops_per_window": flops,
        "peak_tflops_gpu": args.peak_tflops,
        "peak_tflops_cpu": args.cpu_peak_tflops,
        "torch": torch.__version__,
        "machine": platform.machine(),
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")
    return report


if __name__ == "__main__":
    main()
