"""The streaming stages on a local Ray cluster: label runs no model, and a driver that dies with
images in flight leaves their parts, which the next run uses instead of recomputing them."""

import json
import logging

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

import ray_jobs.extract
from core.models import ModelSpec, ViTSpec, build_feature_model
from ray_jobs.pipeline import Pipeline
from storage.run.markers import read_done
from storage.run.parts import staged_ids
from tests.tiny_runs import NUM_IMAGES, PATCHES_PER_IMAGE, feature_ids, scored_ids, tiny_config


def test_label_builds_no_model_even_with_several_scales(ray_cluster, demo_root, tmp_path):
    """The backbone checkpoint is deleted after extract: label and report still run, because
    label reads every scale's features from extract's Parquet instead of running the model."""
    checkpoint = tmp_path / "backbone.pth"
    torch.save(
        build_feature_model(
            ModelSpec(vit=ViTSpec(patch_size=14, embed_dim=32, depth=1, num_heads=2))
        ).backbone.state_dict(),
        checkpoint,
    )
    cfg = tiny_config(
        demo_root,
        tmp_path / "out",
        model={"backbone_checkpoint": str(checkpoint)},
        inference={"scales": [1.0, 0.75]},
        label={"sweep_pixel_stride": 2},
    )
    Pipeline(cfg).run(("extract", "fit"))
    scaled = pq.read_table(cfg.output_dir / "features" / "_scales" / "0.75")
    assert set(scaled.column("image_id").to_pylist()) == set(feature_ids(cfg.output_dir))
    assert scaled.num_rows == NUM_IMAGES * 6 * 12  # 128x256 at short side 84 -> 84x168 -> 6x12 patches
    checkpoint.unlink()
    Pipeline(cfg).run(("label", "report"))
    assert sorted(scored_ids(cfg.output_dir)) == sorted(feature_ids(cfg.output_dir))
    assert len(feature_ids(cfg.output_dir)) == NUM_IMAGES
    # the sweep's extra fit (k8) is scored on every 2nd pixel each way, the main fit and the baseline on all
    report = json.loads((cfg.output_dir / "report.json").read_text())
    assert {n: f["pixel_stride"] for n, f in report["fits"].items()} == {"k16": 1, "k8": 2, "baseline_k19": 1}
    counted = {
        n: sum(
            int(np.load(p)[f"official/clusters/{n}@fold"].sum())
            for p in (cfg.output_dir / "scores").glob("shard-*.npz")
        )
        for n in ("k16", "k8", "baseline_k19")
    }
    assert counted["k16"] == counted["baseline_k19"] and abs(counted["k8"] / counted["k16"] - 0.25) < 0.02
    assert "every 2nd" in (cfg.output_dir / "report.md").read_text()


def _failing_finish(*args, **kwargs):
    raise OSError("disk full (injected)")


def test_a_failed_finish_keeps_the_parts_and_the_rerun_uses_them(ray_cluster, demo_root, tmp_path, monkeypatch, caplog):
    cfg = tiny_config(demo_root, tmp_path / "out")
    features = cfg.output_dir / "features"
    with monkeypatch.context() as patch:
        patch.setattr(ray_jobs.extract, "finish_features", _failing_finish)
        with pytest.raises(Exception, match="disk full"):
            Pipeline(cfg).run(("extract",))
    assert read_done(features) == {}
    plan = Pipeline(cfg).plans["extract"].key
    staged = {i for s in ("shard-00000", "shard-00001", "shard-00002") for i in staged_ids(features, s, plan)}
    assert 4 <= len(staged) <= NUM_IMAGES  # at least the first shard's images were done before the stop

    with caplog.at_level(logging.INFO, logger="ray_jobs.streaming"):
        Pipeline(cfg).run(("extract",))
    assert f"{NUM_IMAGES - len(staged)} images to run" in caplog.text  # the staged images were not run again
    assert feature_ids(cfg.output_dir) == {i: PATCHES_PER_IMAGE for i in feature_ids(cfg.output_dir)}
    assert len(feature_ids(cfg.output_dir)) == NUM_IMAGES
    assert not any((features / "_parts").glob("*/*.npz"))


def test_streamed_features_equal_the_one_process_extractor(ray_cluster, demo_root, tmp_path):
    """What the stream wrote (decode and windows in one task, the model in an actor, stitching in a
    third) is what DenseFeatureExtractor computes in one process, up to float16 storage."""
    from configs.geometry import image_limits, window_spec
    from configs.specs import model_spec
    from core.inference.dense import DenseFeatureExtractor
    from storage.datasets import list_cityscapes
    from storage.features import image_grids
    from storage.images import read_rgb

    cfg = tiny_config(demo_root, tmp_path / "out")
    Pipeline(cfg).run(("extract",))
    grids = image_grids(pq.read_table(cfg.output_dir / "features"))
    dense = DenseFeatureExtractor(build_feature_model(model_spec(cfg)), window_spec(cfg))
    for record in list_cityscapes(demo_root, "val")[:3]:
        (expected,) = dense([read_rgb(record.image_path, image_limits(cfg))])
        features, hw = grids[record.image_id]
        assert hw == (128, 256) and features.shape == expected.shape
        np.testing.assert_allclose(features, expected, atol=2e-3 * np.abs(expected).max())
