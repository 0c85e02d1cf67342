"""The paper's evaluator (core.evaluation.paper): exact answers worked out by hand on tiny arrays."""

import numpy as np
import pytest
from PIL import Image

from core.classes import CLASS_NAMES
from core.evaluation.paper import (
    PAPER_EVAL_HW,
    paper_confusion,
    paper_ground_truth,
    paper_pq_scores,
    paper_pq_stats,
    paper_semantic_scores,
)
from core.image_ops import resize_nearest

V = 255
ROAD, SIDEWALK, BUILDING, PERSON, RIDER, CAR = 0, 1, 2, 11, 12, 13  # trainIds
B = 128 * 128  # a 4 x 8 array resized to 512 x 1024 turns every pixel into a 128 x 128 block


def test_miou_drops_unassigned_predictions_and_skips_absent_classes():
    gt = np.array(
        [[0, 0, 0, 0, 1, 1, 1, 1], [0, 0, 0, 0, 1, 1, 1, 1], [2, 2, 2, 2, 2, 2, V, V], [2, 2, 2, 2, 2, 2, V, V]],
        np.uint8,
    )
    pred = np.array(
        [[0, 0, 0, 1, 1, 1, V, V], [0, 0, 0, 0, 1, 1, 1, 1], [2, 2, 2, 2, 20, 20, 0, 0], [2, 2, 2, 2, 2, 0, 1, 1]],
        np.uint8,
    )
    conf = paper_confusion(paper_ground_truth(gt, np.zeros(gt.shape, np.int32)), pred)
    # gt 0 (8 px): 7 -> 0, 1 -> 1.  gt 1 (8 px): 6 -> 1, 2 -> 255 dropped.
    # gt 2 (12 px): 9 -> 2, 2 -> 20 dropped, 1 -> 0.  gt 255 (4 px): skipped, whatever predicted.
    expected = np.zeros((19, 19), np.int64)
    expected[0, 0], expected[0, 1], expected[1, 1], expected[2, 2], expected[2, 0] = 7, 1, 6, 9, 1
    np.testing.assert_array_equal(conf, expected * B)
    s = paper_semantic_scores(conf)
    # IoU0 = 7 / (7 + fp 1 + fn 1); IoU1 = 6 / (6 + fp 1 + fn 0): the 2 px predicted 255 are no FN
    # (officially 6/9); IoU2 = 9 / (9 + 0 + 1): the 20s are no FN either. Classes 3..18: 0/0, skipped.
    assert s["per_class_iou"]["road"] == pytest.approx(7 / 9)
    assert s["per_class_iou"]["sidewalk"] == pytest.approx(6 / 7)
    assert s["per_class_iou"]["building"] == pytest.approx(9 / 10)
    assert all(s["per_class_iou"][n] is None for n in CLASS_NAMES[3:])
    assert s["miou"] == pytest.approx((7 / 9 + 6 / 7 + 9 / 10) / 3)
    assert s["pixel_accuracy"] == pytest.approx((7 + 6 + 9) / 24)  # trace / counted pixels
    assert paper_semantic_scores(np.zeros((19, 19), np.int64))["miou"] is None


