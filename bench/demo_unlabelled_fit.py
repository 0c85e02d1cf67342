"""Fitting on unlabelled frames, mapping on labelled images: the demo of issue 15 (run on demand).

Generates the labelled demo set and the unlabelled frames (`submit.py synth [--unlabelled]`) under
--work, extracts each once, then runs three fits of the same k sweep that differ only in
`fit.features`: the labelled set alone, the frames alone, and both (frames weighted 2 : 1, as in
the README). All three map clusters on the labelled run's own features with the default held-out
folds, so the held-out mIoU of each (every labelled image scored with a mapping made from the
other folds) is comparable. The "both" fit then labels the frames (`submit.py apply`).

The three runs share one extract: the labelled run's `features/` is copied into the other two
output dirs (markers list their files relative to the output dir, so the copy is complete and
the extract stage skips every shard). A re-run with the same --work resumes every step (its
seconds are then those of the resume).

  nice -n 10 .venv/bin/python -m bench.demo_unlabelled_fit [--work /tmp/demo_unlabelled_fit] [--set KEY=VALUE ...]
"""

import argparse
import json
import shutil
import time
from pathlib import Path

import ray

from configs.schema import load_config
from ray_jobs.apply import run_apply
from ray_jobs.pipeline import Pipeline
from ray_jobs.session import init_ray
from storage.synth import generate_unlabelled_frames

REPO = Path(__file__).resolve().parents[1]
# The refinement variants and the label PNGs are not part of the comparison: off for every run
# (the fits and their scores do not depend on them), which saves most of the label stage's time.
COMMON = [
    "refine.crf=false",
    "refine.em_semantic=false",
    "refine.em_things=false",
    "refine.superpixels=false",
    "refine.prototype_denoising=false",
    "refine.knn_diffusion=false",
    "label.write_label_pngs=false",
    "label.num_overlays=0",
]
STAGES = ("extract", "fit", "label", "report")  # what the scores need (`submit.py run` may do more)
APPLY_ACTORS = ["extract.model.num_actors=1", "label.workers.num_actors=1"]
FRAMES_WEIGHT = 2.0  # the README's 2 : 1 (frames : labelled)


def fit_sets(frames_run: Path) -> dict[str, list[dict]]:
    """fit.features of each of the three fits; `path: null` is the run's own (labelled) features."""
    frames = {"path": str(frames_run)}
    return {
        "labelled": [{"path": None}],
        "unlabelled": [frames],
        "both": [{"path": None}, frames | {"weight": FRAMES_WEIGHT}],
    }


def timed(seconds: dict, step: str, fn) -> None:
    start = time.perf_counter()
    fn()
    seconds[step] = round(time.perf_counter() - start, 1)


def summary(scores: dict) -> dict:
    """A protocol's headline numbers without its per-class table; the few-shot protocol's
    (per m: mean and std over draws) is already one."""
    if "miou" not in scores:
        return scores
    return {key: scores[key] for key in ("miou", "pixel_accuracy", "fold_miou_mean", "fold_miou_std") if key in scores}


def fit_scores(run: Path) -> dict:
    """Per fit of a run: its scores under every mapping protocol (report.json) and what it was
    fitted and mapped on (fits/<name>/meta.json)."""
    report = json.loads((run / "report.json").read_text())
    out = {}
    for name, fit in report["fits"].items():
        meta = json.loads((run / "fits" / name / "meta.json").read_text())["meta"]
        out[name] = {
            "k": fit["k"],
            "mapping_kind": fit["mapping_kind"],
            "pixel_stride": fit["pixel_stride"],
            "pixel_level": {p: summary(s) for p, s in fit["pixel_level"].items()},
            "patch_level": {p: summary(s) for p, s in fit["patch_level"].items()},
            "n_samples": meta["n_samples"],
            "fitted_on": meta["fitted_on"],
            "mapped_on": meta["mapped_on"],
        }
    return {
        "protocol": report["protocol"],
        "num_images": report["dataset"]["num_images"],
        "num_failed": report["dataset"]["num_failed"],
        "timing": report["timing"],
        "fits": out,
    }


def pct(value) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def in_k_order(fits: dict) -> list[str]:
    """The sweep by k, the baseline (k = 19, Hungarian) last."""
    return sorted(fits, key=lambda name: (name.startswith("baseline"), fits[name]["k"]))


