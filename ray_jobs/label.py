"""Label stage: read the features extract wrote (no model) -> label every image on an actor pool
(the fits go into the object store once) -> score its label maps with the run's evaluators in CPU
tasks beside it -> per shard, the scores npz."""

import hashlib

import numpy as np
import ray
from ray.data import Dataset

from actors.feature_reader import image_features
from actors.label import LabelImages
from actors.score import finish_scores, score_image
from configs.schema import RunConfig
from configs.specs import evaluation_spec
from core.clustering.fit_artifact import FitArtifact
from core.labelling.image import label_fits
from ray_jobs.streaming import Finisher, guarded, run_image_stream, step_args
from storage.datasets import ImageRecord
from storage.run.fits import fit_pixel_stride
from storage.run.layout import Layout, settings_key
from storage.run.markers import content_key
from storage.run.plans import Plan
from storage.run.shards import plan_shards, restrict_shards


def label_inputs(features: dict[str, dict], fits: dict[str, FitArtifact], human: np.ndarray | None = None) -> str:
    """What the label stage is made from: the features' and the fits' content, and the human
    mapping of the main fit where there is one (`label.human_mapping`)."""
    keys = [content_key(features), {n: f.content_key() for n, f in sorted(fits.items())}]
    if human is not None:
        keys.append(hashlib.sha256(np.asarray(human, np.int64).tobytes()).hexdigest()[:16])
    return settings_key(*keys)


def label_shards(cfg: RunConfig, records: list[ImageRecord], features: dict[str, dict]) -> list[dict]:
    """The same shards as extract, each with the images extract wrote features for."""
    extracted = {i for marker in features.values() for i in marker["image_ids"]}
    return restrict_shards(plan_shards(records, cfg.dataset.images_per_shard), extracted)


def run_label(
    cfg: RunConfig,
    records: list[ImageRecord],
    plan: Plan,
    features: dict[str, dict],
    fits: dict[str, FitArtifact],
    human: np.ndarray | None = None,
) -> dict[str, dict]:
    """`features`: the complete extract stage's markers; `fits`: the fit stage's and the imported ones, in
    their order (`require_fits`);
    `human`: a person's mapping of the main fit, which its written labels then use."""
    layout = Layout(cfg.output_dir)
    broadcast = broadcast_fits(cfg, fits, human)
    fits_ref = ray.put(broadcast)
    shards = label_shards(cfg, records, features)
    spec = evaluation_spec(cfg, label_fits(broadcast))

    def build(ds: Dataset) -> Dataset:
        ds = ds.flat_map(
            image_features,
            fn_kwargs={"cfg": cfg, "features_dir": str(layout.features)},
            **step_args(cfg, image_features),
        )
        ds = ds.map(
            guarded(LabelImages, per_row=True),
            **step_args(cfg, LabelImages),
            fn_constructor_kwargs={
                "cfg": cfg,
                "fits": fits_ref,
                "labels_dir": str(layout.labels),
                "overlay_ids": [r.image_id for r in records[: cfg.label.num_overlays]],
            },
        )
        return ds.map(
            score_image,
            fn_kwargs={
                "spec": spec,
                "stage_dir": str(layout.scores),
                "plan_key": plan.key,
                "labels_dir": str(layout.labels),
                "split": cfg.dataset.split,
            },
            **step_args(cfg, score_image),
        )

    return run_image_stream(
        "label",
        layout.scores,
        plan,
        shards,
        build,
        Finisher(
            finish_scores,
            layout.scores,
            plan.key,
            num_folds=cfg.fit.heldout_folds,
            labels_dir=str(layout.labels),
            split=cfg.dataset.split,
            write_label_pngs=cfg.label.write_label_pngs,
        ),
        inputs=label_inputs(features, fits, human),
    )


def broadcast_fits(cfg: RunConfig, fits: dict[str, FitArtifact], human: np.ndarray | None = None) -> list[dict]:
    """What the label step gets of each fit, in `require_fits`' order (main, sweep, imported, baseline):
    centroids, mapping (the main fit's by `human` where given), pixel stride, class prototypes."""
    names = list(fits)
    mappings = {n: fits[n].mapping for n in names} | ({} if human is None else {names[0]: human})
    return [
        {
            "name": n,
            "centroids": fits[n].centroids,
            "mapping": mappings[n],
            "stride": fit_pixel_stride(cfg, n),
            "prototypes": fits[n].extra_arrays.get("class_prototypes"),
        }
        for n in names
    ]
