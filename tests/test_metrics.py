import json
import warnings

import numpy as np
import pytest

from core.evaluation.metrics import (
    confusion_matrix,
    iou_per_class,
    mean_iou,
    patch_majority_labels,
    pixel_accuracy,
    semantic_scores,
)

# 4 classes; class 3 appears only as a prediction on ignore pixels, so it is absent from both.
GT = np.array([0, 0, 0, 1, 1, 1, 2, 2, 2, 255, 255])
PRED = np.array([0, 0, 1, 1, 1, 255, 2, 2, 0, 2, 3])
# rows = GT 0..3, cols = predicted 0..3, then "unassigned" (prediction 255)
CONF = np.array([[2, 1, 0, 0, 0], [0, 2, 0, 0, 1], [1, 0, 2, 0, 0], [0, 0, 0, 0, 0]])


def test_confusion_matrix_by_hand():
    conf = confusion_matrix(GT.reshape(1, 11), PRED.reshape(1, 11), 4)
    assert conf.dtype == np.int64
    assert np.array_equal(conf, CONF)


def test_iou_by_hand():
    # class 0: TP 2, FN 1 (->1), FP 1 (gt 2 -> 0):        2 / 4
    # class 1: TP 2, FN 1 (->255, unassigned), FP 1:       2 / 4   (2/3 if unassigned were dropped)
    # class 2: TP 2, FN 1 (->0), FP 0 (ignore pixels skipped): 2 / 3
    # class 3: absent from GT and prediction: NaN, left out of the mean
    assert np.allclose(iou_per_class(CONF), [0.5, 0.5, 2 / 3, np.nan], equal_nan=True)
    assert mean_iou(CONF) == pytest.approx((0.5 + 0.5 + 2 / 3) / 3)
    assert pixel_accuracy(CONF) == pytest.approx(6 / 9)  # the unassigned pixel counts as wrong


def test_plain_square_confusion_is_accepted():
    assert np.allclose(iou_per_class(CONF[:, :4]), [0.5, 2 / 3, 2 / 3, np.nan], equal_nan=True)
    with pytest.raises(ValueError, match=r"\(C, C\+1\)"):
        iou_per_class(np.zeros((4, 6)))


def test_shape_mismatch_names_both_shapes():
    with pytest.raises(ValueError, match=r"\(2, 3\).*\(3, 2\)"):
        confusion_matrix(np.zeros((2, 3)), np.zeros((3, 2)), 4)


def test_empty_confusion_is_nan_without_warnings_and_json_safe():
    empty = np.zeros((3, 4), np.int64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert np.isnan(mean_iou(empty)) and np.isnan(pixel_accuracy(empty))
        scores = semantic_scores(empty, ["a", "b", "c"])
    assert scores == {
        "miou": None,
        "miou_rule": "present",
        "pixel_accuracy": None,
        "per_class_iou": {"a": None, "b": None, "c": None},
        "num_pixels": 0,
    }
    assert semantic_scores(empty, ["a", "b", "c"], "all")["miou"] is None  # nothing scored is not 0


def test_the_papers_rule_averages_every_class_an_absent_one_counting_zero():
    # class 3 is in neither ground truth nor prediction: left out of "present", 0 in "all"
    assert mean_iou(CONF, "all") == pytest.approx((0.5 + 0.5 + 2 / 3 + 0) / 4)
    scores = semantic_scores(CONF, ["road", "sidewalk", "building", "wall"], "all")
    assert scores["miou"] == pytest.approx(5 / 12) and scores["miou_rule"] == "all"
    assert scores["per_class_iou"]["wall"] is None  # the class's own IoU stays undefined
    with pytest.raises(ValueError, match="unknown mIoU rule 'any'"):
        mean_iou(CONF, "any")


def test_semantic_scores():
    scores = semantic_scores(CONF, ["road", "sidewalk", "building", "wall"])
    assert json.loads(json.dumps(scores)) == scores
    assert scores["miou"] == pytest.approx(5 / 9) and scores["pixel_accuracy"] == pytest.approx(2 / 3)
    assert scores["per_class_iou"]["wall"] is None and scores["per_class_iou"]["building"] == pytest.approx(2 / 3)
    assert scores["num_pixels"] == 9
    with pytest.raises(ValueError, match="3 class names"):
        semantic_scores(CONF, ["a", "b", "c"])


def test_summed_per_image_confusions_equal_the_concatenation():
    rng = np.random.default_rng(0)
    shapes = [(5, 7), (3, 4), (8, 2), (1, 1)]
    gts = [rng.choice([0, 1, 2, 3, 4, 255], s).astype(np.uint8) for s in shapes]
    preds = [rng.choice([0, 1, 2, 3, 4, 255], s).astype(np.uint8) for s in shapes]
    whole = confusion_matrix(np.concatenate([g.ravel() for g in gts]), np.concatenate([p.ravel() for p in preds]), 5)
    per_image = [confusion_matrix(g, p, 5) for g, p in zip(gts, preds)]
    assert np.array_equal(sum(per_image), whole)
    assert np.array_equal(sum(per_image[::-1]), whole)  # image order does not matter
    assert mean_iou(sum(per_image)) == mean_iou(whole)


def test_patch_majority_4x4_to_2x2():
    labels = np.array(
        [
            [2, 1, 1, 1],
            [1, 2, 1, 255],
            [255, 255, 3, 9],  # 9 >= num_classes: not a valid class
            [255, 255, 9, 0],
        ],
        np.uint8,
    )
    # top-left: 1 and 2 tie -> 1; top-right: 1; bottom-left: no valid pixel -> 255; bottom-right: 3 and 0 tie -> 0
    assert np.array_equal(patch_majority_labels(labels, 2, 2, 4), [[1, 1], [255, 0]])
    assert patch_majority_labels(labels, 2, 2, 4).dtype == np.uint8


def test_patch_majority_non_divisible_5x7_to_2x3():
    # rows floor(y*2/5): 0,0,0,1,1; columns floor(x*3/7): 0,0,0,1,1,2,2
    labels = np.array(
        [
            [0, 0, 1, 1, 1, 2, 2],
            [0, 0, 1, 1, 2, 2, 2],
            [0, 1, 1, 2, 2, 2, 2],
            [3, 3, 3, 255, 255, 0, 3],
            [3, 3, 0, 255, 255, 3, 0],
        ],
        np.uint8,
    )
    # (0,0): five 0s, four 1s -> 0; (0,1): three 1s, three 2s -> 1; (0,2): 2
    # (1,0): 3; (1,1): all ignore -> 255; (1,2): two 0s, two 3s -> 0
    assert np.array_equal(patch_majority_labels(labels, 2, 3, 4), [[0, 1, 2], [3, 255, 0]])


def test_patch_grid_larger_than_the_label_map_is_rejected():
    with pytest.raises(ValueError, match="3x2 does not fit a 2x4"):
        patch_majority_labels(np.zeros((2, 4), np.uint8), 3, 2, 4)