def markdown(runs: dict[str, dict]) -> str:
    """The headline (held-out pixel mIoU by k and fit set), then every score of every fit."""
    first = next(iter(runs.values()))["fits"]
    lines = ["| fit | " + " | ".join(f"fitted on {r}" for r in runs) + " |", "|---|" + "---|" * len(runs)]
    for name in in_k_order(first):
        lines.append(
            f"| {name} | "
            + " | ".join(pct(r["fits"][name]["pixel_level"].get("held_out", {}).get("miou")) for r in runs.values())
            + " |"
        )
    lines += [
        "",
        "| fitted on | fit | mapping | held-out pixel mIoU (folds mean ± std) | held-out patch mIoU | "
        "same-set pixel mIoU | same-set pixel acc | label-free pixel mIoU |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for fitted_on, run in runs.items():
        for name in in_k_order(run["fits"]):
            fit = run["fits"][name]
            px, patch = fit["pixel_level"], fit["patch_level"]
            held = px.get("held_out", {})
            # the held-out protocol maps every fit by majority, the baseline too (same-set: Hungarian)
            mapping = "majority" if fit["mapping_kind"] == "majority" else f"{fit['mapping_kind']} (held-out: majority)"
            lines.append(
                f"| {fitted_on} | {name} | {mapping} | {pct(held.get('miou'))} "
                f"({pct(held.get('fold_miou_mean'))} ± {pct(held.get('fold_miou_std'))}) | "
                f"{pct(patch.get('held_out', {}).get('miou'))} | {pct(px['same_set']['miou'])} | "
                f"{pct(px['same_set']['pixel_accuracy'])} | {pct(px.get('label_free', {}).get('miou'))} |"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("/tmp/demo_unlabelled_fit"))
    parser.add_argument("--frames", type=int, default=200, help="unlabelled frames to generate (README: 200)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a config override for every run, e.g. --set dataset.max_images=50",
    )
    parser.add_argument(
        "--apply",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="label the frames with the 'both' fit (submit.py apply)",
    )
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "demo_unlabelled_fit.json")
    args = parser.parse_args()
    work = args.work.resolve()
    labelled_root, frames_root = work / "data" / "demo_cityscapes", work / "data" / "demo_unlabelled"
    base = [f"dataset.root={labelled_root}", *COMMON, *args.overrides]
    frames_cfg = [*base, "dataset.kind=folder", f"dataset.root={frames_root}"]

    start, seconds = time.perf_counter(), {}
    if not (frames_root / "FRAMES.txt").is_file():  # written last: the folder is complete
        timed(seconds, "synth_frames", lambda: generate_unlabelled_frames(frames_root, num_images=args.frames))
    config = REPO / "configs" / "demo.yaml"
    frames_run = work / "frames"
    # extract alone: the frames have no ground truth, so they cannot be fitted and mapped on their own
    timed(
        seconds,
        "extract_frames",
        lambda: Pipeline(load_config(config, [*frames_cfg, f"output_dir={frames_run}"])).run(("extract",)),
    )
    runs, labelled_run = {}, work / "labelled"
    for fitted_on, features in fit_sets(frames_run).items():  # "labelled" first: its extract is the others'
        out = work / fitted_on
        if out != labelled_run and not (out / "features").exists():
            shutil.copytree(labelled_run / "features", out / "features")  # copy2 keeps mtimes: no re-hash
        # the labelled run generates the demo set under --work on first use (demo_set in demo.yaml)
        cfg = load_config(config, [*base, f"output_dir={out}", f"fit.features={json.dumps(features)}"])
        timed(seconds, f"run_{fitted_on}", lambda cfg=cfg: Pipeline(cfg).run(STAGES))
        runs[fitted_on] = fit_scores(out)
    result = {
        "date": time.strftime("%Y-%m-%d"),
        "config": str(config.relative_to(REPO)),
        "overrides": base,
        "frames_weight": FRAMES_WEIGHT,
        "frames": {"root": str(frames_root), "num_images": args.frames},
        "runs": runs,
    }
    if args.apply:
        fit_dir = work / "both" / "fits" / f"k{cfg.fit.k}"
        # apply runs the model pool and the labelling pool at once: demo.yaml's two actors each (3.3
        # CPUs) do not fit its 2-CPU local cluster, one each (1.65) does
        apply_cfg = load_config(config, [*frames_cfg, f"output_dir={work / 'frames_labelled'}", *APPLY_ACTORS])
        init_ray(apply_cfg)
        applied = {}
        timed(seconds, "apply_both", lambda: applied.update(run_apply(apply_cfg, fit_dir)))
        result["apply"] = {
            "fit": str(fit_dir),
            "num_images": applied["num_images"],
            "num_failed": applied["num_failed"],
        }
    ray.shutdown()
    result["seconds"] = seconds | {"total": round(time.perf_counter() - start, 1)}
    table = markdown(runs)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result | {"table": table}, indent=2))
    print(table)
    print(json.dumps({key: result[key] for key in ("seconds", "apply") if key in result}, indent=2))


if __name__ == "__main__":
    main()
