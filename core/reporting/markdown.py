"""The run report as Markdown, from the JSON-safe report dict (see ray_jobs/report.py)."""

from core.classes import NUM_CLASSES
from core.evaluation.metrics import miou_rule_text

PROTOCOL_TITLES = {
    "same_set": "same-set majority (the paper's)",
    "held_out": "held-out majority (CV)",
    "label_free": "label-free (via baseline)",
    "human": "human (atlas mapping.json)",
}


def _pixels_scored(stride: int) -> str:
    return "all" if stride == 1 else f"every {stride}{'nd' if stride == 2 else 'rd' if stride == 3 else 'th'}"


def _pct(value) -> str:
    return "—" if value is None else f"{100 * value:.1f}"


MISSED_IOU = 0.05  # below 5 % IoU a class is effectively missing from the pseudo-labels


def missed_classes(per_class_iou: dict) -> list[str]:
    """Classes present in the ground truth or prediction that a fit effectively misses (IoU < 5 %)."""
    return [name for name, iou in per_class_iou.items() if iou is not None and iou < MISSED_IOU]


def render_markdown(report: dict) -> str:
    """Every line says what was measured, or that nothing was: a run whose images have no ground
    truth (e.g. fitted and mapped on other sets) scores nothing at pixel level, and its report says so
    instead of showing empty tables; a stage a resumed run skipped says so instead of a time."""
    fits = report["fits"]
    names = list(fits)
    main, baseline = names[0], names[-1]
    dataset = report["dataset"]
    scored = dataset["scored_pixels"] > 0
    lines = [
        f"# Overclustering report: {report['run_name']}",
        "",
        f"- **Model:** {report['model']}",
        f"- **Feature kind:** {report['feature_kind']}",
        f"- **Protocol:** `{report.get('protocol', 'official')}` (the steps around the model: `core/presets.py`)",
        "- **Evaluators:** "
        + ", ".join(EVALUATOR_TITLES[e] for e in report.get("evaluators", ["official"]))
        + (
            "; protocol sensitivity: every fit also labelled the other way and scored by the official and the paper's "
            "evaluator (below)"
            if report.get("protocol_sensitivity")
            else "; protocol sensitivity off (`report.sensitivity`)"
        ),
        f"- **Dataset:** {dataset['kind']} `{dataset['root']}` split `{dataset['split']}` (fingerprint "
        f"`{dataset['fingerprint']}`): {_images_text(dataset)}",
        _mapping_line(fits[main]["pixel_level"], fits[baseline]["k"], scored),
        *_sources_lines(fits[main], scored),
        *_imported_lines(fits),
        "- **Wall time** (each stage's last run): "
        + (", ".join(_stage_time(stage, entry) for stage, entry in report["timing"].items()) or "not recorded"),
        "",
    ]
    lines += _sweep_section(report, names, scored)
    if scored:
        lines += _protocols_section(fits, names)
        lines += _few_shot_section(fits, names)
        lines += _per_class_section(report, names)
        lines += _sensitivity_section(report)
        lines += _cause_section(report)
    else:
        lines += [
            "",
            "## Pixel-level scores",
            "",
            f"Not measured: none of the {dataset['num_images']} images labelled here has ground truth, so no "
            "mapping protocol, per-class IoU, missed or recovered class, protocol sensitivity, panoptic quality "
            "or absorption was scored.",
        ]
    lines += _backbone_section(report)
    lines += _variants_section(report, names, scored)
    if scored:
        lines += _absorption_section(report)
    if report.get("figures"):
        lines += ["", "## Figures", ""]
        lines += [f"![{key}]({path})" for key, path in report["figures"].items()]
    outputs = report.get("outputs", {})
    if outputs.get("labels"):
        lines += [
            "",
            "## Outputs",
            "",
            f"Cityscapes-format pseudo-labels of {main} ({report.get('written_variant', 'plain')}) under "
            f"`{outputs['labels']}/` (labelIds, trainIds, instanceIds, panoptic PNGs"
            + (f", COCO panoptic JSON `{outputs['panoptic_json']}`" if outputs.get("panoptic_json") else "")
            + ").",
        ]
    if outputs.get("atlas"):
        lines += [
            "",
            f"Cluster atlas of {main}: [{outputs['atlas']}]({outputs['atlas']}), written by the atlas "
            "stage: every cluster with example patches, to look at and name (`python submit.py atlas --fit "
            "<run>/fits/<fit>` for any other fit). Its exported `mapping.json` goes to `label.human_mapping` or "
            "`apply --mapping`.",
        ]
    if report["failed_items"]:
        lines += ["", "## Failed items", "", "| stage | image | error |", "|---|---|---|"]
        lines += [f"| {f['stage']} | {f['image_id']} | {f['error']} |" for f in report["failed_items"]]
    return "\n".join(lines) + "\n"


