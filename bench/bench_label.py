"""Label-pass throughput: nearest centroid of every pixel (run on demand, not a test).

Cityscapes geometry: a (90, 23, 46) head-feature grid of a 1024x2048 image, k = 300 centroids.
Three ways to give every pixel its nearest centroid (cosine of the bilinearly upsampled feature):
  ours      core.labelling.PixelAssigner: patch-level dot products, 2-tap separable upsampling of the
            scores, per-pixel norm only where scales are averaged (exact, see its docstring)
  upsample  what one writes first in torch: F.interpolate the features to full resolution, normalise,
            one (H*W, D) x (D, k) matrix product, argmax (exact, the same answer)
  loop      a per-pixel Python loop (bilinear feature, normalise, dot, argmax), timed on a few rows
            and extrapolated per pixel
All on one CPU thread (per-core rates), in one run, so the ratios compare like with like.

  nice python bench/bench_label.py [--k 300] [--height 1024 --width 2048] [--device cuda]
"""

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from core.labelling import PixelAssigner, bilinear_taps  # noqa: E402


def upsample_then_matmul(features: np.ndarray, centroids: np.ndarray, hw: tuple[int, int], device) -> np.ndarray:
    f = torch.from_numpy(features)[None].to(device)
    up = F.interpolate(f, size=hw, mode="bilinear", align_corners=False)[0]  # (D, H, W)
    pixels = up.reshape(up.shape[0], -1).T
    pixels = pixels / pixels.norm(dim=1, keepdim=True)
    return (pixels @ torch.from_numpy(centroids).to(device).T).argmax(dim=1).reshape(hw).cpu().numpy()


def per_pixel_loop(features: np.ndarray, centroids: np.ndarray, hw: tuple[int, int], rows: int) -> np.ndarray:
    d, gh, gw = features.shape
    ylo, yhi, yf = (t.numpy() for t in bilinear_taps(hw[0], gh, gh / hw[0]))
    xlo, xhi, xf = (t.numpy() for t in bilinear_taps(hw[1], gw, gw / hw[1]))
    out = np.empty((rows, hw[1]), np.int64)
    for y in range(rows):
        for x in range(hw[1]):
            top = features[:, ylo[y], xlo[x]] * (1 - xf[x]) + features[:, ylo[y], xhi[x]] * xf[x]
            bottom = features[:, yhi[y], xlo[x]] * (1 - xf[x]) + features[:, yhi[y], xhi[x]] * xf[x]
            v = top * (1 - yf[y]) + bottom * yf[y]
            out[y, x] = int(np.argmax(centroids @ (v / np.linalg.norm(v))))
    return out


def timed(fn, repeat: int = 1) -> tuple[float, object]:
    best, result = float("inf"), None
    for _ in range(repeat):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return best, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--k", type=int, default=300)
    parser.add_argument("--dim", type=int, default=90)
    parser.add_argument("--height", type=int, default=1024)
    parser.add_argument("--width", type=int, default=2048)
    parser.add_argument("--loop-rows", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "label.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    device = torch.device(args.device)
    rng = np.random.default_rng(0)
    hw = (args.height, args.width)
    grid = (round(args.height * 322 / 1024 / 14), round(args.width * 322 / 1024 / 14))  # 23 x 46 for Cityscapes
    features = rng.normal(size=(args.dim, *grid)).astype(np.float32)
    centroids = rng.normal(size=(args.k, args.dim)).astype(np.float32)
    centroids /= np.linalg.norm(centroids, axis=1, keepdims=True)
    resized = (grid[0] * 14, grid[1] * 14)
    assigner = PixelAssigner([centroids], device=device)

    t_ours, ((ours,), _) = timed(lambda: assigner.assign([(features, resized)], 14, hw), repeat=2)
    t_up, reference = timed(lambda: upsample_then_matmul(features, centroids, hw, device), repeat=2)
    t_loop, loop = timed(lambda: per_pixel_loop(features, centroids, hw, args.loop_rows))
    pixels = hw[0] * hw[1]
    agree = float((ours == reference).mean())
    loop_agree = float((ours[: args.loop_rows] == loop).mean())
    loop_px_s = args.loop_rows * hw[1] / t_loop
    result = {
        "k": args.k, "dim": args.dim, "image": list(hw), "grid": list(grid), "device": str(device), "threads": 1,
        "cpu": platform.processor() or platform.machine(),
        "ours": {"seconds_per_image": t_ours, "images_per_s": 1 / t_ours, "pixels_per_s": pixels / t_ours},
        "upsample_then_matmul": {"seconds_per_image": t_up, "pixels_per_s": pixels / t_up},
        "per_pixel_loop": {"pixels_per_s": loop_px_s, "seconds_per_image_extrapolated": pixels / loop_px_s},
        "speedup_vs_upsample": t_up / t_ours, "speedup_vs_loop": (pixels / loop_px_s) / t_ours,
        "agreement_with_upsample": agree, "agreement_with_loop": loop_agree,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
