"""Extract stage: decode and cut windows on CPU -> the model on a model-only actor pool -> stitch,
patch labels and write on CPU, streamed image by image."""

from ray.data import Dataset

from actors.extract import finish_features, image_windows, write_features
from actors.window_features import WindowFeatures
from configs.schema import RunConfig
from ray_jobs.streaming import Finisher, guarded, run_image_stream, step_args
from storage.datasets import ImageRecord
from storage.run.layout import Layout
from storage.run.plans import Plan
from storage.run.shards import plan_shards


def windows_to_features(
    ds: Dataset,
    cfg: RunConfig,
    model_actor=WindowFeatures,
    backbone: bool = False,
    extra_views: bool = True,
    stage: str = "extract",
) -> Dataset:
    """shard rows -> image rows with the model's window features (extract and apply share it;
    the benchmark swaps in a stand-in `model_actor`); backbone: also the backbone's (model.compare_backbone);
    extra_views: also the protocol's other windows (the paper baseline's, CAUSE's crop), which apply skips;
    stage: the stage whose images these are, in what a failure logs."""
    ds = ds.flat_map(
        image_windows,
        fn_kwargs={"cfg": cfg, "extra_views": extra_views, "stage": stage},
        **step_args(cfg, image_windows),
    )
    flags = ({"backbone": True} if backbone else {}) | ({} if extra_views else {"extra_views": False})
    # Rows are images: the model actor gets the windows of batch_images images per call.
    return ds.map_batches(
        guarded(model_actor, per_row=False),
        batch_size=cfg.extract.model.batch_images,
        batch_format="numpy",
        fn_constructor_kwargs={"cfg": cfg, **flags},
        **step_args(cfg, model_actor),
    )


def run_extract(cfg: RunConfig, records: list[ImageRecord], plan: Plan, model_actor=WindowFeatures) -> dict[str, dict]:
    layout = Layout(cfg.output_dir)
    shards = plan_shards(records, cfg.dataset.images_per_shard)

    def build(ds: Dataset) -> Dataset:
        ds = windows_to_features(ds, cfg, model_actor, backbone=cfg.model.compare_backbone)
        return ds.map(
            write_features,
            fn_kwargs={"cfg": cfg, "stage_dir": str(layout.features), "plan_key": plan.key},
            **step_args(cfg, write_features),
        )

    return run_image_stream(
        "extract", layout.features, plan, shards, build, Finisher(finish_features, layout.features, plan.key, cfg=cfg)
    )
