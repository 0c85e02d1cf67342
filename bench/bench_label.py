"""Label-pass cost per 1024x2048 image on one core (run on demand, not a test).

Part 1, the assignment. A (90, 23, 46) head-feature grid, k = 300 centroids (random; `--smooth`
blurs the grid so that neighbouring patches are alike, as in images; 0 is the worst case).
Three ways to give every pixel its nearest centroid (cosine of the bilinearly upsampled feature):
  ours      core.labelling.assign.PixelAssigner: patch-level dot products, columns interpolated as one
            matrix product, the upper envelope of the k score lines down each column (exact,
            see `_envelope_rows`)
  upsample  what one writes first in torch: F.interpolate the features to full resolution, normalise,
            one (H*W, D) x (D, k) matrix product, argmax (exact, the same answer)
  loop      a per-pixel Python loop (bilinear feature, normalise, dot, argmax), timed on a few rows
            and extrapolated per pixel
All on one CPU thread (per-core rates), in one run, so the ratios compare like with like.

Part 2, the whole label pass, this checkout against an older one (`--old-rev`, default the last
commit before labelling and evaluation were split), in one run. `--images` demo scenes at
1024x2048; configs/cityscapes_cause_k300.yaml with a model that runs here (the demo's random ViT
at 96-d, close to the head's 90-d; the baseline by k = 19 k-means instead of CAUSE's probe, which
needs its checkpoint). Each checkout extracts and fits with its own pipeline, then times its label
step (and score step) per image outside Ray (`bench/label_pass_driver.py`), CPU seconds of one
thread, in two settings:
  default     the config as it is in that checkout
  everything  every refinement but the CRF, the protocol sensitivity, the sweep's fits at every
              pixel (every fit's PQ)

Part 3, the image operations the panoptic segmentation takes from OpenCV, each against the numpy /
scipy call it replaced, on the same scenes' ground-truth trainIds, outputs checked equal:
  connected components  cv2 SAUF (`core.image_ops.connected_components`) vs scipy.ndimage.label,
                        8-connected, every thing class present, within the class's box
  class histogram       cv2.calcHist vs np.bincount of the (H, W) uint8 map
  class boxes           cv2.boundingRect per thing class present vs scipy.ndimage.find_objects
  lookup table          cv2.LUT vs numpy indexing of a 256-entry table
  panoptic segments     `core.panoptic.panoptic_from_train_ids` as a whole (no reference: the sum)

    nice python -m bench.bench_label [--k 300] [--smooth 1.0] [--device cuda] [--old-rev d316538]
"""

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from core.classes import THING_TRAIN_IDS, label_ids_to_train_ids
from core.image_ops import connected_components, histogram, lookup
from core.labelling.assign import PixelAssigner, bilinear_taps
from core.panoptic import panoptic_from_train_ids
from storage.images import read_label_ids
from storage.synth import generate_demo_dataset

REPO = Path(__file__).resolve().parents[1]
OLD_REV = "d316538"  # the last commit before labelling and evaluation were split (issue 27)
CONFIG = "configs/cityscapes_cause_k300.yaml"
# what makes the Cityscapes config run here: generated scenes, a small random ViT, k-means baseline, CPU only
RUNNABLE = [
    "model.feature_kind=backbone",
    "model.cause_root=null",
    "model.vit.embed_dim=96",
    "model.vit.depth=2",
    "fit.baseline=kmeans_hungarian",
    "inference.precision=fp32",
    "dataset.images_per_shard=4",
    "ray.local_num_cpus=2",
    "extract.model.gpus_per_actor=0",
    "extract.model.num_actors=1",
    "extract.model.cpus_per_actor=1",
    "extract.read.num_cpus=0.25",
    "extract.write.num_cpus=0.25",
    "label.read.num_cpus=0.25",
    "label.workers.num_actors=1",
]
EVERYTHING = [
    "refine.em_semantic=true",
    "refine.em_things=true",
    "refine.superpixels=true",
    "refine.prototype_denoising=true",
    "refine.knn_diffusion=true",
    "report.sensitivity=true",
    "label.sweep_pixel_stride=1",
]


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


