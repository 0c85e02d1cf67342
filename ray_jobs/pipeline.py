"""The whole job: extract -> fit -> label -> report. Every stage also runs alone, reading what the
stages before it left in output_dir; each skips the work it finds already done."""

import json
import logging
import time
from collections.abc import Callable
from pathlib import Path

import yaml

from configs.schema import RunConfig
from core.fit_artifact import FitArtifact
from ray_jobs.extract import run_extract
from ray_jobs.fit import fit_names, run_fit
from ray_jobs.label import run_label
from ray_jobs.layout import Layout
from ray_jobs.report import run_report
from ray_jobs.session import init_ray
from storage.datasets import ImageRecord, list_dataset
from storage.shards import dataset_fingerprint, read_done, write_json_atomic, write_text_atomic
from storage.synth import generate_demo_dataset

log = logging.getLogger(__name__)
STAGES = ("extract", "fit", "label", "report")


def ensure_demo_set(cfg: RunConfig) -> None:
    """Generate the demo set where the config asks for it and it is not there yet."""
    demo = cfg.demo_set
    if demo is None or not demo.generate_if_missing or cfg.dataset.kind != "cityscapes":
        return
    if (Path(cfg.dataset.root) / "leftImg8bit" / cfg.dataset.split).is_dir():
        return
    log.info("generating the demo set (%d synthetic images) at %s", demo.num_images, cfg.dataset.root)
    generate_demo_dataset(cfg.dataset.root, split=cfg.dataset.split, num_images=demo.num_images,
                          height=demo.height, width=demo.width, seed=demo.seed)


class Pipeline:
    def __init__(self, cfg: RunConfig):
        self.cfg = cfg
        self.layout = Layout(cfg.output_dir)
        ensure_demo_set(cfg)
        self.records: list[ImageRecord] = list_dataset(cfg.dataset.kind, cfg.dataset.root, cfg.dataset.split, cfg.dataset.max_images)
        self.fingerprint = dataset_fingerprint(self.records)
        cfg.output_dir.mkdir(parents=True, exist_ok=True)
        write_text_atomic(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False), cfg.output_dir / "config.yaml")

    def run(self, stages: tuple[str, ...] = STAGES) -> None:
        init_ray(self.cfg)
        for stage in stages:
            self._timed(stage, getattr(self, f"stage_{stage}"))

    def stage_extract(self) -> None:
        run_extract(self.cfg, self.records)

    def stage_fit(self) -> None:
        run_fit(self.cfg, self.fingerprint, self._model_description())

    def stage_label(self) -> None:
        fits = {n: FitArtifact.load(self.layout.fits / n) for n in fit_names(self.cfg)}
        run_label(self.cfg, self.records, fits)

    def stage_report(self) -> None:
        fit_summary = json.loads((self.layout.fits / "fit_summary.json").read_text())
        fits = {n: FitArtifact.load(self.layout.fits / n) for n in fit_names(self.cfg)}
        report = run_report(self.cfg, read_done(self.layout.features), read_done(self.layout.scores), fits, fit_summary,
                            {"model": self._model_description(), "fingerprint": self.fingerprint}, self._timing())
        log.info("report written to %s", self.cfg.output_dir / "report.md")
        main = report["fits"][fit_names(self.cfg)[0]]
        print(f"\nk={main['k']}: pixel mIoU {100 * main['pixel_level']['same_set']['miou']:.1f} %, "
              f"patch mIoU {100 * main['patch_level']['same_set']['miou']:.1f} % -> {self.cfg.output_dir / 'report.md'}")

    def _model_description(self) -> str:
        models = [m["model"] for m in read_done(self.layout.features).values() if m.get("model")]
        if not models:
            raise RuntimeError(f"no extracted features in {self.layout.features}: run the extract stage first")
        return models[0]

    def _timing(self) -> dict:
        path = self.cfg.output_dir / "timing.json"
        return json.loads(path.read_text()) if path.exists() else {}

    def _timed(self, stage: str, fn: Callable[[], None]) -> None:
        start = time.perf_counter()
        fn()
        if stage != "report":
            timing = self._timing()
            timing[stage] = round(time.perf_counter() - start, 2)
            write_json_atomic(timing, self.cfg.output_dir / "timing.json")
