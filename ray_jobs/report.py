"""Report stage (driver): sum the per-shard results into metrics, tables and figures.

Everything here reads small per-shard summaries (count matrices, panoptic statistics), so the
driver's memory does not grow with the number of images.
"""

import json
from pathlib import Path

import numpy as np
from PIL import Image

from configs.schema import RunConfig
from configs.specs import evaluation_spec, label_request, label_variants
from core.classes import CLASS_NAMES
from core.clustering.fit_artifact import FitArtifact
from core.evaluation import build_evaluators
from core.evaluation.base import FOLD_SUFFIX, add_totals
from core.evaluation.metrics import semantic_scores
from core.labelling.image import LABELLINGS, label_fits
from core.mapping.protocols import confusion_from_cluster_counts, few_shot_scores, protocol_scores
from core.reporting.analysis import absorption_table, cluster_purity, dead_centroid_summary
from core.reporting.markdown import PROTOCOL_TITLES, missed_classes, render_markdown
from core.reporting.plots import plot_confusion, plot_few_shot, plot_miou_vs_k, plot_overlay_grid, plot_per_class_iou
from ray_jobs.label import broadcast_fits
from ray_jobs.streaming import write_failed_items
from storage.cityscapes_outputs import write_panoptic_json
from storage.run.atomic import write_json_atomic, write_text_atomic
from storage.run.fits import BACKBONE_COMPARISON, IMPORTED, fit_pixel_stride
from storage.run.layout import Layout
from storage.run.markers import read_verified, read_verified_npz


def sum_scores(scores_dir: Path, markers: dict[str, dict]) -> tuple[dict[str, np.ndarray], int]:
    """Per-shard npz files (each checked against its marker) -> the run's totals
    (`core.evaluation.base.add_totals`) and the number of images scored."""
    shards = []
    for shard, marker in markers.items():
        data = read_verified_npz(scores_dir.parent, marker, scores_dir / f"{shard}.npz", LABEL_FIX)
        shards.append(([str(i) for i in data["image_ids"]], {k: v for k, v in data.items() if k != "image_ids"}))
    return add_totals(shards), sum(len(ids) for ids, _ in shards)


def protocol_sensitivity(cfg: RunConfig, results: dict[str, dict], names: list[str], strides: dict[str, int]) -> dict:
    """Per fit, its labels made both ways and each scored by both evaluators: what each protocol
    choice is worth on the same fits. None where a labelling exists only at a stride."""
    official, paper = results["official"], results["paper"]

    def row(labels: str, evaluator: str, scores: dict, stride: int = 1) -> dict:
        panoptic = scores["panoptic"]
        return {
            "labels": labels,
            "evaluator": evaluator,
            "miou": scores["semantic"]["miou"],
            "pixel_accuracy": scores["semantic"]["pixel_accuracy"],
            "pixel_stride": stride,
            "panoptic": None if panoptic is None else pq_summary(panoptic),
        }

    out = {}
    for name in names:
        rows = {}
        for labelling in LABELLINGS:
            target = f"fit/{name}/{labelling}"
            full_size = labelling == "resized" or strides[name] == 1
            rows[f"{labelling}/official"] = row(
                labelling, "official", official[target], 1 if full_size else strides[name]
            )
            if full_size:
                rows[f"{labelling}/paper"] = row(labelling, "paper", paper[target])
        out[name] = rows
    for labelling in label_request(cfg).baseline_labellings:  # the baseline's labels made in more ways
        out[names[-1]][f"{labelling}/official"] = row(labelling, "official", official[f"baseline/{labelling}"])
        out[names[-1]][f"{labelling}/paper"] = row(labelling, "paper", paper[f"baseline/{labelling}"])
    out[names[-1]] |= cause_rows(results)
    return {"protocol": cfg.protocol, "fits": out}


def cause_rows(results: dict[str, dict]) -> dict:
    """The baseline under CAUSE's own test protocol, where the cause evaluator ran."""
    return {
        f"{crop}/cause": {
            "labels": crop,
            "evaluator": "cause",
            "miou": scores["miou"],
            "pixel_accuracy": scores["pixel_accuracy"],
            "pixel_stride": 1,
            "panoptic": None,
            "per_class_iou": scores["per_class_iou"],
        }
        for crop, scores in results.get("cause", {}).items()
    }


