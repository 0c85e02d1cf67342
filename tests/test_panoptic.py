"""Panoptic construction and PQ statistics: exact answers on tiny hand-made arrays."""

import numpy as np
import pytest

from core.classes import CLASS_NAMES
from core.evaluation.pq import FN, FP, IOU_SUM, TP, pq_scores, pq_stats
from core.panoptic import gt_panoptic, instance_ids_map, panoptic_from_train_ids

ROAD, SKY, PERSON, CAR = 0, 10, 11, 13  # trainIds
L_ROAD, L_SKY, L_PERSON, L_CAR = 7, 23, 24, 26  # labelIds


def stats_of(gt_inst, pred_train, instances=None):
    return pq_stats(
        gt_panoptic(np.asarray(gt_inst)), panoptic_from_train_ids(np.asarray(pred_train, np.uint8), instances)
    )


def row(stats, t):
    return tuple(stats[t, [TP, FP, FN]].astype(int)), stats[t, IOU_SUM]


# --- building segmentations ---------------------------------------------------------------------


def test_stuff_is_one_segment_per_class_things_are_components():
    t = np.full((4, 6), ROAD, np.uint8)
    t[0, 0] = t[3, 5] = SKY  # two disconnected sky regions: one segment
    t[1, 1] = t[2, 2] = PERSON  # diagonal neighbours: one instance with 8-connectivity, two with 4
    t[1, 4] = 255
    p8 = panoptic_from_train_ids(t)
    assert list(p8.segment_ids) == [L_ROAD, L_SKY, L_PERSON * 1000]
    assert list(p8.area) == [19, 2, 2] and list(p8.category) == [ROAD, SKY, PERSON]
    assert p8.ids[1, 4] == 0  # ignore -> void
    p4 = panoptic_from_train_ids(t, connectivity=4)
    assert list(p4.segment_ids) == [L_ROAD, L_SKY, 24000, 24001]
    assert p4.ids[1, 1] == 24000 and p4.ids[2, 2] == 24001  # raster order
    assert p4.bboxes().tolist() == [[0, 0, 6, 4], [0, 0, 6, 4], [1, 1, 1, 1], [2, 2, 1, 1]]


def test_min_areas_drop_small_segments_to_void():
    t = np.full((4, 6), ROAD, np.uint8)
    t[0, 0] = SKY
    t[2:4, 0:2] = CAR  # 4 px
    t[0, 5] = CAR  # 1 px
    p = panoptic_from_train_ids(t, min_area=2, stuff_min_area=2)
    assert list(p.segment_ids) == [L_ROAD, L_CAR * 1000]
    assert p.ids[0, 0] == 0 and p.ids[0, 5] == 0
    inst = instance_ids_map(p, t)
    assert inst.dtype == np.uint16
    assert inst[0, 5] == L_CAR and inst[0, 0] == L_SKY and inst[3, 1] == 26000  # labelId off instances


def test_external_instances_split_by_class_and_zero_is_void():
    t = np.array([[PERSON, PERSON, CAR, CAR, ROAD]], np.uint8)
    inst = np.array([[5, 5, 5, 0, 7]])  # one id over two classes: two segments; 0 on a car: void
    p = panoptic_from_train_ids(t, instances=inst)
    assert p.ids.tolist() == [[24000, 24000, 26000, 0, L_ROAD]]


def test_external_instance_ids_of_any_size_keep_their_classes_and_order():
    """Ids near 2**63 are numbered as small ones are (their key would overflow int64: found by a red team)."""
    classes = np.array([[11, 11, 0, 15, 15, 11]], np.uint8)  # person, road, bus, person
    small = panoptic_from_train_ids(classes, np.array([[5, 5, 9, 5, 5, 7]]))
    for big in (2**62 - 1, 2**63 - 1):
        huge = panoptic_from_train_ids(classes, np.array([[big - 2, big - 2, big, big - 2, big - 2, big - 1]]))
        for field in ("ids", "segment_ids", "category", "area"):
            assert np.array_equal(getattr(huge, field), getattr(small, field)), field
    assert small.ids.tolist() == [[24000, 24000, 7, 28000, 28000, 24001]]


def test_at_most_1000_instances_per_class():
    t = np.full((64, 64), ROAD, np.uint8)
    t[::2, ::2] = CAR  # 1024 isolated pixels
    p = panoptic_from_train_ids(t)
    assert (p.category == CAR).sum() == 1000 and p.segment_ids.max() == 26999
    assert (p.ids == 0).sum() == 24 and p.ids[62, 62] == 0  # the last ones in raster order are dropped
    s = pq_stats(p, p)  # ~1e6 segment pairs: the sparse (np.unique) counting path
    assert row(s, CAR) == ((1000, 0, 0), 1000.0) and row(s, ROAD) == ((1, 0, 0), 1.0)


