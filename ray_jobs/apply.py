"""Apply stage: label unlabelled images with a saved fit, one streaming pass at any scale.

Read and decode (CPU tasks) -> the model (model-only actor pool) -> stitch, assign, write the
pseudo-labels and cluster histograms (+ features when asked) on the label actor pool, from a local
folder or an object-store URI. The fit goes into the object store once; the driver holds only the
shard plan and the images' status rows.
"""

import dataclasses
import json
import logging
from pathlib import Path

import ray
from ray.data import Dataset

from actors.apply import PseudoLabelImages, finish_apply
from configs.geometry import refuse_limits_no_image_meets
from configs.schema import RunConfig, recorded_dataset_root
from core.clustering.fit_artifact import FitArtifact
from core.errors import UserError
from core.mapping.human import load_human_mapping
from ray_jobs.extract import windows_to_features
from ray_jobs.report import merge_panoptic_annotations
from ray_jobs.session import check_schedulable
from ray_jobs.streaming import Finisher, guarded, run_image_stream, step_args, write_failed_items
from storage.datasets import list_dataset
from storage.run.atomic import write_json_atomic
from storage.run.layout import Layout
from storage.run.lock import OutputLock, command_line
from storage.run.placement import refuse_output_in_input
from storage.run.plans import (
    Plan,
    apply_plan,
    check_plan,
    differences,
    model_identity,
    plan_conflict,
    refuse_conflicts,
)
from storage.run.shards import plan_shards

log = logging.getLogger(__name__)


class ApplyError(UserError, ValueError):
    """The fit cannot be applied with this config; the message says what to change."""


def check_fit_matches_model(fit: FitArtifact, model: dict, fit_dir: Path) -> None:
    """The fit must come from this very model: architecture, weights (checksums), init seed of
    random weights, feature kind and the inference settings that shape the features."""
    made_with = fit.meta.get("model_identity")
    if made_with is None:
        raise ApplyError(f"{fit_dir} does not record the model it was fitted with (an older version made it): refit it")
    if made_with != model:
        diff = differences(made_with, model)
        raise ApplyError(
            f"{fit_dir} was fitted on features of another model: {'; '.join(diff[:8])}; "
            "use the config the fit was made with"
        )


def with_apply_pools(cfg: RunConfig) -> RunConfig:
    """The config with the pools' sizes apply runs them at (apply.model_actors / label_actors),
    both pools at once."""
    model = cfg.extract.model.model_copy(update={"num_actors": cfg.apply.model_actors or cfg.extract.model.num_actors})
    workers = cfg.label.workers.model_copy(
        update={"num_actors": cfg.apply.label_actors or cfg.label.workers.num_actors}
    )
    return cfg.model_copy(
        update={
            "extract": cfg.extract.model_copy(update={"model": model}),
            "label": cfg.label.model_copy(update={"workers": workers}),
        }
    )


def fit_run_inputs(fit_dir: Path) -> dict[str, str | None]:
    """The folders a fit was made from, which an apply with it must not write into: the fit itself
    and the dataset of the run it belongs to (None where the fit has no run around it)."""
    run_dir = Path(fit_dir).resolve().parent.parent
    return {"--fit": str(fit_dir), f"{run_dir / 'config.yaml'}'s dataset.root": recorded_dataset_root(run_dir)}


