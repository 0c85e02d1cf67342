"""Report stage (driver): sum the per-shard results into metrics, tables and figures."""

from pathlib import Path

import numpy as np

from configs.schema import RunConfig
from core.labels import CLASS_NAMES
from core.metrics import semantic_scores
from core.plots import plot_miou_vs_k
from core.report import missed_classes, render_markdown
from ray_jobs.fit import fit_names
from ray_jobs.layout import Layout
from storage.shards import write_json_atomic, write_text_atomic


def sum_scores(scores_dir: Path, names: list[str]) -> tuple[np.ndarray, dict[str, np.ndarray], int]:
    """Per-shard npz files -> summed (n_fits, C, C+1) confusion, summed cluster wins, image count."""
    confusion, wins, num_images = None, {n: None for n in names}, 0
    for path in sorted(scores_dir.glob("shard-*.npz")):
        with np.load(path, allow_pickle=False) as data:
            shard_conf = data["confusion"].sum(axis=0)
            num_images += data["confusion"].shape[0]
            confusion = shard_conf if confusion is None else confusion + shard_conf
            for n in names:
                wins[n] = data[f"wins_{n}"] if wins[n] is None else wins[n] + data[f"wins_{n}"]
    return confusion, wins, num_images


def run_report(cfg: RunConfig, extract_done: dict, label_done: dict, fit_summary: dict, meta: dict, timing: dict) -> dict:
    layout = Layout(cfg.output_dir)
    names = fit_names(cfg)
    baseline = names[-1]
    confusion, wins, num_images = sum_scores(layout.scores, names)
    failed = [f for done in (extract_done, label_done) for s in sorted(done) for f in done[s]["failed"]]
    # an image that failed in extract usually fails again in label: count each image once
    failed_ids = sorted({f["image_id"] for f in failed})
    write_json_atomic(failed, cfg.output_dir / "failed_items.json")

    fits = {}
    for i, name in enumerate(names):
        fits[name] = {**fit_summary[name],
                      "pixel_level": semantic_scores(confusion[i], CLASS_NAMES),
                      "dead_centroids": int((wins[name] == 0).sum())}
    baseline_missed = missed_classes(fits[baseline]["pixel_level"]["per_class_iou"])
    for name in names:
        per_class = fits[name]["pixel_level"]["per_class_iou"]
        fits[name]["recovered"] = [c for c in baseline_missed if per_class[c]]

    sweep = sorted((n for n in names if n != baseline), key=lambda n: fits[n]["k"])
    plot_miou_vs_k(
        [fits[n]["k"] for n in sweep],
        {"patch level, majority mapping": [fits[n]["patch_level"]["miou"] for n in sweep],
         "pixel level, majority mapping": [fits[n]["pixel_level"]["miou"] for n in sweep]},
        {f"baseline k={fits[baseline]['k']} Hungarian, patch": fits[baseline]["patch_level"]["miou"],
         f"baseline k={fits[baseline]['k']} Hungarian, pixel": fits[baseline]["pixel_level"]["miou"]},
        layout.figures / "miou_vs_k.png")
    overlays = sorted(str(p.relative_to(cfg.output_dir)) for p in layout.labels.glob("*/*_pseudo_overlay.png"))

    report = {
        "run_name": cfg.run_name, "model": meta["model"], "feature_kind": cfg.model.feature_kind,
        "dataset": {"kind": cfg.dataset.kind, "root": str(cfg.dataset.root), "split": cfg.dataset.split,
                    "num_images": num_images, "num_failed": len(failed_ids), "fingerprint": meta["fingerprint"]},
        "timing": timing, "fits": fits, "baseline_missed": baseline_missed,
        "overlays": overlays, "failed_items": failed,
    }
    write_json_atomic(report, cfg.output_dir / "report.json")
    write_text_atomic(render_markdown(report), cfg.output_dir / "report.md")
    return report