def test_gt_panoptic_crowd_void_and_consistency_check():
    inst = np.array([[L_ROAD, 24000, 24, 0, 1, 26001]], np.uint16)
    g = gt_panoptic(inst)
    assert list(g.segment_ids) == [L_ROAD, L_PERSON, 24000, 26001]
    assert list(g.iscrowd) == [False, True, False, False]
    assert g.ids[0, 3] == 0 and g.ids[0, 4] == 0  # unlabeled, ego vehicle: void
    gt_panoptic(inst, label_ids=np.array([[7, 24, 24, 0, 1, 26]]))
    with pytest.raises(ValueError, match="disagree"):
        gt_panoptic(inst, label_ids=np.array([[7, 24, 25, 0, 1, 26]]))


# --- PQ statistics: the official rules ----------------------------------------------------------


def test_perfect_match_and_empty_class():
    gt = np.array([[L_ROAD, L_ROAD, 24000, 24000]])
    s = stats_of(gt, [[ROAD, ROAD, PERSON, PERSON]])
    assert row(s, ROAD) == ((1, 0, 0), 1.0) and row(s, PERSON) == ((1, 0, 0), 1.0)
    assert not s[[c for c in range(19) if c not in (ROAD, PERSON)]].any()
    scores = pq_scores(s)
    assert scores["all"] == {"pq": 1.0, "sq": 1.0, "rq": 1.0, "n": 2}
    assert scores["per_class"]["car"]["pq"] is None  # absent from both: None, left out of n


def test_all_void_gives_nothing():
    s = stats_of(np.zeros((3, 4), np.uint16), np.full((3, 4), ROAD))  # road entirely on void: not a FP
    assert not s.any()
    scores = pq_scores(s)
    assert scores["all"] == {"pq": None, "sq": None, "rq": None, "n": 0}


def test_void_pixels_leave_the_union():
    gt = np.array([[L_ROAD] * 4 + [24000] * 6 + [0] * 6])
    s = stats_of(gt, [[ROAD] * 4 + [PERSON] * 12])  # 12 px prediction, 6 on void: IoU 6 / (12 + 6 - 6 - 6)
    assert row(s, PERSON) == ((1, 0, 0), 1.0)


@pytest.mark.parametrize("on_void, fp", [(6, 0), (5, 1)])
def test_unmatched_prediction_more_than_half_on_void_is_not_fp(on_void, fp):
    gt = np.array([[L_ROAD] * (10 - on_void) + [0] * on_void + [L_ROAD] * 4])
    s = stats_of(gt, [[PERSON] * 10 + [ROAD] * 4])
    assert row(s, PERSON) == ((0, fp, 0), 0.0)


@pytest.mark.parametrize("on_crowd, fp", [(6, 0), (5, 1)])
def test_crowd_region(on_crowd, fp):
    # car crowd (instanceId 26) is never a FN; a car prediction > half on it is not a FP
    gt = np.array([[L_ROAD] * (10 - on_crowd) + [L_CAR] * on_crowd + [L_CAR] * 2 + [L_ROAD] * 4])
    pred = [[CAR] * 10 + [ROAD] * 6]
    s = stats_of(gt, pred)
    assert row(s, CAR) == ((0, fp, 0), 0.0)
    # a crowd of another class does not excuse it
    s = stats_of(np.where(gt == L_CAR, L_PERSON, gt), pred)
    assert row(s, CAR) == ((0, 1, 0), 0.0)


def test_crowd_and_void_add_up():
    gt = np.array([[L_ROAD] * 4 + [L_CAR] * 3 + [0] * 3 + [L_ROAD] * 4])
    s = stats_of(gt, [[CAR] * 10 + [ROAD] * 4])  # 6 of 10 on crowd + void
    assert row(s, CAR) == ((0, 0, 0), 0.0)


def test_instance_split_in_two():
    gt = np.array([[24000] * 10 + [L_ROAD] * 2])
    inst = np.array([[1] * 6 + [2] * 4 + [0] * 2])
    s = stats_of(gt, [[PERSON] * 10 + [ROAD] * 2], instances=inst)  # 60 % piece matches, 40 % piece is a FP
    assert row(s, PERSON) == ((1, 1, 0), 0.6)
    inst = np.array([[1] * 5 + [2] * 5 + [0] * 2])
    s = stats_of(gt, [[PERSON] * 10 + [ROAD] * 2], instances=inst)  # two halves: IoU 0.5 each, no match
    assert row(s, PERSON) == ((0, 2, 1), 0.0)


def test_iou_exactly_half_is_not_a_match():
    gt = np.array([[24000] * 8 + [L_ROAD] * 8])
    s = stats_of(gt, [[PERSON] * 4 + [ROAD] * 12])
    assert row(s, PERSON) == ((0, 1, 1), 0.0)
    s = stats_of(gt, [[PERSON] * 5 + [ROAD] * 11])  # 5 / 8 > 0.5
    assert row(s, PERSON) == ((1, 0, 0), 0.625)


