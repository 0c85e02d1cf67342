"""Fit on a large unlabelled feature set, map on a small labelled one, then label the big set:
with a local Ray cluster, on generated frames without ground truth beside the tiny demo set."""

import json

import pytest

from core.clustering.fit_artifact import FitArtifact
from ray_jobs.apply import run_apply
from ray_jobs.pipeline import Pipeline
from storage.run.feature_sets import FeatureSetError, open_feature_set
from storage.run.plans import model_identity
from storage.synth import generate_unlabelled_frames
from tests.tiny_runs import tiny_config

NUM_FRAMES = 6
LABELLED = {"max_images": 6}  # of the tiny demo set: the small labelled set


@pytest.fixture(scope="module")
def frames(ray_cluster, tmp_path_factory):
    """The frames' folder and a run that extracted their features (no ground truth: all patches unlabelled)."""
    root = tmp_path_factory.mktemp("frames")
    generate_unlabelled_frames(root, num_images=NUM_FRAMES, height=128, width=256, seed=3, frames_per_drive=4)
    out = tmp_path_factory.mktemp("frames_run")
    Pipeline(frames_config(root, out)).run(("extract",))
    return root, out


def frames_config(root, out, **fit):
    return tiny_config(root, out, dataset={"kind": "folder", "root": str(root), "images_per_shard": 4}, fit=fit)


def test_fit_on_the_frames_map_on_the_labelled_set_and_label_the_frames(frames, demo_root, tmp_path):
    root, frames_run = frames
    cfg = tiny_config(demo_root, tmp_path / "labelled", dataset=LABELLED, fit={"features": [{"path": str(frames_run)}]})
    Pipeline(cfg).run(("extract", "fit"))
    fit = FitArtifact.load(tmp_path / "labelled" / "fits" / "k16")
    (fitted,) = fit.meta["fitted_on"]
    expected = open_feature_set(str(frames_run), model_identity(cfg), "test")
    assert fitted["features"] == str(frames_run) and fitted["content_key"] == expected.content_key
    assert (
        fitted["num_patches"] == NUM_FRAMES * 8 * 16
        and fit.meta["n_samples"] == fitted["sampled_rows"] == NUM_FRAMES * 64
    )
    assert fit.meta["mapped_on"]["features"] == "this run" and fit.meta["mapped_on"]["labelled_patches"] > 0

    # label and report check the fits against what they recorded of the frames, not the frames
    # themselves (a large set may have moved on); fit checks them again
    shard = frames_run / "features" / "shard-00001.parquet"
    shard.rename(shard.with_suffix(".away"))
    try:
        Pipeline(cfg).run(("label", "report"))
        report = (tmp_path / "labelled" / "report.md").read_text()
        assert f"**Fitted on:** {frames_run} ({NUM_FRAMES * 64} sampled patches" in report
        with pytest.raises(FeatureSetError, match="shard-00001.parquet is missing"):
            Pipeline(cfg).run(("fit",))
    finally:
        shard.with_suffix(".away").rename(shard)

    summary = run_apply(frames_config(root, tmp_path / "applied"), tmp_path / "labelled" / "fits" / "k16")
    assert summary["num_images"] == NUM_FRAMES and summary["num_failed"] == 0
    assert len(list((tmp_path / "applied" / "labels").rglob("*_trainIds.png"))) == NUM_FRAMES
    assert summary["fit_meta"]["fitted_on"] == fit.meta["fitted_on"]


def test_the_frames_run_fits_itself_and_maps_on_the_labelled_run(frames, demo_root, tmp_path):
    root, frames_run = frames
    labelled = tiny_config(demo_root, tmp_path / "labelled", dataset=LABELLED)
    Pipeline(labelled).run(("extract",))
    with pytest.raises(
        FeatureSetError, match="have no ground truth, so no cluster can be mapped to a class. Map on a labelled"
    ):
        Pipeline(frames_config(root, frames_run, heldout_folds=1)).run(("fit",))
    # a mapping set made by another model is refused before anything is fitted
    other = tiny_config(demo_root, tmp_path / "other", dataset=LABELLED, model={"init_seed": 9})
    Pipeline(other).run(("extract",))
    with pytest.raises(FeatureSetError, match="made by another model"):
        Pipeline(frames_config(root, frames_run, mapping_from=str(tmp_path / "other"), heldout_folds=1)).run(("fit",))
    # the failed fits left no plan behind: the corrected settings go ahead in the same output_dir
    cfg = frames_config(root, frames_run, mapping_from=str(tmp_path / "labelled"), heldout_folds=1)
    Pipeline(cfg).run(("fit",))
    meta = json.loads((frames_run / "fits" / "k16" / "meta.json").read_text())["meta"]
    assert meta["fitted_on"][0]["features"] == "this run" and meta["mapped_on"]["features"] == str(
        tmp_path / "labelled"
    )

    # the frames have no ground truth: the report says nothing was scored, rather than scores of nothing
    Pipeline(cfg).run(("label", "report"))
    report = json.loads((frames_run / "report.json").read_text())
    assert report["dataset"]["num_images"] == NUM_FRAMES
    assert report["dataset"]["num_with_ground_truth"] == report["dataset"]["scored_pixels"] == 0
    assert report["figures"] == {}
    text = (frames_run / "report.md").read_text()
    assert (
        f"{NUM_FRAMES} images labelled, 0 failed (listed in `failed_items.json`); 0 of {NUM_FRAMES} have ground "
        "truth: nothing was scored"
    ) in text
    assert f"Not measured: none of the {NUM_FRAMES} images labelled here has ground truth" in text
    assert "patch-level numbers are that set's own patches" in text and "a cross-set score" not in text
    assert "| fit | fitted by | mapping | k | patch mIoU | dead centroids |" in text
    for unmeasured in (
        "images scored",
        "Baseline misses",
        "recovers",
        "pixel mIoU",
        "## Protocol sensitivity",
        "## Absorption",
        "## Figures",
        "PQ",
    ):
        assert unmeasured not in text, unmeasured
    # run again: every stage finds its work done, and the report says so instead of a time
    Pipeline(cfg).run()
    timing = json.loads((frames_run / "timing.json").read_text())
    assert [timing[s]["did_work"] for s in ("extract", "fit", "label", "atlas")] == [False] * 4
    assert timing["atlas"]["skipped"] == "atlas.enabled is false"
    assert (
        "**Wall time** (each stage's last run): extract skipped (done in an earlier run), fit skipped (done in an "
        "earlier run), label skipped (done in an earlier run)\n" in (frames_run / "report.md").read_text()
    )
