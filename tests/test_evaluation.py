"""The evaluator contract (core/evaluation): per-image counts that add up the same way however
images are sharded, one scoring per distinct label map, and labelling that makes only what a run asks."""

import json
import shutil

import numpy as np
import pytest
from scipy import ndimage

from configs.schema import ConfigError
from core.evaluation.base import FOLD_SUFFIX, ImageToScore, PanopticRules, Segmenter, add_images, add_totals
from core.evaluation.metrics import confusion_matrix
from core.evaluation.official import OfficialEvaluator
from core.evaluation.paper import PaperEvaluator
from core.evaluation.pq import pq_stats
from core.image_ops import connected_components
from core.labelling.image import ImageLabeller, LabelFit, LabelRequest
from core.labelling.maps import ImageLabels, LabelMap
from core.labelling.variants import RefineSettings
from core.panoptic import _compact, gt_panoptic, panoptic_from_train_ids
from ray_jobs.pipeline import Pipeline
from storage.images import GroundTruth
from tests.tiny_runs import copy_run, report_metrics, tiny_config

RNG = np.random.default_rng(0)


def blobs(h=48, w=64, classes=19, seed=0) -> np.ndarray:
    """(h, w) uint8 trainIds of smooth random regions, some 255."""
    rng = np.random.default_rng(seed)
    field = ndimage.gaussian_filter(rng.random((classes, h, w)), (0, 2, 2))
    labels = field.argmax(0).astype(np.uint8)
    labels[rng.random((h, w)) < 0.02] = 255
    return labels


def truth_of(train_ids: np.ndarray) -> GroundTruth:
    label_of = np.array([7, 8, 11, 12, 13, 17, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 31, 32, 33], np.uint8)
    label_ids = np.where(train_ids < 19, label_of[np.minimum(train_ids, 18)], 0).astype(np.uint8)
    instance_ids = label_ids.astype(np.int32)
    things = label_ids >= 24
    instance_ids[things] = label_ids[things].astype(np.int32) * 1000 + 1
    return GroundTruth(label_ids, train_ids, instance_ids, gt_panoptic(instance_ids, label_ids))


def image_to_score(targets, truth, fold=0, clusters=None, counter=None):
    segmenter = Segmenter(PanopticRules(8, 8, 8))
    if counter is not None:
        inner = segmenter.__call__

        class Counting:
            def __call__(self, labels):
                counter.append(id(labels)) if id(labels) not in counter else None
                return inner(labels)

        segmenter = Counting()
    return ImageToScore(
        targets=targets, clusters=clusters or {}, cluster_counts={}, crops={}, truth=truth, fold=fold, segment=segmenter
    )


def test_official_evaluator_counts_what_the_metrics_count():
    gt, pred = blobs(seed=1), blobs(seed=2)
    truth = truth_of(gt)
    counts = OfficialEvaluator().process(image_to_score({"variant/plain": LabelMap(pred)}, truth))
    np.testing.assert_array_equal(counts["official/confusion/variant/plain"], confusion_matrix(gt, pred, 19))
    expected_pq = pq_stats(truth.panoptic, panoptic_from_train_ids(pred, None, 8, 8, 8))
    np.testing.assert_array_equal(counts["official/pq/variant/plain"], expected_pq)


def test_a_label_map_shared_by_two_targets_is_segmented_and_scored_once():
    gt, pred = blobs(seed=3), blobs(seed=4)
    shared = LabelMap(pred)
    targets = {"variant/plain": shared, "fit/k9/full": shared, "variant/other": LabelMap(pred.copy())}
    segmented = []
    image = image_to_score(targets, truth_of(gt), counter=segmented)
    counts = OfficialEvaluator().process(image) | PaperEvaluator().process(image)
    assert len(segmented) == 2  # the shared map once, its copy (another object) once
    for evaluator in ("official", "paper"):
        for kind in ("confusion", "pq"):
            np.testing.assert_array_equal(
                counts[f"{evaluator}/{kind}/variant/plain"], counts[f"{evaluator}/{kind}/fit/k9/full"]
            )


def test_a_strided_target_gets_a_confusion_on_its_pixels_and_no_segments():
    gt = blobs(seed=5)
    pred = blobs(seed=6)[1::3, 1::3]  # core.labelling.assign.subsample at stride 3 keeps pixels 1, 4, ...
    counts = OfficialEvaluator().process(image_to_score({"fit/k50/full": LabelMap(pred, stride=3)}, truth_of(gt)))
    np.testing.assert_array_equal(counts["official/confusion/fit/k50/full"], confusion_matrix(gt[1::3, 1::3], pred, 19))
    assert "official/pq/fit/k50/full" not in counts
    assert PaperEvaluator().process(image_to_score({"fit/k50/full": LabelMap(pred, stride=3)}, truth_of(gt))) == {}