def pq_summary(scores: dict) -> dict:
    return {
        "pq": scores["all"]["pq"],
        "sq": scores["all"]["sq"],
        "rq": scores["all"]["rq"],
        "pq_stuff": scores["stuff"]["pq"],
        "pq_things": scores["things"]["pq"],
    }


LABEL_FIX = "run `python submit.py label` with this config: it redoes that shard"


def merge_panoptic_annotations(
    stage_dir: Path, markers: dict[str, dict], labels_dir: Path, split: str, fix: str
) -> Path | None:
    """The per-shard COCO annotations (each checked against its marker) -> one panoptic JSON beside the
    panoptic PNGs."""
    annotations = []
    for shard, marker in markers.items():
        annotations += json.loads(
            read_verified(stage_dir.parent, marker, f"{stage_dir.name}/_panoptic/{shard}.json", fix)
        )
    return write_panoptic_json(labels_dir, annotations, split=split) if annotations else None


def overlay_rows(labels_dir: Path, overlay_ids: list[str]) -> tuple[list[tuple], list[str]]:
    rows, titles = [], []
    for image_id in overlay_ids:
        files = {
            kind: sorted(labels_dir.glob(f"overlays/*/{image_id}_{kind}.png"))
            for kind in ("image", "gt_color", "baseline_color", "labels_color")
        }
        if all(files.values()):
            rows.append(tuple(np.asarray(Image.open(files[kind][0]).convert("RGB")) for kind in files))
            titles.append(image_id)
    return rows, titles


def run_report(
    cfg: RunConfig,
    extract_done: dict,
    label_done: dict,
    fit_artifacts: dict[str, FitArtifact],
    fit_summary: dict,
    meta: dict,
    timing: dict,
    human: np.ndarray | None = None,
) -> dict:
    """`human`: a person's mapping of the main fit (`label.human_mapping`), scored as its own protocol.
    `meta`: the model's description, the dataset's fingerprint and the ids of its images that have
    ground truth ("ground_truth_ids")."""
    layout = Layout(cfg.output_dir)
    names = list(fit_artifacts)  # main, sweep, imported, baseline (`fit.require_fits`)
    main, baseline = names[0], names[-1]
    totals, num_images = sum_scores(layout.scores, label_done)
    results = {
        e.name: e.evaluate(totals)
        for e in build_evaluators(evaluation_spec(cfg, label_fits(broadcast_fits(cfg, fit_artifacts))))
    }
    failed = write_failed_items(cfg.output_dir, extract_done, label_done)
    fits = {
        name: fit_scores(
            cfg, name, fit_artifacts[name], totals, fit_summary[name], human if name == main else None, name != baseline
        )
        for name in names
    }
    baseline_missed = missed_classes(fits[baseline]["pixel_level"]["same_set"]["per_class_iou"])
    for fit in fits.values():
        per_class = fit["pixel_level"]["same_set"]["per_class_iou"]
        fit["recovered"] = [c for c in baseline_missed if c not in missed_classes(per_class)]
    variants = variant_scores(cfg, results, totals, [*label_variants(cfg), baseline] if num_images else [], num_images)
    main_conf = totals.get("official/confusion/variant/plain")
    absorption = (
        {
            main: absorption_table(main_conf, CLASS_NAMES),
            baseline: absorption_table(totals[f"official/confusion/variant/{baseline}"], CLASS_NAMES),
        }
        if variants
        else {}
    )
    # what was measured against ground truth: the pixels of a class under the main fit's labels
    scored_pixels = int(totals[f"official/clusters/{main}{FOLD_SUFFIX}"].sum()) if num_images else 0
    panoptic_json = merge_panoptic_annotations(layout.scores, label_done, layout.labels, cfg.dataset.split, LABEL_FIX)
    report = {
        "run_name": cfg.run_name,
        "model": meta["model"],
        "feature_kind": cfg.model.feature_kind,
        "dataset": dataset_summary(cfg, meta, label_done, num_images, failed, scored_pixels),
        "protocol": cfg.protocol,
        "evaluators": list(results),  # those that ran: the paper's too where the sensitivity asked for it
        "timing": timing,
        "fits": fits,
        "baseline_missed": baseline_missed,
        "variants": variants,
        "protocol_sensitivity": (
            protocol_sensitivity(cfg, results, names, {n: fits[n]["pixel_stride"] for n in names})
            if cfg.report.sensitivity and num_images
            else None
        ),
        "cause_protocol": (cause_rows(results) or None) if not cfg.report.sensitivity else None,
        "backbone_comparison": fit_summary.get(BACKBONE_COMPARISON),
        "written_variant": cfg.refine.write_variant,
        "absorption": absorption,
        "figures": _figures(cfg, layout, fits, names, variants, main_conf, scored=scored_pixels > 0),
        "outputs": {
            "labels": str(layout.labels.relative_to(cfg.output_dir)) if cfg.label.write_label_pngs else None,
            "panoptic_json": None if panoptic_json is None else str(panoptic_json.relative_to(cfg.output_dir)),
            "atlas": "atlas/index.html" if cfg.atlas.enabled else None,
        },  # the atlas stage writes it next
        "failed_items": failed,
    }
    write_json_atomic(report, cfg.output_dir / "report.json")
    write_text_atomic(render_markdown(report), cfg.output_dir / "report.md")
    return report


