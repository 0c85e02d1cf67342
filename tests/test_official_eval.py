"""Our metrics against the official Cityscapes evaluators (cityscapesscripts) on the same files.

A small Cityscapes-format gtFine folder (64x128 images: road, sidewalk, building, vegetation,
sky, person / rider / car instances, person and car crowd regions, void) and perturbed
predictions (shifted, classes swapped, touching instances merged by connected components,
an instance split in two, blobs on void and on crowd, unassigned pixels) are written with our
writers; the official pixel-level and panoptic evaluators read them back.

Pixel level: the official script scores IoU per labelId as TP / (TP + FP + FN) with FP counted
only on non-ignored ground truth and FN including predictions of non-evaluated ids, and leaves a
class out of the mean (NaN) when TP + FP + FN = 0, i.e. when it is absent from both the ground
truth and the prediction on valid pixels. `core.evaluation.metrics` does the same (its column C is the
official "predicted a non-evaluated id"), so the two agree exactly; a class predicted on valid
pixels but absent from the ground truth (truck, below) scores 0 and counts in both means.
"""

import json

import numpy as np
import pytest
from PIL import Image

from core.classes import CLASS_NAMES, TRAIN_ID_TO_LABEL_ID, label_ids_to_train_ids
from core.evaluation.metrics import confusion_matrix, iou_per_class, mean_iou
from core.evaluation.pq import pq_scores, pq_stats
from core.panoptic import gt_panoptic, panoptic_from_train_ids
from storage.cityscapes_outputs import (
    convert_gt_panoptic,
    panoptic_json_path,
    rgb_to_panoptic,
    write_image_predictions,
    write_panoptic_json,
)
from tests.official import official_panoptic, official_pixel_level

H, W = 64, 128
IMAGES = [("aachen", "aachen_000000_000019"), ("aachen", "aachen_000001_000019"), ("bochum", "bochum_000000_000313")]
TRAIN = {name: i for i, name in enumerate(CLASS_NAMES)}
LABEL = {name: int(TRAIN_ID_TO_LABEL_ID[i]) for name, i in TRAIN.items()}


def make_gt(rng):
    """(labelIds uint8, instanceIds uint16) of one synthetic street scene."""
    label = np.zeros((H, W), np.uint8)
    label[:16] = LABEL["sky"]
    label[16:36] = LABEL["building"]
    label[36:44] = LABEL["sidewalk"]
    label[44:] = LABEL["road"]
    label[20:36, 100:] = LABEL["vegetation"]
    inst = label.astype(np.uint16)
    dy, dx = rng.integers(-2, 3, size=2)
    label[2:9, 5:21] = 0  # unlabeled (void)
    label[60:, :] = 1  # ego vehicle (void)
    things = [  # (labelId, instanceId, rows, cols); instanceId < 1000 = crowd
        (24, 24000, (28, 50), (10, 17)),
        (24, 24001, (28, 50), (20, 27)),
        (24, 24, (30, 50), (30, 41)),
        (25, 25000, (34, 43), (2, 7)),
        (26, 26000, (40, 56), (50, 71)),
        (26, 26001, (40, 56), (71, 91)),
        (26, 26002, (45, 59), (95, 116)),
        (26, 26, (44, 53), (118, 128)),
    ]
    for label_id, inst_id, (r0, r1), (c0, c1) in things:
        rows = slice(r0 + dy, r1 + dy)
        cols = slice(max(c0 + dx, 0), min(c1 + dx, W))
        label[rows, cols] = label_id
        inst[rows, cols] = inst_id
    inst = np.where(label < 7, label, inst).astype(np.uint16)  # void pixels: their labelId
    return label, inst


def make_prediction(k, label_ids, instance_ids):
    """(trainIds, external instance map or None) perturbing the ground truth in image k's way."""
    train = label_ids_to_train_ids(label_ids).copy()
    train[label_ids == 0] = TRAIN["sky"]  # void box painted over as its surroundings
    train[label_ids == 1] = TRAIN["road"]
    instances = None
    if k == 0:  # shifted; a car blob mostly on void (not a FP); a person blob on the person crowd
        train = np.roll(train, (1, 2), axis=(0, 1))
        void_box = np.argwhere(label_ids == 0)
        (r0, c0), (r1, c1) = void_box.min(0), void_box.max(0)
        train[r0 : r1 + 1, c0 + 2 : c1 + 3] = TRAIN["car"]  # 2 columns off the box: > half on void
        crowd = np.argwhere(instance_ids == 24)
        (r0, c0), (r1, c1) = crowd.min(0), crowd.max(0)
        train[r0 + 2 : r1 - 2, c0 + 2 : c1 - 1] = TRAIN["person"]  # merges with nothing: inside the crowd
        train[r0 + 2 : r1 - 2, c0 + 1] = TRAIN["road"]  # keep it apart from any neighbour
        train[r0 + 2 : r1 - 2, c1 - 1] = TRAIN["road"]
    elif k == 1:  # class swaps, unassigned pixels, a spurious person on the road
        train[(train == TRAIN["sidewalk"]) & (np.arange(W) < 64)] = TRAIN["road"]
        train[20:30, 40:60][train[20:30, 40:60] == TRAIN["building"]] = TRAIN["wall"]
        train[instance_ids == 26002] = TRAIN["truck"]  # truck: absent from the ground truth
        train[10:14, 60:100] = 255  # unassigned
        train[50:54, 30:34] = TRAIN["person"]
    else:  # external instances: two persons merged into one, a car split 60 / 40
        instances = np.where(instance_ids >= 1000, instance_ids, 0).astype(np.int64)
        instances[instances == 24001] = 24000
        car = np.argwhere(instance_ids == 26002)
        c0, c1 = car[:, 1].min(), car[:, 1].max() + 1
        split = c0 + int(0.6 * (c1 - c0))
        right = (instance_ids == 26002) & (np.arange(W) >= split)
        instances[right] = 99
        train[(label_ids == 1)] = TRAIN["road"]
    return train.astype(np.uint8), instances