def assignment(args) -> dict:
    """Part 1 (see the module docstring)."""
    device = torch.device(args.device)
    rng = np.random.default_rng(0)
    hw = (args.height, args.width)
    grid = (round(args.height * 322 / 1024 / 14), round(args.width * 322 / 1024 / 14))  # 23 x 46 for Cityscapes
    features = ndimage.gaussian_filter(rng.normal(size=(args.dim, *grid)), (0, args.smooth, args.smooth)).astype(
        np.float32
    )
    centroids = rng.normal(size=(args.k, args.dim)).astype(np.float32)
    centroids /= np.linalg.norm(centroids, axis=1, keepdims=True)
    resized = (grid[0] * 14, grid[1] * 14)
    assigner = PixelAssigner([centroids], device=device)
    assigner.assign([(features, resized)], 14, hw)  # compiles the CPU kernel (cached on disk)
    t_ours, ((ours,), _) = timed(lambda: assigner.assign([(features, resized)], 14, hw), repeat=2)
    t_up, reference = timed(lambda: upsample_then_matmul(features, centroids, hw, device), repeat=2)
    t_loop, loop = timed(lambda: per_pixel_loop(features, centroids, hw, args.loop_rows))
    pixels = hw[0] * hw[1]
    loop_px_s = args.loop_rows * hw[1] / t_loop
    return {
        "k": args.k,
        "dim": args.dim,
        "smooth": args.smooth,
        "image": list(hw),
        "grid": list(grid),
        "device": str(device),
        "ours": {"seconds_per_image": t_ours, "images_per_s": 1 / t_ours, "pixels_per_s": pixels / t_ours},
        "upsample_then_matmul": {"seconds_per_image": t_up, "pixels_per_s": pixels / t_up},
        "per_pixel_loop": {"pixels_per_s": loop_px_s, "seconds_per_image_extrapolated": pixels / loop_px_s},
        "speedup_vs_upsample": t_up / t_ours,
        "speedup_vs_loop": (pixels / loop_px_s) / t_ours,
        "agreement_with_upsample": float((ours == reference).mean()),
        "agreement_with_loop": float((ours[: args.loop_rows] == loop).mean()),
    }