def test_pq_without_void_or_crowd_exclusion():
    H, W = PAPER_EVAL_HW  # already at the evaluation size: the resize leaves them as they are
    gt = np.full((H, W), V, np.uint8)
    inst = np.zeros((H, W), np.int32)
    pred = np.full((H, W), V, np.uint8)
    # road: gt and pred the same 20 x 20 square -> TP, IoU 1.
    gt[0:20, 0:20] = pred[0:20, 0:20] = ROAD
    # sidewalk: a 7 x 9 = 63 px prediction on void, under 64 px -> no segment, no FP.
    pred[0:7, 40:49] = SIDEWALK
    # building: 5 x 10 = 50 px in gt and pred, both under 64 px -> the class is absent.
    gt[0:5, 60:70] = pred[0:5, 60:70] = BUILDING
    # person: gt instance 24001 is 10 x 10; pred = it + 99 px of void beside it (10 x 10 minus one)
    # -> IoU 100 / 199 = 0.5025 > 0.5, TP.
    inst[50:60, 0:10] = 24001
    pred[50:60, 0:20] = PERSON
    pred[59, 19] = V
    # person: 5 x 5 = 25 px on void -> FP (official PQ ignores a prediction mostly on void).
    pred[50:55, 40:45] = PERSON
    # person: 3 x 3 = 9 px, under 10 px -> dropped, no FP.
    pred[50:53, 60:63] = PERSON
    # rider: gt 25001 is 10 x 10; pred = 10 x 20 + 1 px -> IoU 100 / 201 = 0.4975: FN + FP.
    inst[80:90, 0:10] = 25001
    pred[80:90, 0:20] = RIDER
    pred[90, 0] = RIDER
    # car: gt 26001 is square A; pred = A and square B touching A only at a corner. 4-connectivity
    # makes them 2 segments: A matches (IoU 1), B is an FP (8-connectivity: one 200 px segment,
    # IoU 100 / 200, no match).
    inst[100:110, 100:110] = 26001
    pred[100:110, 100:110] = pred[110:120, 110:120] = CAR
    # car: a crowd region (instanceId 26 < 1000) is no gt segment; a car predicted on it -> FP.
    gt[200:210, 0:10], inst[200:210, 0:10], pred[200:210, 0:10] = CAR, 26, CAR
    stats = paper_pq_stats(paper_ground_truth(gt, inst), pred)
    expected = np.zeros((19, 4))
    expected[ROAD] = [1, 0, 0, 1.0]
    expected[PERSON] = [1, 1, 0, 100 / 199]
    expected[RIDER] = [0, 1, 1, 0.0]
    expected[CAR] = [1, 2, 0, 1.0]
    np.testing.assert_allclose(stats, expected)

    s = paper_pq_scores(stats + stats)  # two such images: sums give the same scores
    # per class PQ = iou_sum / (tp + fp/2 + fn/2): road 1, person (100/199)/1.5, rider 0, car 1/2.
    person_pq = 100 / 199 / 1.5
    assert s["per_class"]["person"]["pq"] == pytest.approx(person_pq)
    assert s["per_class"]["sidewalk"]["pq"] is None and s["per_class"]["rider"]["sq"] == 0.0
    assert s["all"]["pq"] == pytest.approx((1 + person_pq + 0 + 0.5) / 4) and s["all"]["n"] == 4
    assert s["stuff"]["pq"] == pytest.approx(1.0) and s["stuff"]["n"] == 1
    assert s["things"]["pq"] == pytest.approx((person_pq + 0 + 0.5) / 3)
    # SQ, RQ pooled: sum iou_sum / sum tp = (1 + 100/199 + 1) / 3; sum tp = 3, fp = 4, fn = 1
    # -> RQ = 3 / (3 + 2 + 0.5). Things: (100/199 + 1) / 2 and 2 / (2 + 2 + 0.5).
    assert s["all"]["sq"] == pytest.approx((2 + 100 / 199) / 3)
    assert s["all"]["rq"] == pytest.approx(3 / 5.5)
    assert s["things"]["sq"] == pytest.approx((1 + 100 / 199) / 2)
    assert s["things"]["rq"] == pytest.approx(2 / 4.5)
    assert paper_pq_scores(np.zeros((19, 4)))["all"]["pq"] is None


def test_pq_stats_resize_small_inputs():
    # 4 x 8 inputs: each pixel a 128 x 128 block; gt road 4 px = 65536 px, pred road 3 of them.
    gt = np.full((4, 8), V, np.uint8)
    gt[0, 0:4] = ROAD
    pred = gt.copy()
    pred[0, 3] = V
    stats = paper_pq_stats(paper_ground_truth(gt, np.zeros((4, 8), np.int32)), pred)
    np.testing.assert_allclose(stats[ROAD], [1, 0, 0, 3 / 4])


def test_resize_nearest_matches_pil():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, size=(37, 53), dtype=np.uint8)
    out = resize_nearest(a, (100, 71))  # ratios 100/37 and 71/53: not integers
    want = np.asarray(Image.fromarray(a).resize((71, 100), Image.NEAREST))
    assert out.dtype == np.uint8 and out.shape == (100, 71)
    np.testing.assert_array_equal(out, want)
    ids = rng.integers(0, 34000, size=(37, 53)).astype(np.int32)
    out = resize_nearest(ids, PAPER_EVAL_HW)
    want = np.asarray(Image.fromarray(ids).resize((1024, 512), Image.NEAREST))
    assert out.dtype == np.int32
    np.testing.assert_array_equal(out, want)
