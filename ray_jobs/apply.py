"""Apply stage: label unlabelled images with a saved fit, one streaming pass at any scale.

Read and decode (CPU tasks) -> the model (model-only actor pool) -> stitch, assign, write the
pseudo-labels and cluster histograms (+ features when asked) on the label actor pool, from a local
folder or an object-store URI. The fit goes into the object store once; the driver holds only the
shard plan and the images' status rows.
"""

import json
import logging
from pathlib import Path

import ray

from ray.data import Dataset

from actors.apply import PseudoLabelImages, finish_apply
from configs.schema import RunConfig
from core.fit_artifact import FitArtifact
from actors.geometry import feature_dim
from ray_jobs.extract import windows_to_features
from ray_jobs.layout import Layout, settings_key
from ray_jobs.streaming import actor_args, finisher, guarded, run_image_stream
from ray_jobs.report import merge_panoptic_annotations
from storage.datasets import list_dataset
from storage.shards import plan_shards, write_json_atomic

log = logging.getLogger(__name__)


class ApplyError(ValueError):
    """The fit cannot be applied with this config; the message says what to change."""


def check_fit_matches_model(fit: FitArtifact, cfg: RunConfig, fit_dir: Path) -> None:
    expected_dim = feature_dim(cfg)
    kind = fit.meta.get("feature_kind")
    if kind != cfg.model.feature_kind or fit.feature_dim != expected_dim:
        raise ApplyError(f"{fit_dir} was fitted on {kind} features of dimension {fit.feature_dim}, but the config's model gives "
                         f"{cfg.model.feature_kind} features of dimension {expected_dim}: use the config the fit was made with")


def run_apply(cfg: RunConfig, fit_dir: Path) -> dict:
    fit = FitArtifact.load(fit_dir)
    check_fit_matches_model(fit, cfg, fit_dir)
    layout = Layout(cfg.output_dir)
    records = list_dataset(cfg.dataset.kind, cfg.dataset.root, cfg.dataset.split, cfg.dataset.max_images)
    shards = plan_shards(records, cfg.dataset.images_per_shard)
    key = settings_key(shards, fit.meta.get("settings_key"), cfg.model, cfg.inference, cfg.panoptic, cfg.apply)
    fit_ref = ray.put({"name": fit.meta.get("name", Path(fit_dir).name), "centroids": fit.centroids, "mapping": fit.mapping})
    config = cfg.model_dump(mode="json")

    def build(ds: Dataset) -> Dataset:
        return windows_to_features(ds, cfg).map(guarded(PseudoLabelImages, per_row=True), **actor_args(cfg.label.workers),
                                                fn_constructor_kwargs={"config": config, "fit": fit_ref,
                                                                       "stage_dir": str(layout.histograms),
                                                                       "labels_dir": str(layout.labels)})

    done = run_image_stream("apply", layout.histograms, key, shards, build,
                            finisher(finish_apply, layout.histograms, config=config, k=fit.k,
                                     features_dir=str(layout.features)))
    failed = [f for s in sorted(done) for f in done[s]["failed"]]
    write_json_atomic(failed, cfg.output_dir / "failed_items.json")
    panoptic_json = merge_panoptic_annotations(layout.histograms, layout.labels, cfg.dataset.split)
    summary = {"fit": str(fit_dir), "fit_meta": fit.meta, "mapping_kind": fit.mapping_kind, "k": fit.k,
               "source": cfg.dataset.root, "num_images": sum(d["num_images"] for d in done.values()),
               "num_failed": len(failed), "histograms": str(layout.histograms.relative_to(cfg.output_dir)),
               "labels": str(layout.labels.relative_to(cfg.output_dir)),
               "panoptic_json": None if panoptic_json is None else str(panoptic_json.relative_to(cfg.output_dir))}
    write_json_atomic(summary, cfg.output_dir / "apply_summary.json")
    log.info("apply: %d images labelled, %d failed -> %s", summary["num_images"], len(failed), cfg.output_dir)
    print(json.dumps({k: summary[k] for k in ("num_images", "num_failed", "labels", "histograms")}))
    return summary