def _fit_cell(name: str, fit: dict) -> str:
    """A fit's name as every table row gives it: an imported fit says where it came from."""
    origin = fit.get("imported_from")
    return name if origin is None else f"{name}, imported from `{origin['file']}` (sha256 `{origin['sha256'][:16]}`)"


def _imported_lines(fits: dict) -> list[str]:
    """Each imported fit: its file, its whole checksum, and what was done to its centres."""
    lines = []
    for name, fit in fits.items():
        if origin := fit.get("imported_from"):
            low, high = origin["row_norms"]
            lines.append(
                f"- **Imported fit {name}:** `{origin['file']}` (sha256 `{origin['sha256']}`), arrays "
                f"`{origin['keys']['centroids']}` ({origin['dtypes']['centroids']}, k = {fit['k']}) and "
                f"`{origin['keys']['mapping']}` ({origin['dtypes']['mapping']}); "
                + (
                    f"its rows were not unit length (norms {low:.3g} to {high:.3g}) and were L2-normalised: "
                    "a pixel takes the nearest centre by cosine, which can differ from Euclidean distance to "
                    "the raw centres"
                    if origin["rescaled_to_unit"]
                    else "unit rows, labelled by cosine"
                )
                + "; its mapping came with it (no patch-level score, no other mapping protocol)"
            )
    return lines


def _images_text(dataset: dict) -> str:
    """How many images were labelled and how many of them scored against ground truth."""
    n, with_gt = dataset["num_images"], dataset["num_with_ground_truth"]
    text = f"{n} images labelled, {dataset['num_failed']} failed (listed in `failed_items.json`); "
    if dataset["scored_pixels"]:
        return text + (
            f"all {n} have ground truth and are scored"
            if with_gt == n
            else f"{with_gt} of {n} have ground truth and are scored"
        )
    if with_gt == 0:
        return text + f"0 of {n} have ground truth: nothing was scored"
    return text + f"{with_gt} of {n} have ground truth, but none of it is a class's pixel: nothing was scored"


def _mapping_line(level: dict, baseline_k: int, scored: bool) -> str:
    """The mapping protocols the pixel-level tables score (those the report has)."""
    if not scored:
        return (
            f"- **Mapping:** each cluster takes the majority class of the labelled patches it was mapped on; the "
            f"baseline (k = {baseline_k}) is matched to the classes one-to-one (Hungarian). No pixel-level "
            "protocol is scored here (no ground truth)."
        )
    described = {
        "same_set": "*same-set* maps clusters to classes on the images it scores (the paper's protocol, an "
        "oracle as k grows)",
        "held_out": "*held-out* maps each fold of images with the other folds only",
        "label_free": "*label-free* maps each cluster to the baseline cluster most of its patches are nearest to",
        "human": "*human* is a person's mapping.json (the cluster atlas)",
    }
    return (
        f"- **Mapping protocols:** {'; '.join(text for p, text in described.items() if p in level)}. The baseline "
        f"is k = {baseline_k} with one-to-one Hungarian matching."
    )


def _stage_time(stage: str, entry: dict) -> str:
    """A stage's last run: its time where it did work, else what it skipped."""
    if not entry["did_work"]:
        return f"{stage} skipped ({entry.get('skipped', 'done in an earlier run')})"
    text = f"{stage} {entry['seconds']:.1f} s"
    if "shards" in entry and entry["shards_done"] < entry["shards"]:
        text += f" ({entry['shards_done']} of {entry['shards']} shards; the others done in an earlier run)"
    return text


def _patch_rule_line(levels: list[dict]) -> str:
    """Which rule the patch-level mIoUs average the classes by (summaries made before the rule was
    recorded averaged the classes present)."""
    rules = sorted({level["same_set"].get("miou_rule", "present") for level in levels})
    return "*patch mIoU*: " + "; ".join(miou_rule_text(r, NUM_CLASSES) for r in rules) + "."