def fit_scores(
    cfg: RunConfig,
    name: str,
    art: FitArtifact,
    totals: dict,
    summary: dict,
    human: np.ndarray | None,
    few_shot: bool,
) -> dict:
    """One fit's entry of the report: its fit summary and its pixel-level scores under every mapping
    protocol (`human`: a person's mapping of it; `few_shot`: also the few-shot protocol)."""
    counts = totals.get(
        f"official/clusters/{name}{FOLD_SUFFIX}",  # none where no image was labelled
        np.zeros((cfg.fit.heldout_folds, art.k, len(CLASS_NAMES)), np.int64),
    )
    purity = cluster_purity(counts.sum(axis=0))
    if "mapping_counts" in art.extra_arrays:
        pixel_level = protocol_scores(
            counts,
            art.extra_arrays["mapping_counts"],
            art.mapping,
            art.extra_arrays.get("label_free_mapping"),
            CLASS_NAMES,
        )
    else:  # an imported fit: the mapping it came with, and no labelled patches to make another from
        pixel_level = {
            "same_set": semantic_scores(confusion_from_cluster_counts(counts.sum(axis=0), art.mapping), CLASS_NAMES)
        }
    if human is not None:
        pixel_level["human"] = semantic_scores(confusion_from_cluster_counts(counts.sum(axis=0), human), CLASS_NAMES)
    if few_shot and "mapping_counts" in art.extra_arrays:
        pixel_level["few_shot"] = few_shot_scores(
            counts,
            art.extra_arrays["mapping_counts"],
            cfg.report.few_shot,
            cfg.report.few_shot_draws,
            cfg.seed,
            CLASS_NAMES,
        )
    wins = totals.get(f"label/wins/{name}", np.zeros(art.k, np.int64))
    return {
        **summary,
        "pixel_level": pixel_level,
        # which pixels its pixel-level numbers count (label.sweep_pixel_stride for the sweep's extra fits)
        "pixel_stride": fit_pixel_stride(cfg, name),
        "dead_centroids": dead_centroid_summary(wins)["dead"],
        "weighted_purity": None if np.isnan(purity["weighted_purity"]) else float(purity["weighted_purity"]),
    }


def variant_scores(cfg: RunConfig, results: dict, totals: dict, names: list[str], num_images: int) -> dict:
    """Each refinement variant's (and the baseline's) official scores, the paper evaluator's where it
    ran, and its labelling cost per image."""
    variants = {}
    for name in names:
        official = results["official"][f"variant/{name}"]
        variants[name] = {
            "semantic": official["semantic"],
            "panoptic": official["panoptic"],
            "seconds_per_image": float(totals[f"label/seconds/{name}"]) / max(1, num_images),
        }
        if "paper" in cfg.evaluators:
            paper = results["paper"][f"variant/{name}"]
            variants[name]["paper_evaluator"] = {"semantic": paper["semantic"], "panoptic": paper["panoptic"]}
    return variants


