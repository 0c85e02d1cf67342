"""Report stage (driver): sum the per-shard results into metrics, tables and figures."""

from pathlib import Path

import numpy as np

from configs.schema import RunConfig
from core.labels import CLASS_NAMES
from core.fit_artifact import FitArtifact
from core.protocols import protocol_scores
from core.plots import plot_miou_vs_k
from core.report import PROTOCOL_TITLES, missed_classes, render_markdown
from ray_jobs.fit import fit_names
from ray_jobs.layout import Layout
from storage.shards import write_json_atomic, write_text_atomic


def sum_scores(scores_dir: Path, names: list[str]) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], int]:
    """Per-shard npz files -> per fit: summed (F, k, C) pixel counts and (k,) cluster wins; image count."""
    pixel_counts, wins, num_images = {}, {}, 0
    for path in sorted(scores_dir.glob("shard-*.npz")):
        with np.load(path, allow_pickle=False) as data:
            num_images += len(data["image_ids"])
            for n in names:
                pixel_counts[n] = pixel_counts.get(n, 0) + data[f"pixel_counts_{n}"]
                wins[n] = wins.get(n, 0) + data[f"wins_{n}"]
    return pixel_counts, wins, num_images


def run_report(cfg: RunConfig, extract_done: dict, label_done: dict, fit_artifacts: dict[str, FitArtifact],
               fit_summary: dict, meta: dict, timing: dict) -> dict:
    layout = Layout(cfg.output_dir)
    names = fit_names(cfg)
    baseline = names[-1]
    pixel_counts, wins, num_images = sum_scores(layout.scores, names)
    failed = [f for done in (extract_done, label_done) for s in sorted(done) for f in done[s]["failed"]]
    # an image that failed in extract usually fails again in label: count each image once
    failed_ids = sorted({f["image_id"] for f in failed})
    write_json_atomic(failed, cfg.output_dir / "failed_items.json")

    fits = {}
    for name in names:
        art = fit_artifacts[name]
        fits[name] = {**fit_summary[name],
                      "pixel_level": protocol_scores(pixel_counts[name], art.extra_arrays["mapping_counts"], art.mapping,
                                                     art.extra_arrays.get("label_free_mapping"), CLASS_NAMES),
                      "dead_centroids": int((wins[name] == 0).sum())}
    baseline_missed = missed_classes(fits[baseline]["pixel_level"]["same_set"]["per_class_iou"])
    for name in names:
        per_class = fits[name]["pixel_level"]["same_set"]["per_class_iou"]
        fits[name]["recovered"] = [c for c in baseline_missed if per_class[c]]

    sweep = sorted((n for n in names if n != baseline), key=lambda n: fits[n]["k"])
    series = {f"pixel, {PROTOCOL_TITLES[p]}": [fits[n]["pixel_level"][p]["miou"] for n in sweep]
              for p in PROTOCOL_TITLES if p in fits[sweep[0]]["pixel_level"]}
    plot_miou_vs_k([fits[n]["k"] for n in sweep], series,
                   {f"baseline k={fits[baseline]['k']}, Hungarian": fits[baseline]["pixel_level"]["same_set"]["miou"]},
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
