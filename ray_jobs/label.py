"""Label-and-score stage: the fits go into the object store once; a LabelScorer actor pool maps
over the image shards, writing pseudo-labels and per-shard confusion matrices."""

import ray

from actors.label_scorer import LabelScorer
from configs.schema import RunConfig
from core.fit_artifact import FitArtifact
from ray_jobs.actor_stage import run_actor_stage
from ray_jobs.fit import fit_names
from ray_jobs.layout import Layout, settings_key
from storage.datasets import ImageRecord
from storage.shards import plan_shards


def run_label(cfg: RunConfig, records: list[ImageRecord], fits: dict[str, FitArtifact]) -> dict[str, dict]:
    layout = Layout(cfg.output_dir)
    names = fit_names(cfg)
    fits_ref = ray.put([{"name": n, "centroids": fits[n].centroids, "mapping": fits[n].mapping} for n in names])
    shards = plan_shards(records, cfg.dataset.images_per_shard)
    key = settings_key(shards, [fits[n].meta["settings_key"] for n in names], cfg.label, cfg.inference)
    return run_actor_stage(
        "label", shards, LabelScorer,
        {"config": cfg.model_dump(mode="json"), "fits": fits_ref, "stage_dir": str(layout.scores),
         "labels_dir": str(layout.labels), "overlay_ids": [r.image_id for r in records[: cfg.label.num_overlays]]},
        cfg.label_workers, layout.scores, key,
    )