def _sweep_section(report: dict, names: list[str], scored: bool) -> list[str]:
    fits = report["fits"]
    mapped_here = (fits[names[0]].get("mapped_on") or {}).get("features", "this run") == "this run"
    lines = [
        "## k sweep ("
        + (
            "paper protocol: same-set majority mapping"
            if mapped_here
            else "majority mapping made on the mapping set: see *Mapped on*"
        )
        + ")",
        "",
    ]
    if scored:
        lines += [
            "Pixel-level numbers count every pixel at full resolution, or, where the last column says so, every "
            "s-th pixel in each direction (`label.sweep_pixel_stride`: the sweep's extra fits, whose labels are "
            "not written).",
            "",
            "| fit | fitted by | mapping | k | patch mIoU | pixel mIoU | pixel acc | classes with IoU ≥ 5 % "
            "| dead centroids | cluster purity | pixels scored |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
    else:
        lines += ["| fit | fitted by | mapping | k | patch mIoU | dead centroids |", "|---|---|---|---|---|---|"]
    for name in names:
        f = fits[name]
        patch = "not measured" if f["patch_level"] is None else _pct(f["patch_level"]["same_set"]["miou"])
        # fit.method (k-means or codebook merge); fits made before it was recorded were k-means ones
        cells = [_fit_cell(name, f), f.get("fitted_by", "k-means"), f["mapping_kind"], str(f["k"]), patch]
        dead = f"{f['dead_centroids']}/{f['k']}"
        if scored:
            pixel = f["pixel_level"]["same_set"]
            present = sum(1 for v in pixel["per_class_iou"].values() if v is not None)
            found = present - len(missed_classes(pixel["per_class_iou"]))
            cells += [
                _pct(pixel["miou"]),
                _pct(pixel["pixel_accuracy"]),
                f"{found}/{present}" if present else "—",
                dead,
                _pct(f.get("weighted_purity")),
                _pixels_scored(f["pixel_stride"]),
            ]
        else:
            cells.append(dead)
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        _patch_rule_line([fits[n]["patch_level"] for n in names if fits[n]["patch_level"] is not None])
        + " *dead centroids*: clusters no pixel labelled here is nearest to (a sweep fit scored at a stride: "
        "none of the pixels at that stride)."
        + ("" if scored else " The pixel-level columns are left out: no image here has ground truth."),
    ]
    return lines


def _own_sweep(fits: dict, names: list[str]) -> list[str]:
    """The fits the run made, the baseline left out: those with every mapping protocol."""
    return [n for n in names[:-1] if fits[n].get("imported_from") is None]


def _protocols_section(fits: dict, names: list[str]) -> list[str]:
    protocols = [p for p in PROTOCOL_TITLES if p in fits[names[0]]["pixel_level"]]
    lines = [
        "",
        "## Where the gain comes from: pixel mIoU (%) by mapping protocol",
        "",
        "| fit | k | " + " | ".join(PROTOCOL_TITLES[p] for p in protocols) + " |",
        "|---|---|" + "---|" * len(protocols),
    ]
    for name in _own_sweep(fits, names):
        level = fits[name]["pixel_level"]
        cells = []
        for p in protocols:
            cell = _pct(level[p]["miou"]) if p in level else "—"  # human: the main fit's alone
            if p == "held_out" and p in level:
                cell += f" (folds {_pct(level[p]['fold_miou_mean'])} ± {_pct(level[p]['fold_miou_std'])})"
            cells.append(cell)
        lines.append(f"| {name} | {fits[name]['k']} | " + " | ".join(cells) + " |")
    if len(_own_sweep(fits, names)) < len(names) - 1:
        lines += ["", "Imported fits are left out: they came with their own mapping (scored in the k sweep above)."]
    return lines