def label_pass(checkout: Path, data: Path, work: Path, images: int) -> dict:
    """Part 2 in one checkout: its own extract and fit, then its label pass timed per setting."""
    base = [f"dataset.root={data}", *RUNNABLE]
    settings = {"default": [], "everything": EVERYTHING}
    command = [
        sys.executable,
        str(REPO / "bench" / "label_pass_driver.py"),
        CONFIG,
        str(work),
        str(images),
        json.dumps(base),
        json.dumps(settings),
    ]
    done = subprocess.run(
        command,
        cwd=checkout,
        env={"PYTHONPATH": str(checkout), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1", "HOME": str(Path.home())},
        capture_output=True,
        text=True,
        check=False,
    )
    result = next((line for line in done.stdout.splitlines() if line.startswith("RESULT ")), None)
    if result is None:
        raise RuntimeError(f"the label pass in {checkout} failed:\n{done.stderr[-3000:]}")
    return json.loads(result.removeprefix("RESULT "))


def _equal(a, b) -> bool:
    """Nested lists of arrays (or of boxes: tuples of slices) equal item by item."""
    if isinstance(a, list):
        return isinstance(b, list) and len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
    return a == b if isinstance(a, tuple) or a is None else np.array_equal(a, b)


def image_ops(data: Path, repeat: int = 3) -> dict:
    """Part 3 (see the module docstring): seconds per 1024x2048 map, best of `repeat`."""
    maps = []
    for path in sorted(data.rglob("*_gtFine_labelIds.png")):
        maps.append(label_ids_to_train_ids(read_label_ids(path, (1024, 2048))).astype(np.uint8))
    boxes = [ndimage.find_objects(m, max_label=max(THING_TRAIN_IDS) + 1) for m in maps]  # class t at t - 1
    masks = [[m[b[t - 1]] == t for t in THING_TRAIN_IDS if b[t - 1] is not None] for m, b in zip(maps, boxes)]
    eight = np.ones((3, 3), bool)
    table = np.arange(256, dtype=np.uint8)[::-1].copy()

    def per_map(fn) -> tuple[float, list]:
        seconds, out = timed(lambda: [fn(i) for i in range(len(maps))], repeat)
        return seconds / len(maps), out

    def scipy_boxes(m):
        found = ndimage.find_objects(m, max_label=max(THING_TRAIN_IDS) + 1)  # class t's box at t - 1
        return [found[t - 1] for t in THING_TRAIN_IDS]

    def cv_boxes(m):
        rects = [cv2.boundingRect(cv2.compare(m, t, cv2.CMP_EQ)) for t in THING_TRAIN_IDS]
        return [(slice(y, y + h), slice(x, x + w)) if w else None for x, y, w, h in rects]

    pairs = {
        "connected_components": (
            lambda i: [connected_components(k, 8)[0] for k in masks[i]],
            lambda i: [ndimage.label(k, structure=eight)[0] for k in masks[i]],
        ),
        "class_histogram": (lambda i: histogram(maps[i]), lambda i: np.bincount(maps[i].ravel(), minlength=256)),
        "class_boxes": (
            lambda i: cv_boxes(maps[i]),
            lambda i: scipy_boxes(maps[i]),
        ),
        "lookup_table": (lambda i: lookup(maps[i], table), lambda i: table[maps[i]]),
    }
    result = {"maps": len(maps)}
    for name, (ours, reference) in pairs.items():
        t_ours, out_ours = per_map(ours)
        t_ref, out_ref = per_map(reference)
        equal = _equal(out_ours, out_ref)
        result[name] = {"opencv_s": t_ours, "numpy_scipy_s": t_ref, "speedup": t_ref / t_ours, "equal": equal}
    t_pan, _ = per_map(lambda i: panoptic_from_train_ids(maps[i], min_area=10, stuff_min_area=64))
    result["panoptic_from_train_ids_s"] = t_pan
    return result


def old_checkout(rev: str, where: Path) -> Path:
    subprocess.run(
        ["git", "-C", str(REPO), "worktree", "add", "--detach", "-f", str(where), rev], check=True, capture_output=True
    )
    return where


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--k", type=int, default=300)
    parser.add_argument("--dim", type=int, default=90)
    parser.add_argument("--smooth", type=float, default=1.0, help="Gaussian sigma (patches) of the random feature grid")
    parser.add_argument("--height", type=int, default=1024)
    parser.add_argument("--width", type=int, default=2048)
    parser.add_argument("--loop-rows", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--images", type=int, default=4, help="1024x2048 scenes timed in part 2 (after one warm-up)")
    parser.add_argument("--old-rev", default=OLD_REV, help="the checkout part 2 compares with ('' skips it)")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "label.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    result = {"threads": 1, "cpu": platform.processor() or platform.machine(), "part1_assignment": assignment(args)}
    with tempfile.TemporaryDirectory(prefix="bench_label_") as tmp:
        tmp = Path(tmp)
        generate_demo_dataset(tmp / "data", num_images=args.images + 1, height=1024, width=2048, seed=0)
        passes = {"new": label_pass(REPO, tmp / "data", tmp / "new", args.images)}
        if args.old_rev:
            try:
                passes[args.old_rev] = label_pass(
                    old_checkout(args.old_rev, tmp / "old"), tmp / "data", tmp / "old_run", args.images
                )
            finally:
                subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(tmp / "old")], check=False)
        result["part2_label_pass_cpu_seconds_per_image"] = passes
        result["part3_image_ops_seconds_per_map"] = image_ops(tmp / "data")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
