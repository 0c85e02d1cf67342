"""The whole job: extract -> fit -> label -> report. Every stage also runs alone, reading what the
stages before it left in output_dir, only when that is complete and made with these settings
(`storage.run.plans`); each skips the work it finds already done."""

import json
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import yaml

from configs.geometry import refuse_limits_no_image_meets
from configs.schema import RunConfig, recorded_config
from core.classes import NUM_CLASSES
from core.evaluation.metrics import miou_rule_text
from core.mapping.human import load_human_mapping
from ray_jobs.atlas import run_atlas
from ray_jobs.extract import run_extract
from ray_jobs.fit import run_fit
from ray_jobs.label import label_inputs, label_shards, run_label
from ray_jobs.report import run_report
from ray_jobs.session import check_schedulable, init_ray
from ray_jobs.streaming import stage_summary, write_failed_items
from storage.datasets import ImageRecord, list_dataset
from storage.run.atomic import write_json_atomic, write_text_atomic
from storage.run.feature_sets import FeatureShards, own_feature_set
from storage.run.fits import FITS_MARKER, extracted_model, fit_names, import_fit, recorded_fit_inputs, require_fits
from storage.run.layout import Layout
from storage.run.lock import OutputLock, command_line
from storage.run.markers import DONE_DIR
from storage.run.plans import (
    StageIncomplete,
    extract_plan,
    fit_plan,
    label_plan,
    model_identity,
    plan_conflict,
    recorded_plan,
    refuse_conflicts,
    require_complete,
)
from storage.run.shards import dataset_fingerprint, plan_shards
from storage.synth import generate_demo_dataset

log = logging.getLogger(__name__)
STAGES = ("extract", "fit", "label", "report", "atlas")


def ensure_demo_set(cfg: RunConfig) -> None:
    """Generate the demo set where the config asks for it and it is not there yet."""
    demo = cfg.demo_set
    if demo is None or not demo.generate_if_missing or cfg.dataset.kind != "cityscapes":
        return
    if (Path(cfg.dataset.root) / "leftImg8bit" / cfg.dataset.split).is_dir():
        return
    log.info("generating the demo set (%d synthetic images) at %s", demo.num_images, cfg.dataset.root)
    generate_demo_dataset(
        cfg.dataset.root,
        split=cfg.dataset.split,
        num_images=demo.num_images,
        height=demo.height,
        width=demo.width,
        seed=demo.seed,
    )


def stage_steps(cfg: RunConfig, stage: str) -> dict:
    """The Ray Data steps a stage schedules, by config key (`session.check_schedulable`)."""
    return {
        "extract": {
            "extract.read": cfg.extract.read,
            "extract.model": cfg.extract.model,
            "extract.write": cfg.extract.write,
        },
        "label": {"label.read": cfg.label.read, "label.workers": cfg.label.workers, "label.score": cfg.label.score},
    }.get(stage, {})