def test_an_image_without_ground_truth_gives_zeros_of_the_same_shapes():
    targets = {"variant/plain": LabelMap(blobs(seed=7))}
    with_truth = OfficialEvaluator().process(image_to_score(targets, truth_of(blobs(seed=8))))
    without = OfficialEvaluator().process(image_to_score(targets, None))
    assert {k: v.shape for k, v in with_truth.items()} == {k: v.shape for k, v in without.items()}
    assert all(not v.any() for v in without.values())


def test_counts_add_up_the_same_however_images_are_sharded():
    images = [
        {
            "a/ints": RNG.integers(0, 9, (3, 4)),
            f"a/clusters{FOLD_SUFFIX}": RNG.integers(0, 9, (5, 2)),
            "a/pq": RNG.random((19, 4)),
        }
        for _ in range(7)
    ]
    ids, folds = [f"img{i}" for i in range(7)], [0, 2, 1, 0, 2, 2, 1]
    one = add_totals([(ids, add_images(images, folds, 3))])
    order = [5, 1, 6, 0, 3, 2, 4]
    split = [[order[0], order[1], order[2]], [order[3]], [order[4], order[5], order[6]]]
    many = add_totals(
        [([ids[i] for i in s], add_images([images[i] for i in s], [folds[i] for i in s], 3)) for s in split]
    )
    assert one.keys() == many.keys()
    for name in one:
        np.testing.assert_array_equal(one[name], many[name])  # floats too, bit for bit: summed in image-id order
    assert one[f"a/clusters{FOLD_SUFFIX}"].shape == (3, 5, 2)
    np.testing.assert_array_equal(
        one[f"a/clusters{FOLD_SUFFIX}"][2], sum(images[i][f"a/clusters{FOLD_SUFFIX}"] for i in (1, 4, 5))
    )
    assert add_totals([([], {}), (ids, add_images(images, folds, 3))]).keys() == one.keys()  # a shard of failed images


def test_without_sensitivity_the_labeller_makes_no_other_labelling():
    rng = np.random.default_rng(1)
    grid = rng.normal(size=(5, 8, 16)).astype(np.float32)
    fits = [
        LabelFit(name, c / np.linalg.norm(c, axis=1, keepdims=True), rng.integers(0, 19, len(c)))
        for name, c in (("k9", rng.normal(size=(9, 5))), ("baseline_k4", rng.normal(size=(4, 5))))
    ]

    class NoResized(ImageLabeller):
        def _resized_maps(self, *args, **kwargs):
            raise AssertionError("the resized labelling was made though nothing asked for it")

    labels = NoResized(fits, ["plain"], RefineSettings(), request=LabelRequest(baseline=True)).label(
        [(grid, (112, 224))], 14, (128, 256)
    )
    assert set(labels.targets) == {"variant/plain", "variant/baseline_k4"} and set(labels.clusters) == {
        "k9",
        "baseline_k4",
    }
    both = ImageLabeller(
        fits, ["plain"], RefineSettings(), request=LabelRequest(baseline=True, both_labellings=True)
    ).label([(grid, (112, 224))], 14, (128, 256))
    assert {"fit/k9/full", "fit/k9/resized", "fit/baseline_k4/resized"} < set(both.targets)
    assert both.targets["fit/k9/full"] is both.variant("plain")
    np.testing.assert_array_equal(both.variant("plain").train_ids, labels.variant("plain").train_ids)
    # on their way to the score step (an npz, no pickle) the maps and their sharing survive
    again = ImageLabels.from_bytes(both.to_bytes())
    assert again.targets.keys() == both.targets.keys() and again.targets["fit/k9/full"] is again.variant("plain")
    for name, target in both.targets.items():
        np.testing.assert_array_equal(again.targets[name].train_ids, target.train_ids)
        assert again.targets[name].stride == target.stride
    assert again.seconds == both.seconds and all(np.array_equal(again.clusters[n], m) for n, m in both.clusters.items())


def test_fast_paths_equal_the_general_ones():
    for seed in range(5):
        gt, pred = blobs(seed=seed), blobs(seed=seed + 10)
        pred[0, :5] = [19, 40, 254, 255, 3]  # out-of-range predictions count as unassigned
        np.testing.assert_array_equal(
            confusion_matrix(gt, pred, 19), confusion_matrix(gt.astype(np.int64), pred.astype(np.int64), 19)
        )
        pan = panoptic_from_train_ids(pred, None, 4, 4, 8)
        big = pan.ids.astype(np.int64) + 2_000_000 * (pan.ids > 0)  # beyond the lookup table: the searched path
        np.testing.assert_array_equal(
            _compact(pan.ids, pan.segment_ids),
            _compact(big, np.where(pan.segment_ids > 0, pan.segment_ids + 2_000_000, 0)),
        )
        for connectivity, structure in ((8, np.ones((3, 3), bool)), (4, None)):
            mask = gt == gt[10, 10]
            ours, n = connected_components(mask, connectivity)
            theirs, m = ndimage.label(mask, structure=structure)
            assert n == m and np.array_equal(ours, theirs)  # raster-order numbering, as scipy's