def _per_class_section(report: dict, names: list[str]) -> list[str]:
    fits = report["fits"]
    class_names = list(fits[names[0]]["pixel_level"]["same_set"]["per_class_iou"])
    lines = [
        "",
        "## Per-class IoU (pixel level, same-set mapping, %)",
        "",
        "| fit | " + " | ".join(class_names) + " |",
        "|---|" + "---|" * len(class_names),
    ]
    for name in names:
        per_class = fits[name]["pixel_level"]["same_set"]["per_class_iou"]
        lines.append(f"| {_fit_cell(name, fits[name])} | " + " | ".join(_pct(per_class[c]) for c in class_names) + " |")
    lines += [
        "",
        "—: the class is in neither the ground truth nor the prediction.",
        "",
        "## Classes the baseline misses and overclustering recovers",
        "",
    ]
    lines.append(f"Baseline misses (IoU < {100 * MISSED_IOU:.0f} %): {', '.join(report['baseline_missed']) or 'none'}.")
    lines.append("")
    for name in names[:-1]:
        lines.append(
            f"- {_fit_cell(name, fits[name])}: recovers {', '.join(fits[name]['recovered']) or 'none'}; "
            f"still missing "
            f"{', '.join(missed_classes(fits[name]['pixel_level']['same_set']['per_class_iou'])) or 'none'}"
        )
    return lines


def _sources_lines(main: dict, scored: bool) -> list[str]:
    """Which feature sets the centroids were fitted on and the clusters mapped on (fit.features,
    fit.mapping_from), where that is not simply this run's own images."""
    fitted, mapped = main.get("fitted_on") or [], main.get("mapped_on") or {}
    own = "this run"
    lines = []
    if any(f["features"] != own for f in fitted):
        lines.append(
            "- **Fitted on:** "
            + "; ".join(
                f"{f['features']} ({f['sampled_rows']} sampled patches, weight "
                f"{f['weight']:g}, content `{f['content_key']}`)"
                for f in fitted
            )
        )
    if mapped and mapped.get("features") != own:
        lines.append(
            f"- **Mapped on:** {mapped['features']} ({mapped['labelled_patches']} labelled patches, content "
            f"`{mapped['content_key']}`), not the images labelled here: "
            + (
                'every *majority* number below ("same-set" included) maps with that set\'s labels and scores '
                "these images, a cross-set score; "
                if scored
                else ""
            )
            + "patch-level numbers are that set's own patches"
        )
    return lines


def _few_shot_section(fits: dict, names: list[str]) -> list[str]:
    """mIoU when each cluster is named from m labelled patches: what a person looking at m
    thumbnails per cluster can expect."""
    shots = sorted({int(m) for n in _own_sweep(fits, names) for m in fits[n]["pixel_level"].get("few_shot", {})})
    if not shots:
        return []
    first = fits[names[0]]["pixel_level"]["few_shot"]
    draws = next(iter(first.values()))["draws"] if first else 0
    lines = [
        "",
        "## How many looks a mapping needs: few-shot mapping, pixel mIoU (%)",
        "",
        f"Each cluster of fold f's images takes the majority class of m labelled patches drawn at random from the "
        f"other folds (all of them where a cluster has fewer), mean ± std over {draws} seeded draws, pooled over "
        "folds, every pixel at full resolution. *all* is the held-out majority mapping.",
        "",
        "| fit | k | " + " | ".join(f"m = {m}" for m in shots) + " | all (held-out) | label-free |",
        "|---|---|" + "---|" * (len(shots) + 2),
    ]
    for name in _own_sweep(fits, names):
        level = fits[name]["pixel_level"]
        few = level.get("few_shot", {})
        cells = [
            f"{_pct(few[str(m)]['miou_mean'])} ± {_pct(few[str(m)]['miou_std'])}" if str(m) in few else "—"
            for m in shots
        ]
        lines.append(
            f"| {name} | {fits[name]['k']} | "
            + " | ".join(cells)
            + f" | {_pct(level.get('held_out', {}).get('miou'))} | "
            f"{_pct(level.get('label_free', {}).get('miou'))} |"
        )
    return lines


EVALUATOR_TITLES = {
    "official": "*official* (cityscapesscripts' rules, full resolution)",
    "paper": "*paper* (the paper's evaluate_cascade_pseudolabels.py: 512x1024, no void or crowd rules)",
    "cause": "*cause* (CAUSE's test_tr.py on the 322 centre crop, 27 classes, the baseline only)",
}
LABELLING_TITLES = {
    "full": "full size",
    "resized": "resized, NEAREST up",
    "crop": "CAUSE's 322 centre crop",
    "crop+crf": "CAUSE's 322 centre crop + its CRF",
    "full+crf": "full size + CRF",
    "windows": "paper's CAUSE script, one scale",
    "windows+crf": "paper's CAUSE script, one scale + its CRF",
    "multiscale": "paper's CAUSE script, multi-scale",
    "multiscale+crf": "paper's CAUSE script, multi-scale + its CRF",
}
# the row each protocol preset reports as its own (cause: the baseline's crop row; the fits keep official)
OWN_ROW = {"official": "full/official", "paper": "resized/paper", "cause": "crop+crf/cause"}


