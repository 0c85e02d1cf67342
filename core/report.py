"""The run report as Markdown, from the JSON-safe report dict (see ray_jobs/report.py)."""


PROTOCOL_TITLES = {"same_set": "same-set majority (seed)", "held_out": "held-out majority (CV)",
                   "label_free": "label-free (via baseline)"}


def _pct(value) -> str:
    return "—" if value is None else f"{100 * value:.1f}"


def missed_classes(per_class_iou: dict) -> list[str]:
    """Classes present in the ground truth that a fit never gets right (IoU exactly 0)."""
    return [name for name, iou in per_class_iou.items() if iou == 0.0]


def render_markdown(report: dict) -> str:
    fits = report["fits"]
    names = list(fits)
    lines = [
        f"# Overclustering report: {report['run_name']}",
        "",
        f"- **Model:** {report['model']}",
        f"- **Feature kind:** {report['feature_kind']}",
        f"- **Dataset:** {report['dataset']['kind']} `{report['dataset']['root']}` split `{report['dataset']['split']}`: "
        f"{report['dataset']['num_images']} images scored, {report['dataset']['num_failed']} failed "
        f"(listed in `failed_items.json`), fingerprint `{report['dataset']['fingerprint']}`",
        f"- **Mapping protocols:** *same-set* maps clusters to classes on the images it scores (the seed's "
        f"protocol, an oracle as k grows); *held-out* maps each fold of images with the other folds only; "
        f"*label-free* maps each cluster to the baseline cluster most of its patches are nearest to. "
        f"The baseline is k = {fits[names[-1]]['k']} with one-to-one Hungarian matching.",
        f"- **Wall time:** " + ", ".join(f"{stage} {sec:.1f} s" for stage, sec in report["timing"].items()),
        "",
        "## k sweep (seed protocol: same-set majority mapping)",
        "",
        "| fit | mapping | k | patch mIoU | pixel mIoU | pixel acc | classes with IoU > 0 | dead centroids |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name in names:
        f = fits[name]
        pixel = f["pixel_level"]["same_set"]
        nonzero = sum(1 for v in pixel["per_class_iou"].values() if v)
        present = sum(1 for v in pixel["per_class_iou"].values() if v is not None)
        lines.append(f"| {name} | {f['mapping_kind']} | {f['k']} | {_pct(f['patch_level']['same_set']['miou'])} | "
                     f"{_pct(pixel['miou'])} | {_pct(pixel['pixel_accuracy'])} | "
                     f"{nonzero}/{present} | {f['dead_centroids']}/{f['k']} |")
    protocols = [p for p in PROTOCOL_TITLES if p in fits[names[0]]["pixel_level"]]
    lines += ["", "## Where the gain comes from: pixel mIoU (%) by mapping protocol", "",
              "| fit | k | " + " | ".join(PROTOCOL_TITLES[p] for p in protocols) + " |",
              "|---|---|" + "---|" * len(protocols)]
    for name in names[:-1]:
        level = fits[name]["pixel_level"]
        cells = []
        for p in protocols:
            cell = _pct(level[p]["miou"])
            if p == "held_out":
                cell += f" (folds {_pct(level[p]['fold_miou_mean'])} ± {_pct(level[p]['fold_miou_std'])})"
            cells.append(cell)
        lines.append(f"| {name} | {fits[name]['k']} | " + " | ".join(cells) + " |")
    class_names = list(fits[names[0]]["pixel_level"]["same_set"]["per_class_iou"])
    lines += ["", "## Per-class IoU (pixel level, same-set mapping, %)", "",
              "| fit | " + " | ".join(class_names) + " |", "|---|" + "---|" * len(class_names)]
    for name in names:
        per_class = fits[name]["pixel_level"]["same_set"]["per_class_iou"]
        lines.append(f"| {name} | " + " | ".join(_pct(per_class[c]) for c in class_names) + " |")
    lines += ["", "## Classes the baseline misses and overclustering recovers", ""]
    baseline_missed = report["baseline_missed"]
    lines.append(f"Baseline misses (IoU 0): {', '.join(baseline_missed) or 'none'}.")
    lines.append("")
    for name in names[:-1]:
        lines.append(f"- {name}: recovers {', '.join(fits[name]['recovered']) or 'none'}; "
                     f"still missing {', '.join(missed_classes(fits[name]['pixel_level']['same_set']['per_class_iou'])) or 'none'}")
    lines += ["", "## Figures", "", "![mIoU vs k](figures/miou_vs_k.png)", ""]
    for overlay in report.get("overlays", []):
        lines.append(f"![{overlay}]({overlay})")
    if report["failed_items"]:
        lines += ["", "## Failed items", "", "| stage | image | error |", "|---|---|---|"]
        lines += [f"| {f['stage']} | {f['image_id']} | {f['error']} |" for f in report["failed_items"]]
    return "\n".join(lines) + "\n"
