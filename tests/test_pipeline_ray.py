"""The whole job on a tiny generated demo set with a local Ray cluster (num_cpus=2)."""

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from configs.schema import parse_config
from core.errors import UserError
from core.inference.dense import DenseFeatureExtractor
from core.inference.windows import WindowSpec
from core.models import ModelSpec, ViTSpec, build_feature_model
from ray_jobs.pipeline import Pipeline
from storage.images import ImageLimits, read_rgb
from tests.official import official_panoptic, official_pixel_level
from tests.tiny_runs import NUM_IMAGES


def tiny_config(data_root, output_dir, **fit):
    """protocol=cause: the official pipeline, plus the baseline scored on CAUSE's centre crops."""
    return parse_config(
        {
            "run_name": "tiny",
            "output_dir": str(output_dir),
            "seed": 0,
            "protocol": "cause",
            "dataset": {"kind": "cityscapes", "root": str(data_root), "split": "val", "images_per_shard": 4},
            "model": {
                "vit": {"patch_size": 14, "embed_dim": 32, "depth": 1, "num_heads": 2},
                "feature_kind": "backbone",
            },
            "inference": {"short_side": 112, "crop": 112, "stride": 56, "batch_size": 8, "scales": [1.0, 0.75]},
            "extract": {
                "read": {"num_cpus": 0.25},
                "model": {"num_actors": 2, "cpus_per_actor": 0.5, "batch_images": 3},
                "write": {"num_cpus": 0.25},
            },
            "label": {
                "num_overlays": 2,
                "read": {"num_cpus": 0.25},
                "workers": {"num_actors": 2, "cpus_per_actor": 0.5},
            },
            "refine": {"em_semantic": True, "em_things": True, "superpixels": True, "superpixel_step": 8},
            "fit": {
                "k": 24,
                "k_sweep": [8, 24],
                "n_iter": 10,
                "max_patches_per_image": 64,
                "lloyd_iterations": 2,
                **fit,
            },
            "report": {"sensitivity": True},
            "ray": {"local_num_cpus": 2},
        }
    )