def dataset_summary(
    cfg: RunConfig, meta: dict, label_done: dict, num_images: int, failed: list[dict], scored_pixels: int
) -> dict:
    labelled_ids = {i for marker in label_done.values() for i in marker["image_ids"]}
    return {
        "kind": cfg.dataset.kind,
        "root": str(cfg.dataset.root),
        "split": cfg.dataset.split,
        "num_images": num_images,
        # an image that failed in extract usually fails again in label: count each image once
        "num_failed": len({f["image_id"] for f in failed}),
        "fingerprint": meta["fingerprint"],
        "scored_pixels": scored_pixels,
        "num_with_ground_truth": len(labelled_ids & meta["ground_truth_ids"]),
    }


def _figures(
    cfg: RunConfig, layout: Layout, fits: dict, names: list[str], variants: dict, main_conf, scored: bool
) -> dict[str, str]:
    """The report's figures; those of scores (every one but the overlays) only where something was scored."""
    main, baseline = names[0], names[-1]
    figures = {}

    def rel(path: Path) -> str:
        return str(path.relative_to(cfg.output_dir))

    if not scored:
        return figures

    own = [n for n in names if n != baseline and fits[n]["mapping_kind"] != IMPORTED]  # with every mapping protocol
    sweep = sorted(own, key=lambda n: fits[n]["k"])
    series = {
        f"pixel, {PROTOCOL_TITLES[p]}": [fits[n]["pixel_level"][p]["miou"] for n in sweep]
        for p in PROTOCOL_TITLES
        if all(p in fits[n]["pixel_level"] for n in sweep)
    }
    path = layout.figures / "miou_vs_k.png"
    plot_miou_vs_k(
        [fits[n]["k"] for n in sweep],
        series,
        {f"baseline k={fits[baseline]['k']}, Hungarian": fits[baseline]["pixel_level"]["same_set"]["miou"]},
        path,
    )
    figures["miou_vs_k"] = rel(path)
    curves = {
        f"{n} (k={fits[n]['k']})": {
            int(m): (v["miou_mean"], v["miou_std"]) for m, v in fits[n]["pixel_level"]["few_shot"].items()
        }
        for n in sweep
        if fits[n]["pixel_level"]["few_shot"]
    }
    if curves:
        path = layout.figures / "few_shot.png"
        level = fits[main]["pixel_level"]
        plot_few_shot(
            curves, {f"{main}: {PROTOCOL_TITLES[p]}": level[p]["miou"] for p in PROTOCOL_TITLES if p in level}, path
        )
        figures["few_shot"] = rel(path)
    if main_conf is not None and main_conf.sum() > 0:
        path = layout.figures / "confusion.png"
        plot_confusion(main_conf, CLASS_NAMES, path, title=f"{main}: row-normalised confusion (pixels)")
        figures["confusion"] = rel(path)
    path = layout.figures / "per_class_iou.png"
    runs = {
        baseline: fits[baseline]["pixel_level"]["same_set"]["per_class_iou"],
        main: fits[main]["pixel_level"]["same_set"]["per_class_iou"],
    }
    runs.update(
        {f"{main} + {v}": variants[v]["semantic"]["per_class_iou"] for v in variants if v not in ("plain", baseline)}
    )
    plot_per_class_iou(runs, path, title="Per-class IoU (pixel level)")
    figures["per_class_iou"] = rel(path)
    overlay_ids = sorted({p.name.rsplit("_", 1)[0] for p in layout.labels.glob("overlays/*/*_image.png")})
    rows, titles = overlay_rows(layout.labels, overlay_ids)
    if rows:
        path = layout.figures / "overlays.png"
        plot_overlay_grid(
            rows,
            path,
            column_titles=("image", "ground truth", baseline, f"{main} ({cfg.refine.write_variant})"),
            row_titles=titles,
        )
        figures["overlays"] = rel(path)
    return figures