def test_merged_instances_match_at_most_one():
    gt = np.array([[24000] * 6 + [24001] * 4 + [L_ROAD] * 2])
    s = stats_of(gt, [[PERSON] * 10 + [ROAD] * 2])  # one component over both: IoU 0.6 with the larger
    assert row(s, PERSON) == ((1, 0, 1), 0.6)


def test_class_mismatch_is_fp_and_fn():
    gt = np.array([[26000] * 4 + [L_ROAD] * 4])
    s = stats_of(gt, [[PERSON] * 4 + [ROAD] * 4])
    assert row(s, CAR) == ((0, 0, 1), 0.0) and row(s, PERSON) == ((0, 1, 0), 0.0)


def test_stats_sum_over_images_and_scores():
    a = stats_of(np.array([[24000] * 8 + [L_ROAD] * 8]), [[PERSON] * 5 + [ROAD] * 11])  # person TP 0.625
    b = stats_of(np.array([[24000] * 8 + [L_ROAD] * 8]), [[PERSON] * 4 + [ROAD] * 12])  # person FP + FN
    total = a + b
    assert row(total, PERSON) == ((1, 1, 1), 0.625)
    scores = pq_scores(total)
    person = scores["per_class"]["person"]
    assert person["pq"] == pytest.approx(0.625 / 2) and person["sq"] == 0.625 and person["rq"] == 0.5
    road = scores["per_class"]["road"]  # road: IoU 8/11 in a, 8/12 in b, both matched
    assert road["sq"] == pytest.approx((8 / 11 + 8 / 12) / 2) and road["rq"] == 1.0
    assert scores["things"]["n"] == 1 and scores["stuff"]["n"] == 1 and scores["all"]["n"] == 2
    assert scores["all"]["pq"] == pytest.approx((road["pq"] + person["pq"]) / 2)
    assert scores["things"]["pq"] == pytest.approx(0.3125)


def test_sq_is_zero_without_true_positives_and_shape_is_checked():
    stats = np.zeros((19, 4))
    stats[CAR, FP] = 2
    scores = pq_scores(stats)
    assert scores["per_class"]["car"] == {"pq": 0.0, "sq": 0.0, "rq": 0.0, "tp": 0, "fp": 2, "fn": 0}
    assert len(scores["per_class"]) == len(CLASS_NAMES)
    with pytest.raises(ValueError):
        pq_scores(np.zeros((18, 4)))
    with pytest.raises(ValueError):
        pq_stats(gt_panoptic(np.zeros((2, 2), np.uint16)), panoptic_from_train_ids(np.zeros((2, 3), np.uint8)))


# --- Cityscapes-format writers ------------------------------------------------------------------


def test_prediction_writers_round_trip(tmp_path):
    import json

    from PIL import Image

    from storage.cityscapes_outputs import (
        panoptic_json_path,
        rgb_to_panoptic,
        write_image_predictions,
        write_panoptic_json,
    )
    from storage.images import InputError

    t = np.full((4, 6), ROAD, np.uint8)
    t[1:3, 1:3] = CAR
    t[0, 5] = 255
    pan = panoptic_from_train_ids(t)
    ann = write_image_predictions(tmp_path, "aachen", "aachen_000000_000019", t, pan)
    assert ann == {
        "image_id": "aachen_000000_000019",
        "file_name": "aachen_000000_000019_panoptic.png",
        "segments_info": [
            {"id": 7, "category_id": 7, "iscrowd": 0, "area": 19, "bbox": [0, 0, 6, 4]},
            {"id": 26000, "category_id": 26, "iscrowd": 0, "area": 4, "bbox": [1, 1, 2, 2]},
        ],
    }
    label_ids = np.asarray(Image.open(tmp_path / "labelIds" / "aachen" / "aachen_000000_000019_labelIds.png"))
    assert label_ids.dtype == np.uint8 and label_ids[0, 0] == 7 and label_ids[1, 1] == 26 and label_ids[0, 5] == 0
    inst = np.asarray(Image.open(tmp_path / "instanceIds" / "aachen" / "aachen_000000_000019_instanceIds.png"))
    assert inst[1, 1] == 26000 and inst[0, 0] == 7 and inst[0, 5] == 0
    rgb = np.asarray(Image.open(tmp_path / "panoptic" / "cityscapes_panoptic_val" / ann["file_name"]))
    assert np.array_equal(rgb_to_panoptic(rgb), pan.ids)
    path = write_panoptic_json(tmp_path, [ann])
    assert path == panoptic_json_path(tmp_path)
    data = json.loads(path.read_text())
    assert data["annotations"] == [ann] and len(data["categories"]) == 19
    assert not [p for p in tmp_path.rglob(".*tmp*")]  # no temporary leftovers
    with pytest.raises(InputError):
        write_image_predictions(tmp_path, "..", "x", t, pan)