def test_evaluator_settings_are_checked(tmp_path):
    data, out = tmp_path / "data", tmp_path / "out"
    with pytest.raises(ConfigError, match="official among them"):
        tiny_config(data, out, report={"evaluators": ["paper"]})
    with pytest.raises(ConfigError, match="protocol=cause"):
        tiny_config(data, out, report={"evaluators": ["official", "cause"]})
    assert tiny_config(data, out).evaluators == ("official",)
    assert tiny_config(data, out, protocol="paper").evaluators == ("official", "paper")


def test_a_label_stage_refused_for_its_scoring_names_the_report_keys(tmp_path):
    from storage.run.plans import Plan, differences, label_plan

    fit = Plan("fit", {"k": 16})
    data, out = tmp_path / "data", tmp_path / "out"
    before = label_plan(tiny_config(data, out), fit).settings
    after = label_plan(tiny_config(data, out, protocol="paper", report={"sensitivity": True}), fit).settings
    assert differences(before, after) == [
        'report.evaluators: ["official"] -> ["official", "paper"]',
        "report.sensitivity: false -> true",
    ]


def _scores(cfg) -> dict[str, np.ndarray]:
    names = {}
    for path in sorted((cfg.output_dir / "scores").glob("shard-*.npz")):
        with np.load(path) as data:
            names |= {k: data[k] for k in data.files}
    return names


def test_a_run_without_sensitivity_computes_none_of_its_arrays(tiny_run):
    arrays = _scores(tiny_run)
    assert not [k for k in arrays if "/fit/" in k or "/baseline/" in k or k.startswith("paper/")]
    assert {"official/confusion/variant/plain", "official/pq/variant/baseline_k19", "label/wins/k16"} <= set(arrays)
    report = json.loads((tiny_run.output_dir / "report.json").read_text())
    assert report["evaluators"] == ["official"] and report["protocol_sensitivity"] is None
    assert "protocol sensitivity off (`report.sensitivity`)" in (tiny_run.output_dir / "report.md").read_text()


def test_sensitivity_on_changes_no_other_number(tiny_run, tmp_path):
    cfg = copy_run(tiny_run, tmp_path, report={"sensitivity": True})
    for stage in ("scores", "labels"):  # other label settings: the stage is refused, never mixed, so it starts afresh
        shutil.rmtree(cfg.output_dir / stage)
    Pipeline(cfg).run(("label", "report"))
    assert json.loads((cfg.output_dir / "report.json").read_text())["evaluators"] == ["official", "paper"]
    before, after = (report_metrics(c.output_dir) for c in (tiny_run, cfg))
    assert before.pop("protocol_sensitivity") is None
    sensitivity = after.pop("protocol_sensitivity")
    assert before == after
    main = sensitivity["fits"]["k16"]
    assert list(main) == ["full/official", "full/paper", "resized/official", "resized/paper"]
    assert main["full/official"]["miou"] == after["variants"]["plain"]["semantic"]["miou"]
    assert {k.split("/")[0] for k in _scores(cfg)} == {"image_ids", "official", "paper", "label"}


def test_every_evaluator_the_schema_accepts_is_built_and_titled():
    """A name added to `report.evaluators` must also be built by `build_evaluators` and titled in the
    report, or a run would score without it or fail in its report after the whole job."""
    from typing import get_args

    from configs.schema import PROTOCOL_EVALUATORS, ReportConfig
    from core.evaluation import EvaluationSpec, build_evaluators
    from core.reporting.markdown import EVALUATOR_TITLES

    (names_type,) = [a for a in get_args(ReportConfig.model_fields["evaluators"].annotation) if a is not type(None)]
    accepted = set(get_args(get_args(names_type)[0]))
    assert accepted == set(EVALUATOR_TITLES)
    assert {n for names in PROTOCOL_EVALUATORS.values() for n in names} <= accepted
    fits = (("k300", 300, 1), ("baseline_k19", 19, 1))
    spec = EvaluationSpec(tuple(sorted(accepted)), False, fits, 5, 0, PanopticRules(), (322, 322))
    assert {e.name for e in build_evaluators(spec)} == accepted