class Pipeline:
    """Plans every stage up front, so a run that cannot go ahead (another job's output_dir, other
    settings or data) is refused before it changes anything there."""

    def __init__(self, cfg: RunConfig):
        refuse_limits_no_image_meets(cfg)
        self.cfg = cfg
        self.layout = Layout(cfg.output_dir)
        ensure_demo_set(cfg)
        self.records: list[ImageRecord] = list_dataset(
            cfg.dataset.kind, cfg.dataset.root, cfg.dataset.split, cfg.dataset.max_images
        )
        self.fingerprint = dataset_fingerprint(self.records, cfg.dataset.root)
        self.shard_names = [s["shard"] for s in plan_shards(self.records, cfg.dataset.images_per_shard)]
        self.stage_dirs = {"extract": self.layout.features, "fit": self.layout.fits, "label": self.layout.scores}
        recorded = {stage: (recorded_plan(d) or {}).get("settings") for stage, d in self.stage_dirs.items()}
        model = model_identity(cfg, (recorded["extract"] or {}).get("model"))
        self.plans = {"extract": extract_plan(cfg, self.records, model)}
        self.plans["fit"] = fit_plan(cfg, self.plans["extract"], recorded["fit"])
        self.plans["label"] = label_plan(cfg, self.plans["fit"])

    def run(self, stages: tuple[str, ...] = STAGES) -> None:
        self._refuse_missing_inputs(stages[0])
        with OutputLock(self.cfg.output_dir, command_line()):
            refuse_conflicts(
                [c for stage, d in self.stage_dirs.items() if (c := plan_conflict(d, self.plans[stage]))]
                + [c for d in (self.layout.histograms,) if (c := plan_conflict(d, self.plans["extract"]))]
            )
            init_ray(self.cfg)
            for stage in stages:
                check_schedulable(stage_steps(self.cfg, stage), self.cfg.ray)
            # only now, when the run goes ahead: config.yaml describes the results in output_dir
            write_text_atomic(
                yaml.safe_dump(recorded_config(self.cfg), sort_keys=False), self.cfg.output_dir / "config.yaml"
            )
            for stage in stages:
                self._timed(stage, getattr(self, f"stage_{stage}"))

    def _refuse_missing_inputs(self, first: str) -> None:
        """A stage run alone without the results it reads is refused before anything starts or is
        written (no Ray, no lock file, no config.yaml); the stage checks its inputs again under the
        lock. The fit stage is left to itself: it may read other runs' features only."""
        needed_by = f"the {first} stage"
        if first in ("label", "report", "atlas"):
            features = self._features(needed_by)
            self._fits(features, needed_by)
            if first == "report":
                self._scores(features, needed_by)

    def stage_extract(self) -> None:
        done = run_extract(self.cfg, self.records, self.plans["extract"])
        write_failed_items(self.cfg.output_dir, done)
        print(stage_summary("extract", done, self.cfg.output_dir))

    def stage_fit(self) -> None:
        run_fit(self.cfg, self.plans["fit"], self.plans["extract"], self.shard_names, self.fingerprint)

    def stage_label(self) -> None:
        features = self._features("the label stage")
        fits = self._fits(features, "the label stage")[0]
        done = run_label(self.cfg, self.records, self.plans["label"], features, fits, self._human_mapping(fits))
        write_failed_items(self.cfg.output_dir, features, done)
        print(stage_summary("label", done, self.cfg.output_dir))

    def stage_report(self) -> None:
        features = self._features("the report stage")
        fits, fit_summary = self._fits(features, "the report stage")
        scores = self._scores(features, "the report stage")
        human = self._human_mapping(fits)
        if (recorded_plan(self.layout.scores) or {}).get("inputs") != label_inputs(features, fits, human):
            raise StageIncomplete(
                f"the label results in {self.layout.scores} were made from other features or fits than "
                "those there now: run `python submit.py label` with this config, then report again"
            )
        ground_truth = {r.image_id for r in self.records if r.label_ids_path}
        report = run_report(
            self.cfg,
            features,
            scores,
            fits,
            fit_summary,
            {"model": extracted_model(features), "fingerprint": self.fingerprint, "ground_truth_ids": ground_truth},
            {stage: t for stage, t in self._timing().items() if stage != "report"},  # its own comes after it
            human,
        )
        log.info("report written to %s", self.cfg.output_dir / "report.md")
        main = report["fits"][fit_names(self.cfg)[0]]
        pixel = (
            _percent(main["pixel_level"]["same_set"]["miou"])
            if report["dataset"]["scored_pixels"]
            else "not measured (no image here has ground truth)"
        )
        patch = main["patch_level"]["same_set"]
        print(
            f"\nk={main['k']}: pixel mIoU {pixel}, patch mIoU {_percent(patch['miou'])} "
            f"({miou_rule_text(patch.get('miou_rule', 'present'), NUM_CLASSES)}) -> "
            f"{self.cfg.output_dir / 'report.md'}"
        )

    def stage_atlas(self) -> str | None:
        if not self.cfg.atlas.enabled:
            return "atlas.enabled is false"
        self.atlas(fit_names(self.cfg)[0], self.layout.root / "atlas")
        return None

    def atlas(self, fit_name: str, out_dir: Path) -> Path:
        """The cluster atlas of one of this run's fits (current with its features), in out_dir."""
        features = self._features("the atlas")
        fits = self._fits(features, "the atlas")[0]
        if fit_name not in fits:
            raise StageIncomplete(f"{self.layout.fits / fit_name} is not one of this run's fits ({', '.join(fits)})")
        return run_atlas(
            self.cfg,
            self.layout.fits / fit_name,
            self.layout.fits / fit_names(self.cfg)[-1],
            FeatureShards(self.layout.features, features),
            self.records,
            out_dir,
        )

    def import_fit(self, source: Path, name: str, keys: tuple[str, str]) -> Path:
        """Another tool's centres and mapping (an .npz) as the fit `fits/<name>` of this run, whose
        extract and fit stages are complete (`fit.import_fit`); the label stage labels it next."""
        features = self._features("import-fit")
        fits = self._fits(features, "import-fit", with_imported=False)[0]
        return import_fit(
            self.cfg, self.plans["fit"], self.plans["extract"], extracted_model(features), fits, source, name, keys
        )

    def _features(self, needed_by: str) -> dict[str, dict]:
        return require_complete(self.layout.features, self.plans["extract"], self.shard_names, needed_by)

    def _scores(self, features: dict[str, dict], needed_by: str) -> dict[str, dict]:
        shards = [s["shard"] for s in label_shards(self.cfg, self.records, features)]
        return require_complete(self.layout.scores, self.plans["label"], shards, needed_by)

    def _fits(self, features: dict[str, dict], needed_by: str, with_imported: bool = True) -> tuple[dict, dict]:
        inputs = recorded_fit_inputs(self.cfg, own_feature_set(self.layout.features, features, self.fingerprint))
        return require_fits(self.cfg, self.plans["fit"], inputs, needed_by, with_imported)

    def _human_mapping(self, fits: dict) -> np.ndarray | None:
        """label.human_mapping for the main fit, checked against it (None where unset)."""
        if self.cfg.label.human_mapping is None:
            return None
        main = fit_names(self.cfg)[0]
        return load_human_mapping(Path(self.cfg.label.human_mapping), fits[main], self.layout.fits / main)

    def _timing(self) -> dict:
        """timing.json: per stage, its last run's {"seconds", "did_work", and for the shard stages
        "shards_done" of "shards"}; a stage that did nothing says why ("skipped")."""
        path = self.cfg.output_dir / "timing.json"
        try:
            timing = json.loads(path.read_text()) if path.exists() else {}
        except ValueError:  # informational only: a damaged file is started afresh
            log.warning("%s is damaged; the stage timings start afresh", path)
            return {}
        # entries of another form (an older version's bare seconds, damaged ones) say nothing of the work done: left out
        return {stage: t for stage, t in (timing.items() if isinstance(timing, dict) else []) if _timing_entry(t)}

    def _written_markers(self, stage: str) -> dict[Path, tuple[int, int]]:
        """The files a stage (re)writes when, and only when, it does work -> (inode, mtime): its
        shard markers, the fit stage's one marker, the report (written anew each time: it holds the
        timings of the stages before it), the atlas page."""
        paths = {
            "extract": sorted((self.layout.features / DONE_DIR).glob("shard-*.json")),
            "label": sorted((self.layout.scores / DONE_DIR).glob("shard-*.json")),
            "fit": [self.layout.fits / FITS_MARKER],
            "report": [self.layout.root / "report.json"],
            "atlas": [self.layout.root / "atlas" / "index.html"],
        }[stage]
        return {p: (st.st_ino, st.st_mtime_ns) for p in paths if (st := _stat(p)) is not None}

    def _timed(self, stage: str, fn: Callable[[], str | None]) -> None:
        """Run a stage and record in timing.json what it did (the report's wall-time line): the
        seconds, whether it wrote anything (a resumed run skips done work), and how many shards."""
        before = self._written_markers(stage)
        start = time.perf_counter()
        skipped = fn()
        seconds = round(time.perf_counter() - start, 2)
        written = {p for p, stamp in self._written_markers(stage).items() if before.get(p) != stamp}
        entry = {"seconds": seconds, "did_work": bool(written)}
        if stage in ("extract", "label"):
            entry |= {"shards_done": len(written), "shards": len(self.shard_names)}
        if not written:
            entry["skipped"] = skipped or "done in an earlier run"
        timing = self._timing()
        timing[stage] = entry
        write_json_atomic(timing, self.cfg.output_dir / "timing.json")


def _timing_entry(entry) -> bool:
    """Whether a timing.json entry has the form `Pipeline._timed` writes."""
    return (
        isinstance(entry, dict)
        and isinstance(entry.get("did_work"), bool)
        and isinstance(entry.get("seconds"), (int, float))
        and isinstance(entry.get("skipped", ""), str)
        and all(isinstance(entry.get(n, 0), int) for n in ("shards_done", "shards"))
    )


def _stat(path: Path) -> os.stat_result | None:
    try:
        return path.stat()
    except FileNotFoundError:
        return None


def _percent(value: float | None) -> str:
    return "n/a (no image scored)" if value is None or value != value else f"{100 * value:.1f} %"