def _delta(value, reference) -> str:
    return "—" if value is None or reference is None else f"{100 * (value - reference):+.1f}"


def _baseline_rows_note(sensitivity: dict) -> str:
    """What the baseline's extra rows are, where the run has them."""
    labels = {row["labels"] for rows in sensitivity["fits"].values() for row in rows.values()}
    note = ""
    if "full+crf" in labels:
        note += " *full size + CRF* (the baseline): this tool's CRF (refine.crf) on the baseline's class logits."
    if "windows" in labels:
        note += (
            " *paper's CAUSE script* (the baseline, protocol `paper`): `generate_semantic_pseudolabels_cause.py`, "
            "each window's log_softmax(3 x cosine) averaged per pixel at 322x644 (multi-scale: also at "
            "inference.scales, the paper's stretched sizes, resized to 322x644 and averaged), optionally its CRF on "
            "softmax(3 x that), NEAREST up; mapped with the baseline's own Hungarian matching (the paper's: 27 -> 27 "
            "on centre crops, then a fixed 27 -> 19 table)."
        )
    return note


def _sensitivity_section(report: dict) -> list[str]:
    sensitivity = report.get("protocol_sensitivity")
    if not sensitivity:
        return []
    own = OWN_ROW[sensitivity["protocol"]]
    lines = [
        "",
        "## Protocol sensitivity: the same fits, labelled and scored each way",
        "",
        f"Features and fits made under protocol `{sensitivity['protocol']}` (`core/presets.py`); same-set mapping "
        "(the baseline: Hungarian). **Labels** *full size*: made at the image's resolution (official); *resized, "
        "NEAREST up*: made at the resized size (322x644 on Cityscapes) and upsampled NEAREST (the paper's scripts). "
        "**Evaluator** *official*: cityscapesscripts' rules at full resolution (void pixels excluded, crowd rules in "
        "PQ); *paper*: the paper's `evaluate_cascade_pseudolabels.py` (prediction and ground truth resized NEAREST to "
        "512x1024, unassigned predictions not counted, no void or crowd rules); *cause* (protocol `cause`, the "
        "baseline only): CAUSE's test_tr.py, 27 classes (labelIds 7..33) on NEAREST-resized 322 centre crops, one "
        "Hungarian matching of clusters to classes over all crops, without and with its 27-way CRF (the Δ compares "
        "27 classes with 19). Δ: against the fit's full size / "
        f"official row. **bold**: this run's own protocol ({own}). A fit scored at a pixel stride has its "
        "full-size labels only at that stride: no PQ and no paper's evaluator there."
        + _baseline_rows_note(sensitivity),
        "",
        "| fit | labels | evaluator | mIoU | pixel acc | PQ | PQ stuff | PQ things | SQ | RQ | Δ mIoU | Δ PQ |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, rows in sensitivity["fits"].items():
        reference = rows["full/official"]
        ref_pq = (reference["panoptic"] or {}).get("pq")
        own_key = own if own in rows else "full/official"
        for key, row in rows.items():
            pan = row["panoptic"] or {}
            cells = [
                _fit_cell(name, report["fits"][name]),
                LABELLING_TITLES[row["labels"]],
                row["evaluator"],
                _pct(row["miou"]),
                _pct(row["pixel_accuracy"]),
                _pct(pan.get("pq")),
                _pct(pan.get("pq_stuff")),
                _pct(pan.get("pq_things")),
                _pct(pan.get("sq")),
                _pct(pan.get("rq")),
                _delta(row["miou"], reference["miou"]),
                _delta(pan.get("pq"), ref_pq),
            ]
            if row["pixel_stride"] != 1:
                cells[3] += f" (every {row['pixel_stride']}th px)"
            if key == own_key:
                cells = [f"**{c}**" for c in cells]
            lines.append("| " + " | ".join(cells) + " |")
    return lines


def _cause_section(report: dict) -> list[str]:
    """The baseline under CAUSE's test protocol, where it ran without the sensitivity table (which holds
    it otherwise)."""
    rows = report.get("cause_protocol")
    if not rows:
        return []
    lines = [
        "",
        "## The baseline under CAUSE's test protocol",
        "",
        "CAUSE's test_tr.py: 27 classes (labelIds 7..33) on NEAREST-resized 322 centre crops, one Hungarian matching "
        "of clusters to classes over all crops, without and with its 27-way CRF.",
        "",
        "| labels | mIoU (27 classes) | pixel acc |",
        "|---|---|---|",
    ]
    lines += [
        f"| {LABELLING_TITLES[row['labels']]} | {_pct(row['miou'])} | {_pct(row['pixel_accuracy'])} |"
        for row in rows.values()
    ]
    return lines


PAPER_MISSING_CLASSES = ("fence", "pole", "traffic light", "traffic sign", "rider", "train", "motorcycle")


def _backbone_section(report: dict) -> list[str]:
    """The head's and the raw backbone's features fitted alike (model.compare_backbone): the paper's last row."""
    comparison = report.get("backbone_comparison")
    if not comparison:
        return []
    lines = [
        "",
        f"## Head vs backbone features (patch level, k = {comparison['k']})",
        "",
        f"Both fitted in this run with {comparison['engine']} on the same patches (base scale, the protocol's "
        "window merge and patch labels), each mapped by majority vote over the labelled patches "
        "(same set; held out: per fold, mapped on the other folds). Per-class columns: the 7 classes the "
        "CAUSE-27 baseline misses in the paper's table (%).",
        "",
        "| features | dim | patch mIoU | held-out mIoU | patch acc | " + " | ".join(PAPER_MISSING_CLASSES) + " |",
        "|---|---|---|---|---|" + "---|" * len(PAPER_MISSING_CLASSES),
    ]
    for kind in ("head", "backbone"):
        level = comparison[kind]["patch_level"]
        same = level["same_set"]
        lines.append(
            f"| {kind} | {comparison[kind]['feature_dim']} | {_pct(same['miou'])} | "
            f"{_pct(level.get('held_out', {}).get('miou'))} | "
            f"{_pct(same['pixel_accuracy'])} | "
            + " | ".join(_pct(same["per_class_iou"].get(c)) for c in PAPER_MISSING_CLASSES)
            + " |"
        )
    return lines + ["", _patch_rule_line([comparison[kind]["patch_level"] for kind in ("head", "backbone")])]


# what the baseline's seconds measure (core.labelling.image.ImageLabeller.label)
BASELINE_SECONDS = (
    "the baseline's row: its trainIds and panoptic segments from its cluster map (its nearest-centroid "
    "assignment, made in one pass with the sweep's fits, is not timed)."
)


def _variants_section(report: dict, names: list[str], scored: bool) -> list[str]:
    variants = report.get("variants") or {}
    if not variants:
        return []
    if not scored:
        return [
            "",
            f"## Time per image of {names[0]}'s label variants and the baseline",
            "",
            "Seconds per image (one core): the main fit's nearest-centroid assignment, trainIds and panoptic "
            f"segments, plus the variant's own work; {BASELINE_SECONDS} Not scored (no ground truth).",
            "",
            "| variant | s / image |",
            "|---|---|",
        ] + [f"| {name} | {v['seconds_per_image']:.2f} |" for name, v in variants.items()]
    lines = [
        "",
        f"## Semantic and panoptic quality of {names[0]}'s label variants and the baseline",
        "",
        "Things are connected components of the labels unless a variant makes instances (em_things). "
        "Seconds per image (one core): the main fit's nearest-centroid assignment, trainIds and panoptic segments, "
        f"plus the variant's own work; {BASELINE_SECONDS}",
        "",
        "| variant | mIoU | pixel acc | PQ | SQ | RQ | PQ stuff | PQ things | s / image |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, v in variants.items():
        pan = v["panoptic"]
        lines.append(
            f"| {name} | {_pct(v['semantic']['miou'])} | {_pct(v['semantic']['pixel_accuracy'])} | "
            f"{_pct(pan['all']['pq'])} | {_pct(pan['all']['sq'])} | {_pct(pan['all']['rq'])} | "
            f"{_pct(pan['stuff']['pq'])} | {_pct(pan['things']['pq'])} | {v['seconds_per_image']:.2f} |"
        )
    if all("paper_evaluator" in v for v in variants.values()):
        lines += [
            "",
            "The same under the paper's evaluator (512x1024, unassigned pixels not counted, no void or crowd rules):",
            "",
            "| variant | mIoU | pixel acc | PQ | SQ | RQ | PQ stuff | PQ things |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for name, v in variants.items():
            sem, pan = v["paper_evaluator"]["semantic"], v["paper_evaluator"]["panoptic"]
            lines.append(
                f"| {name} | {_pct(sem['miou'])} | {_pct(sem['pixel_accuracy'])} | {_pct(pan['all']['pq'])} | "
                f"{_pct(pan['all']['sq'])} | {_pct(pan['all']['rq'])} | {_pct(pan['stuff']['pq'])} | "
                f"{_pct(pan['things']['pq'])} |"
            )
    first = next(iter(variants.values()))["panoptic"]["per_class"]
    lines += ["", "Per-class PQ (%):", "", "| variant | " + " | ".join(first) + " |", "|---|" + "---|" * len(first)]
    for name, v in variants.items():
        lines.append(f"| {name} | " + " | ".join(_pct(c["pq"]) for c in v["panoptic"]["per_class"].values()) + " |")
    return lines


def _absorption_section(report: dict) -> list[str]:
    absorption = report.get("absorption") or {}
    if not absorption:
        return []
    lines = [
        "",
        "## Absorption: where each class's pixels go (top 2 other predictions, % of the class's pixels)",
        "",
        "| class | " + " | ".join(f"{fit}: correct | {fit}: absorbed by" for fit in absorption) + " |",
        "|---|" + "---|---|" * len(absorption),
    ]
    rows = zip(*absorption.values())
    for per_fit in rows:
        cells = []
        for row in per_fit:
            absorbed = ", ".join(f"{a['class']} {100 * a['share']:.0f}" for a in row["absorbed_by"]) or "—"
            cells += [_pct(row["correct"]), absorbed]
        lines.append(f"| {per_fit[0]['class']} | " + " | ".join(cells) + " |")
    return lines


def render_comparison(reports: dict[str, dict]) -> str:
    """Runs side by side in the paper's k-sweep form: pixel mIoU and per-class IoU for every fit of
    every run (e.g. feature kind `head` against `backbone`), same-set mapping."""
    first = next(iter(reports.values()))
    class_names = list(next(iter(first["fits"].values()))["pixel_level"]["same_set"]["per_class_iou"])
    lines = [
        "# k sweep across runs (pixel level, same-set majority mapping; IoU %)",
        "",
        "*mIoU*: each run's own labels (made as its protocol makes them) under the official evaluator, as are the "
        "per-class IoUs. The next two columns score every run's fits the same two ways, from each report's "
        "protocol sensitivity table: *full / official* (labels at full size, cityscapesscripts' rules) and "
        "*resized / paper* (labels at the resized size NEAREST up, the paper's evaluator). A sweep fit scored at a "
        "pixel stride (`label.sweep_pixel_stride`) has its full / official mIoU on those pixels only.",
        "",
        "| run | protocol | features | fit | k | mIoU | full / official | resized / paper | "
        + " | ".join(class_names)
        + " |",
        "|---|---|---|---|---|---|---|---|" + "---|" * len(class_names),
    ]
    for run, report in reports.items():
        sensitivity = (report.get("protocol_sensitivity") or {}).get("fits", {})
        for name, fit in report["fits"].items():
            level = fit["pixel_level"]["same_set"]
            rows = sensitivity.get(name, {})
            lines.append(
                f"| {run} | {report.get('protocol', 'official')} | {report['feature_kind']} | "
                f"{_fit_cell(name, fit)} | {fit['k']} | "
                f"{_pct(level['miou'])} | {_pct(rows.get('full/official', {}).get('miou'))} | "
                # a report made before the paper's evaluator was renamed calls it "seed"
                f"{_pct((rows.get('resized/paper') or rows.get('resized/seed') or {}).get('miou'))} | "
                + " | ".join(_pct(level["per_class_iou"][c]) for c in class_names)
                + " |"
            )
    # reports made before they recorded what was scored are taken as scored
    unscored = [run for run, report in reports.items() if report["dataset"].get("scored_pixels", 1) == 0]
    if unscored:
        lines += ["", f"Nothing was scored in {', '.join(unscored)}: none of its images has ground truth (—)."]
    lines += ["", "Models: " + "; ".join(f"{run}: {report['model']}" for run, report in reports.items())]
    return "\n".join(lines) + "\n"
