"""Extract stage: Ray Data maps a FeatureExtractor actor pool over the image shards."""

from actors.feature_extractor import FeatureExtractor
from configs.schema import RunConfig
from ray_jobs.actor_stage import run_actor_stage
from ray_jobs.layout import Layout, settings_key
from storage.datasets import ImageRecord
from storage.shards import plan_shards


def run_extract(cfg: RunConfig, records: list[ImageRecord]) -> dict[str, dict]:
    layout = Layout(cfg.output_dir)
    shards = plan_shards(records, cfg.dataset.images_per_shard)
    key = settings_key(shards, cfg.model, cfg.inference)
    return run_actor_stage(
        "extract", shards, FeatureExtractor,
        {"config": cfg.model_dump(mode="json"), "stage_dir": str(layout.features)},
        cfg.extract, layout.features, key,
    )