@pytest.fixture(scope="module")
def evaluation(tmp_path_factory):
    root = tmp_path_factory.mktemp("official")
    gt_fine = root / "cityscapes" / "gtFine"
    pred_root = root / "results"
    rng = np.random.default_rng(0)
    conf = np.zeros((19, 20), np.int64)
    stats = np.zeros((19, 4))
    annotations = []
    for k, (city, image_id) in enumerate(IMAGES):
        label_ids, instance_ids = make_gt(rng)
        gt_dir = gt_fine / "val" / city
        gt_dir.mkdir(parents=True, exist_ok=True)
        Image.fromarray(label_ids).save(gt_dir / f"{image_id}_gtFine_labelIds.png")
        Image.fromarray(instance_ids).save(gt_dir / f"{image_id}_gtFine_instanceIds.png")
        train, instances = make_prediction(k, label_ids, instance_ids)
        pred = panoptic_from_train_ids(train, instances=instances)
        annotations.append(write_image_predictions(pred_root, city, image_id, train, pred))
        conf += confusion_matrix(label_ids_to_train_ids(label_ids), train, 19)
        stats += pq_stats(gt_panoptic(instance_ids, label_ids), pred)
    write_panoptic_json(pred_root, annotations)

    pixel = official_pixel_level(gt_fine, "val", pred_root / "labelIds")
    panoptic, stat = official_panoptic(gt_fine, "val", panoptic_json_path(pred_root), root)
    gt_json_official = root / "gt_official" / "cityscapes_panoptic_val.json"
    return {
        "root": root,
        "gt_fine": gt_fine,
        "conf": conf,
        "stats": stats,
        "pixel": pixel,
        "panoptic": panoptic,
        "pq_stat": stat,
        "gt_json_official": gt_json_official,
    }


def test_miou_agrees_with_official_pixel_level(evaluation):
    ours = iou_per_class(evaluation["conf"])
    official = evaluation["pixel"]["classScores"]
    for i, name in enumerate(CLASS_NAMES):
        if np.isnan(ours[i]):
            assert np.isnan(official[name]), name
        else:
            assert abs(100 * ours[i] - 100 * official[name]) < 0.1, name
    assert official["truck"] == 0.0 and ours[TRAIN["truck"]] == 0.0  # predicted, absent from GT: counts as 0
    assert np.isnan(official["bus"]) and np.isnan(ours[TRAIN["bus"]])  # absent from both: left out
    miou, official_miou = mean_iou(evaluation["conf"]), evaluation["pixel"]["averageScoreClasses"]
    assert abs(100 * miou - 100 * official_miou) < 0.1
    assert 0.3 < miou < 0.95  # the perturbations leave a non-trivial score


def test_pq_agrees_with_official_panoptic(evaluation):
    ours = pq_scores(evaluation["stats"])
    official = evaluation["panoptic"]
    for our_key, key in [("all", "All"), ("things", "Things"), ("stuff", "Stuff")]:
        assert ours[our_key]["n"] == official[key]["n"]
        for m in ("pq", "sq", "rq"):
            assert abs(100 * ours[our_key][m] - 100 * official[key][m]) < 0.1, (our_key, m)
    for label_id, scores in official["per_class"].items():
        name = CLASS_NAMES[list(TRAIN_ID_TO_LABEL_ID).index(int(label_id))]
        if ours["per_class"][name]["pq"] is None:  # absent: official reports 0.0
            assert scores == {"pq": 0.0, "sq": 0.0, "rq": 0.0}
        else:
            for m in ("pq", "sq", "rq"):
                assert abs(ours["per_class"][name][m] - scores[m]) < 1e-9, (name, m)
    assert 0.2 < ours["all"]["pq"] < 0.95


def test_pq_counts_equal_official(evaluation):
    stat = evaluation["pq_stat"]
    for t, name in enumerate(CLASS_NAMES):
        cat = stat[int(TRAIN_ID_TO_LABEL_ID[t])]
        tp, fp, fn, iou = evaluation["stats"][t]
        assert (tp, fp, fn) == (cat.tp, cat.fp, cat.fn), name
        assert iou == pytest.approx(cat.iou, abs=1e-12), name
    per = pq_scores(evaluation["stats"])["per_class"]
    assert per["person"]["fp"] >= 1 and per["car"]["fp"] >= 1 and per["truck"]["fp"] == 1


def test_gt_converter_matches_create_panoptic_imgs(evaluation, tmp_path):
    json_path, folder = convert_gt_panoptic(evaluation["gt_fine"], "val", tmp_path)
    ours, official = json.loads(json_path.read_text()), json.loads(evaluation["gt_json_official"].read_text())
    assert ours == official
    official_folder = evaluation["gt_json_official"].with_suffix("")
    for ann in ours["annotations"]:
        a = np.asarray(Image.open(folder / ann["file_name"]))
        b = np.asarray(Image.open(official_folder / ann["file_name"]))
        assert np.array_equal(a, b)
        assert set(np.unique(rgb_to_panoptic(a))) - {0} == {s["id"] for s in ann["segments_info"]}
