"""Label-pass cost per 1024x2048 image on one core (run on demand, not a test).

Part 1, the assignment. A (90, 23, 46) head-feature grid, k = 300 centroids (random; `--smooth`
blurs the grid so that neighbouring patches are alike, as in images; 0 is the worst case).
Three ways to give every pixel its nearest centroid (cosine of the bilinearly upsampled feature):
  ours      core.labelling.PixelAssigner: patch-level dot products, columns interpolated as one
            matrix product, the upper envelope of the k score lines down each column (exact,
            see `_envelope_rows`)
  upsample  what one writes first in torch: F.interpolate the features to full resolution, normalise,
            one (H*W, D) x (D, k) matrix product, argmax (exact, the same answer)
  loop      a per-pixel Python loop (bilinear feature, normalise, dot, argmax), timed on a few rows
            and extrapolated per pixel
All on one CPU thread (per-core rates), in one run, so the ratios compare like with like.

Part 2, the whole label pass of real label maps: 4 demo scenes at 1024x2048, features of the
demo's random ViT (23 x 46 grid), k-means fits for k = 300 (main), 50, 100, 200 and the k = 19
baseline, majority mappings. CPU seconds per image (process time, one thread) of
  main_fit_labels   the main fit's assignment, trainIds, panoptic segments (connected components)
                    and its four Cityscapes PNGs (labelIds, trainIds, instanceIds, panoptic) + COCO entry
  label_pass        everything the label actor does for an image but reading its inputs: all five
                    fits, their counts, confusion and PQ statistics against the ground truth, the writes
                    (with the sweep's extra fits at every pixel, and at `label.sweep_pixel_stride` 4)

  nice python bench/bench_label.py [--k 300] [--smooth 1.0] [--device cuda]
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

from scipy import ndimage  # noqa: E402

from actors.geometry import image_limits, window_spec  # noqa: E402
from actors.model_setup import model_spec  # noqa: E402
from configs.schema import load_config  # noqa: E402
from core.clustering import assign_clusters, fit_kmeans  # noqa: E402
from core.dense import DenseFeatureExtractor  # noqa: E402
from core.label_image import ImageLabeller, LabelFit, image_scores  # noqa: E402
from core.labelling import PixelAssigner, bilinear_taps  # noqa: E402
from core.mapping import cluster_class_counts, hungarian_mapping, majority_mapping  # noqa: E402
from core.metrics import patch_majority_labels  # noqa: E402
from core.models import build_feature_model  # noqa: E402
from core.panoptic import gt_panoptic  # noqa: E402
from storage.cityscapes_outputs import write_image_predictions  # noqa: E402
from storage.datasets import list_cityscapes  # noqa: E402
from storage.images import read_instance_ids, read_rgb, read_train_ids  # noqa: E402
from storage.synth import generate_demo_dataset  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


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


def label_pass(work: Path) -> dict:
    """Part 2 (see the module docstring)."""
    data = work / "data"
    if len(list(data.glob("leftImg8bit/val/*/*.png"))) != 4:
        generate_demo_dataset(data, num_images=4, height=1024, width=2048, seed=0)
    cfg = load_config(REPO / "configs" / "demo.yaml", ["inference.short_side=322", "inference.crop=322", "inference.stride=161"])
    dense = DenseFeatureExtractor(build_feature_model(model_spec(cfg)), window_spec(cfg))
    images = []
    for r in list_cityscapes(data, "val"):
        image = read_rgb(r.image_path, image_limits(cfg))
        gt = read_train_ids(Path(r.label_ids_path), image.shape[:2])
        images.append((dense([image])[0], gt, gt_panoptic(read_instance_ids(Path(r.instance_ids_path), image.shape[:2]))))
    x = np.concatenate([f.reshape(f.shape[0], -1).T for f, _, _ in images])
    y = np.concatenate([patch_majority_labels(gt, *f.shape[1:], 19).ravel() for f, gt, _ in images])
    fits = []
    for name, k in (("k300", 300), ("k50", 50), ("k100", 100), ("k200", 200), ("baseline_k19", 19)):
        c = fit_kmeans(x, k, seed=0, engine="faiss", n_iter=20, max_points_per_centroid=256)
        counts = cluster_class_counts(assign_clusters(x, c), y, k, 19)
        fits.append((name, c, hungarian_mapping(counts) if k == 19 else majority_mapping(counts)))
    out = {}
    for stride in (1, 4):
        label_fits = [LabelFit(n, c, m, 1 if n in ("k300", "baseline_k19") else stride) for n, c, m in fits]
        main = ImageLabeller(label_fits[:1], ["seed"], cfg.refine, cfg.panoptic, baseline=False)
        full = ImageLabeller(label_fits, ["seed"], cfg.refine, cfg.panoptic, baseline=True)
        for labeller, name in ((main, "main_fit_labels"), (full, f"label_pass_sweep_stride_{stride}")):
            seconds = []
            for attempt in range(2):  # the first pass compiles and warms; the second is timed
                seconds = []
                for i, (features, gt, gt_pan) in enumerate(images):
                    start = time.process_time()
                    labels = labeller.label([(features, (322, 644))], 14, gt.shape)
                    if labeller is full:
                        image_scores(labels, label_fits, gt, gt_pan)
                    train_ids, panoptic, _ = labels.variants[0]
                    write_image_predictions(work / "labels", "demo", f"image{i}", train_ids, panoptic)
                    seconds.append(time.process_time() - start)
            out[name] = float(np.mean(seconds))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--k", type=int, default=300)
    parser.add_argument("--dim", type=int, default=90)
    parser.add_argument("--smooth", type=float, default=1.0, help="Gaussian sigma (patches) of the random feature grid")
    parser.add_argument("--height", type=int, default=1024)
    parser.add_argument("--width", type=int, default=2048)
    parser.add_argument("--loop-rows", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--work", type=Path, default=Path(__file__).parent / "results" / "tmp" / "label")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "label.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    device = torch.device(args.device)
    rng = np.random.default_rng(0)
    hw = (args.height, args.width)
    grid = (round(args.height * 322 / 1024 / 14), round(args.width * 322 / 1024 / 14))  # 23 x 46 for Cityscapes
    features = ndimage.gaussian_filter(rng.normal(size=(args.dim, *grid)), (0, args.smooth, args.smooth)).astype(np.float32)
    centroids = rng.normal(size=(args.k, args.dim)).astype(np.float32)
    centroids /= np.linalg.norm(centroids, axis=1, keepdims=True)
    resized = (grid[0] * 14, grid[1] * 14)
    assigner = PixelAssigner([centroids], device=device)

    assigner.assign([(features, resized)], 14, hw)  # compiles the CPU kernel (cached on disk)
    t_ours, ((ours,), _) = timed(lambda: assigner.assign([(features, resized)], 14, hw), repeat=2)
    t_up, reference = timed(lambda: upsample_then_matmul(features, centroids, hw, device), repeat=2)
    t_loop, loop = timed(lambda: per_pixel_loop(features, centroids, hw, args.loop_rows))
    pixels = hw[0] * hw[1]
    agree = float((ours == reference).mean())
    loop_agree = float((ours[: args.loop_rows] == loop).mean())
    loop_px_s = args.loop_rows * hw[1] / t_loop
    result = {
        "k": args.k, "dim": args.dim, "smooth": args.smooth, "image": list(hw), "grid": list(grid), "device": str(device),
        "threads": 1, "cpu": platform.processor() or platform.machine(),
        "ours": {"seconds_per_image": t_ours, "images_per_s": 1 / t_ours, "pixels_per_s": pixels / t_ours},
        "upsample_then_matmul": {"seconds_per_image": t_up, "pixels_per_s": pixels / t_up},
        "per_pixel_loop": {"pixels_per_s": loop_px_s, "seconds_per_image_extrapolated": pixels / loop_px_s},
        "speedup_vs_upsample": t_up / t_ours, "speedup_vs_loop": (pixels / loop_px_s) / t_ours,
        "agreement_with_upsample": agree, "agreement_with_loop": loop_agree,
        "label_pass_cpu_seconds_per_image": label_pass(args.work),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
