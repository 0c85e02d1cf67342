"""Label-and-score stage: read the features extract wrote (no model) -> label and score every
image on an actor pool; the fits go into the object store once."""

import ray
from ray.data import Dataset

from actors.feature_reader import image_features
from actors.label import LabelImages, finish_scores
from configs.schema import RunConfig
from core.fit_artifact import FitArtifact
from ray_jobs.fit import fit_names
from ray_jobs.layout import Layout, settings_key
from ray_jobs.streaming import actor_args, finisher, guarded, run_image_stream, task_args
from storage.datasets import ImageRecord
from storage.shards import plan_shards, read_done, restrict_shards


def run_label(cfg: RunConfig, records: list[ImageRecord], fits: dict[str, FitArtifact]) -> dict[str, dict]:
    layout = Layout(cfg.output_dir)
    names = fit_names(cfg)
    fits_ref = ray.put([{"name": n, "centroids": fits[n].centroids, "mapping": fits[n].mapping} for n in names])
    config = cfg.model_dump(mode="json")
    # The same shards as extract, each with the images extract wrote features for.
    extracted = {i for marker in read_done(layout.features).values() for i in marker["image_ids"]}
    shards = restrict_shards(plan_shards(records, cfg.dataset.images_per_shard), extracted)

    def build(ds: Dataset) -> Dataset:
        ds = ds.flat_map(image_features, fn_kwargs={"config": config, "features_dir": str(layout.features)},
                         **task_args(cfg.label.read))
        return ds.map(guarded(LabelImages, per_row=True), **actor_args(cfg.label.workers), fn_constructor_kwargs={
            "config": config, "fits": fits_ref, "stage_dir": str(layout.scores), "labels_dir": str(layout.labels),
            "overlay_ids": [r.image_id for r in records[: cfg.label.num_overlays]]})

    labelling = cfg.label.model_dump(mode="json", exclude={"read", "workers"})  # how many workers changes no result
    key = settings_key(shards, [fits[n].meta["settings_key"] for n in names], labelling, cfg.inference, cfg.refine,
                       cfg.panoptic)
    return run_image_stream("label", layout.scores, key, shards, build,
                            finisher(finish_scores, layout.scores, config=config, fits=fits_ref))