@pytest.fixture(scope="module")
def first_run(ray_cluster, demo_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    cfg = tiny_config(demo_root, out)
    Pipeline(cfg).run()
    return cfg


def test_report_has_every_fit_with_sane_metrics(first_run):
    report = json.loads((first_run.output_dir / "report.json").read_text())
    assert list(report["fits"]) == ["k24", "k8", "baseline_k19"]
    assert report["dataset"]["num_images"] == NUM_IMAGES and report["dataset"]["num_failed"] == 0
    for fit in report["fits"].values():
        for level in ("patch_level", "pixel_level"):
            assert 0.0 < fit[level]["same_set"]["miou"] < 1.0
    for name in ("k24", "k8"):
        protocols = report["fits"][name]["pixel_level"]
        assert set(protocols) == {"same_set", "held_out", "label_free", "few_shot"}
        # a look at 27 patches per cluster is nearer the held-out majority than one look
        few = protocols["few_shot"]
        assert (
            abs(few["27"]["miou_mean"] - protocols["held_out"]["miou"])
            <= abs(few["1"]["miou_mean"] - protocols["held_out"]["miou"]) + 0.02
        )
        # The same-set mapping saw the scored images: it cannot lose to the pooled held-out one by much.
        assert protocols["held_out"]["miou"] <= protocols["same_set"]["miou"] + 0.05
        assert 0 <= fit["dead_centroids"] < fit["k"]
    assert report["fits"]["baseline_k19"]["mapping_kind"] == "hungarian"
    # k-means fits were refined by distributed Lloyd passes over every patch
    meta = json.loads((first_run.output_dir / "fits" / "k24" / "meta.json").read_text())["meta"]
    assert 1 <= len(meta["lloyd_history"]) <= 2 and meta["lloyd_history"][0]["rows"] == NUM_IMAGES * 8 * 16
    assert "RANDOMLY INITIALISED" in report["model"]
    assert (first_run.output_dir / "report.md").read_text().startswith("# Overclustering report")
    for figure in ("miou_vs_k", "confusion", "per_class_iou", "overlays", "few_shot"):
        assert (first_run.output_dir / report["figures"][figure]).stat().st_size > 0
    assert list(report["variants"]) == [
        "plain",
        "single_scale",
        "em_semantic",
        "em_things",
        "superpixels",
        "baseline_k19",
    ]
    for variant in report["variants"].values():
        assert 0.0 < variant["panoptic"]["all"]["pq"] < 1.0 and variant["seconds_per_image"] > 0
    # the plain variant is the main fit's labels: same pixels, same confusion as its same-set protocol
    assert report["variants"]["plain"]["semantic"] == report["fits"]["k24"]["pixel_level"]["same_set"]


def test_every_image_extracted_and_labelled_exactly_once(first_run):
    table = pq.read_table(first_run.output_dir / "features")
    ids = table.column("image_id").to_numpy(zero_copy_only=False)
    uniq, counts = np.unique(ids, return_counts=True)
    assert len(uniq) == NUM_IMAGES and set(counts) == {8 * 16}  # 112x224 -> 8x16 patches each
    for kind in ("trainIds", "labelIds", "instanceIds"):
        assert len(list(first_run.output_dir.glob(f"labels/{kind}/*/*_{kind}.png"))) == NUM_IMAGES
    assert len(list(first_run.output_dir.glob("labels/panoptic/cityscapes_panoptic_val/*_panoptic.png"))) == NUM_IMAGES
    panoptic = json.loads((first_run.output_dir / "labels/panoptic/cityscapes_panoptic_val.json").read_text())
    assert len(panoptic["annotations"]) == NUM_IMAGES
    assert len(list(first_run.output_dir.glob("labels/overlays/*/*_overlay.png"))) == 2


def test_official_evaluators_agree_with_the_report(first_run, demo_root, tmp_path):
    report = json.loads((first_run.output_dir / "report.json").read_text())
    plain = report["variants"]["plain"]
    pixel = official_pixel_level(demo_root / "gtFine", "val", first_run.output_dir / "labels" / "labelIds")
    assert abs(100 * plain["semantic"]["miou"] - 100 * pixel["averageScoreClasses"]) < 0.1
    panoptic, _ = official_panoptic(
        demo_root / "gtFine",
        "val",
        first_run.output_dir / "labels" / "panoptic" / "cityscapes_panoptic_val.json",
        tmp_path,
    )
    for ours, theirs in (("all", "All"), ("stuff", "Stuff"), ("things", "Things")):
        for metric in ("pq", "sq", "rq"):
            assert abs(100 * plain["panoptic"][ours][metric] - 100 * panoptic[theirs][metric]) < 0.1, (ours, metric)


def test_rerun_skips_done_shards_and_gives_identical_results(first_run):
    before = json.loads((first_run.output_dir / "report.json").read_text())
    markers = {p: p.stat().st_mtime_ns for p in first_run.output_dir.glob("*/_done/*.json")}
    Pipeline(first_run).run()
    after = json.loads((first_run.output_dir / "report.json").read_text())
    assert {p: p.stat().st_mtime_ns for p in markers} == markers
    assert after["fits"] == before["fits"]


def test_the_sensitivity_table_scores_the_same_fits_every_way(first_run):
    report = json.loads((first_run.output_dir / "report.json").read_text())
    sensitivity = report["protocol_sensitivity"]
    assert sensitivity["protocol"] == "cause" and list(sensitivity["fits"]) == list(report["fits"])
    main = sensitivity["fits"]["k24"]
    assert list(main) == ["full/official", "full/paper", "resized/official", "resized/paper"]
    # this run's own row is its labels under the official evaluator: the numbers of the variants table
    assert main["full/official"]["miou"] == report["variants"]["plain"]["semantic"]["miou"]
    assert main["full/official"]["panoptic"]["pq"] == report["variants"]["plain"]["panoptic"]["all"]["pq"]
    # the paper's evaluator scores the same labels differently (no void or crowd rules, 64 px stuff)
    assert main["full/paper"]["panoptic"]["pq"] != main["full/official"]["panoptic"]["pq"]
    assert "## Protocol sensitivity" in (first_run.output_dir / "report.md").read_text()
    # the cause protocol adds the baseline on CAUSE's crops, 27 classes, without and with its CRF
    baseline = sensitivity["fits"]["baseline_k19"]
    assert list(baseline)[-2:] == ["crop/cause", "crop+crf/cause"] and "crop/cause" not in main
    assert 0 < baseline["crop/cause"]["miou"] < 1 and len(baseline["crop/cause"]["per_class_iou"]) == 27
    assert baseline["crop+crf/cause"]["miou"] != baseline["crop/cause"]["miou"]
    assert len(list((first_run.output_dir / "features" / "_cause").glob("shard-*.parquet"))) == 3


def test_paper_protocol_runs_the_papers_steps_and_refuses_a_switch_of_protocol(ray_cluster, demo_root, tmp_path):
    data = tiny_config(demo_root, tmp_path / "out", lloyd_iterations=0).model_dump(mode="json") | {
        "protocol": "official"
    }
    data["inference"]["scales"] = [
        0.75,
        1.0,
        1.5,
    ]  # the fits at 1.0; the baseline also by the paper's multi-scale scheme
    data["label"]["sweep_pixel_stride"] = 2  # the sweep's k8: resized labels subsampled, full-size ones at the stride
    data["refine"]["crf"] = True  # the paper's CRF rows, of the main fit and of the baseline
    cfg = parse_config({**data, "protocol": "paper"})
    Pipeline(cfg).run()
    report = json.loads((cfg.output_dir / "report.json").read_text())
    assert report["protocol"] == "paper"
    main = report["protocol_sensitivity"]["fits"]["k24"]
    # its labels are made at the resized size from the windows, so they are the resized rows
    assert main["resized/official"]["miou"] == report["variants"]["plain"]["semantic"]["miou"]
    assert main["resized/official"]["miou"] != main["full/official"]["miou"]
    windows = sorted((cfg.output_dir / "features" / "_windows").glob("shard-*.parquet"))
    # 4 images, windows of 8x8 patches: 3 at 1.0 (112x224), 2 at 0.75 (112x168), 10 at 1.5 (168x336)
    assert len(windows) == 3 and pq.read_table(windows[0]).num_rows == 4 * 8 * (3 + 2 + 10) * 8
    marker = json.loads((cfg.output_dir / "features" / "_done" / "shard-00000.json").read_text())
    assert "features/_windows/shard-00000.parquet" in marker["outputs"]
    meta = json.loads((cfg.output_dir / "fits" / "k24" / "meta.json").read_text())["meta"]
    assert meta["protocol"] == "paper" and "MiniBatchKMeans" in meta["engine"]
    assert "**resized, NEAREST up** | **paper**" in (cfg.output_dir / "report.md").read_text()
    # the paper's patch-level mIoU: all 19 classes, an absent one 0; the k sweep says so under its table
    assert report["fits"]["k24"]["patch_level"]["same_set"]["miou_rule"] == "all"
    assert (
        "*patch mIoU*: mean over all 19 classes, an absent class counting 0 (the paper's rule)."
        in (cfg.output_dir / "report.md").read_text()
    )
    k8 = report["protocol_sensitivity"]["fits"]["k8"]
    assert (
        k8["full/official"]["pixel_stride"] == 2 and k8["full/official"]["panoptic"] is None and "full/paper" not in k8
    )
    assert k8["resized/paper"]["panoptic"]["pq"] is not None
    # the baseline as the paper's CAUSE script labels it: one scale and multi-scale, each without and with its CRF
    baseline = report["protocol_sensitivity"]["fits"]["baseline_k19"]
    extra = [
        f"{labels}/{evaluator}"
        for labels in ("windows", "windows+crf", "multiscale", "multiscale+crf")
        for evaluator in ("official", "paper")
    ]
    assert list(baseline)[-8:] == extra
    assert len({baseline[key]["miou"] for key in extra[::2]}) == 4 and all(
        baseline[key]["panoptic"]["pq"] > 0 for key in extra
    )
    assert all(
        baseline[f"{key}/paper"]["panoptic"]["pq"] != baseline[f"{key}/official"]["panoptic"]["pq"]
        for key in ("windows", "multiscale+crf")
    )
    assert "paper's CAUSE script, multi-scale + its CRF" in (cfg.output_dir / "report.md").read_text()
    with pytest.raises(UserError, match='protocol: "paper" -> "official"'):
        Pipeline(parse_config({**data, "protocol": "official"})).run()


def test_head_and_backbone_features_are_fitted_in_one_run_and_compared(ray_cluster, demo_root, tmp_path):
    """model.compare_backbone: extract stores the backbone's tokens beside the head's features (the
    same as a backbone model's), fit fits both alike, the report compares them."""
    data = tiny_config(demo_root, tmp_path / "out", lloyd_iterations=0).model_dump(mode="json") | {
        "protocol": "official"
    }
    data["model"] |= {"feature_kind": "head", "compare_backbone": True}
    data["inference"] |= {"short_side": 322, "crop": 322, "stride": 161, "scales": [1.0]}
    data["refine"] = {}
    cfg = parse_config(data)
    Pipeline(cfg).run()
    report = json.loads((cfg.output_dir / "report.json").read_text())
    comparison = report["backbone_comparison"]
    assert comparison["head"]["patch_level"] == report["fits"]["k24"]["patch_level"]
    assert (comparison["head"]["feature_dim"], comparison["backbone"]["feature_dim"]) == (90, 32)
    assert 0 < comparison["backbone"]["patch_level"]["same_set"]["miou"] < 1
    text = (cfg.output_dir / "report.md").read_text()
    assert "## Head vs backbone features (patch level, k = 24)" in text
    assert (
        text.count("*patch mIoU*: mean over the classes present in ground truth or prediction.") == 2
    )  # sweep, backbone
    table = pq.read_table(cfg.output_dir / "features" / "_backbone" / "shard-00000.parquet")
    head = pq.read_table(cfg.output_dir / "features" / "shard-00000.parquet")
    assert table.column("image_id").to_pylist() == head.column("image_id").to_pylist()
    assert table.column("label").to_pylist() == head.column("label").to_pylist()
    # the stored tokens are what a backbone model with the same seeded weights extracts
    model = build_feature_model(ModelSpec(vit=ViTSpec(patch_size=14, embed_dim=32, depth=1, num_heads=2)))
    first = sorted(demo_root.glob("leftImg8bit/val/*/*.png"))[0]
    image = read_rgb(first, ImageLimits(max_pixels=10**8, max_aspect_ratio=16))
    (expected,) = DenseFeatureExtractor(model, WindowSpec(short_side=322, crop=322, stride=161))([image])
    stored = np.stack(table.column("feature").to_numpy(zero_copy_only=False)[: 23 * 46])
    np.testing.assert_allclose(stored, expected.reshape(32, -1).T, atol=2e-2)