def run_apply(cfg: RunConfig, fit_dir: Path, human_mapping: Path | None = None) -> dict:
    """Label `cfg.dataset` with the fit in `fit_dir`, its clusters mapped by `human_mapping` (a
    mapping.json from the cluster atlas) where one is given."""
    refuse_output_in_input(cfg.output_dir, "output_dir", fit_run_inputs(fit_dir))  # dataset.root: the config checks it
    refuse_limits_no_image_meets(cfg)
    cfg = with_apply_pools(cfg)
    fit = FitArtifact.load(fit_dir)
    model = model_identity(cfg)
    check_fit_matches_model(fit, model, fit_dir)
    if human_mapping is not None:
        fit = dataclasses.replace(fit, mapping=load_human_mapping(human_mapping, fit, fit_dir), mapping_kind="human")
    with OutputLock(cfg.output_dir, command_line()):
        layout = Layout(cfg.output_dir)
        records = list_dataset(cfg.dataset.kind, cfg.dataset.root, cfg.dataset.split, cfg.dataset.max_images)
        plan = apply_plan(cfg, records, model, {"plan_key": fit.meta.get("plan_key"), "content": fit.content_key()})
        # apply writes features/ and labels/ too: an output_dir holding another job's results is refused
        refuse_conflicts(
            [c for d in (layout.histograms, layout.features, layout.scores) if (c := plan_conflict(d, plan))]
        )
        if cfg.apply.write_features:
            check_plan(layout.features, plan)
        done = _label_images(cfg, layout, plan, plan_shards(records, cfg.dataset.images_per_shard), fit, fit_dir)
        summary = _write_summary(cfg, layout, done, fit, fit_dir, human_mapping)
        num_images, num_failed = summary["num_images"], summary["num_failed"]
        log.info("apply: %d images labelled, %d failed -> %s", num_images, num_failed, cfg.output_dir)
        print(json.dumps({k: summary[k] for k in ("num_images", "num_failed", "labels", "histograms")}))
        return summary


def _label_images(cfg: RunConfig, layout: Layout, plan: Plan, shards: list[dict], fit: FitArtifact, fit_dir: Path):
    """The streaming pass: read -> the model -> assign and write on the label pool -> each shard's
    finish. Returns every shard's marker."""
    fit_ref = ray.put(
        {"name": fit.meta.get("name", Path(fit_dir).name), "centroids": fit.centroids, "mapping": fit.mapping}
    )

    def build(ds: Dataset) -> Dataset:
        windows = windows_to_features(ds, cfg, extra_views=cfg.apply.write_features, stage="apply")
        return windows.map(
            guarded(PseudoLabelImages, per_row=True),
            **step_args(cfg, PseudoLabelImages),
            fn_constructor_kwargs={
                "cfg": cfg,
                "fit": fit_ref,
                "plan_key": plan.key,
                "stage_dir": str(layout.histograms),
                "labels_dir": str(layout.labels),
            },
        )

    check_schedulable(
        {"extract.read": cfg.extract.read, "extract.model": cfg.extract.model, "label.workers": cfg.label.workers},
        cfg.ray,
    )
    finish = Finisher(
        finish_apply,
        layout.histograms,
        plan.key,
        cfg=cfg,
        k=fit.k,
        features_dir=str(layout.features),
        labels_dir=str(layout.labels),
    )
    return run_image_stream("apply", layout.histograms, plan, shards, build, finish)


def _write_summary(
    cfg: RunConfig, layout: Layout, done: dict, fit: FitArtifact, fit_dir: Path, human_mapping: Path | None
) -> dict:
    """failed_items.json, the merged COCO panoptic JSON and apply_summary.json."""
    failed = write_failed_items(cfg.output_dir, done)
    panoptic_json = merge_panoptic_annotations(
        layout.histograms,
        done,
        layout.labels,
        cfg.dataset.split,
        "run the same apply command again: it redoes that shard",
    )
    summary = {
        "fit": str(fit_dir),
        "fit_meta": fit.meta,
        "mapping_kind": fit.mapping_kind,
        "k": fit.k,
        "human_mapping": None if human_mapping is None else str(human_mapping),
        "source": cfg.dataset.root,
        "num_images": sum(d["num_images"] for d in done.values()),
        "num_failed": len(failed),
        "histograms": str(layout.histograms.relative_to(cfg.output_dir)),
        "labels": str(layout.labels.relative_to(cfg.output_dir)),
        "panoptic_json": None if panoptic_json is None else str(panoptic_json.relative_to(cfg.output_dir)),
    }
    write_json_atomic(summary, cfg.output_dir / "apply_summary.json")
    return summary
