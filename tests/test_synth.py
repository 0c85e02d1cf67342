from pathlib import Path

import numpy as np
from PIL import Image

from core.classes import LABEL_ID_TO_TRAIN_ID, NUM_CLASSES, THING_TRAIN_IDS, TRAIN_ID_TO_LABEL_ID
from storage.datasets import list_cityscapes
from storage.images import ImageLimits, read_rgb, read_train_ids
from storage.synth import generate_demo_dataset, render_scene


def test_layout_and_files_follow_cityscapes(tmp_path):
    ids = generate_demo_dataset(tmp_path, split="val", num_images=4, height=128, width=256, seed=3)
    assert ids[0] == "frankfurt_000000_000019" and ids[1].startswith("lindau_")
    records = list_cityscapes(tmp_path, "val")
    assert [r.image_id for r in records] == sorted(ids)
    r = records[0]
    assert Path(r.image_path).name == f"{r.image_id}_leftImg8bit.png"
    assert read_rgb(r.image_path, ImageLimits(max_pixels=10**8, max_aspect_ratio=16)).shape == (128, 256, 3)
    assert read_train_ids(r.label_ids_path, (128, 256)).shape == (128, 256)
    inst = np.array(Image.open(r.instance_ids_path))
    assert inst.dtype == np.uint16 or inst.dtype == np.int32
    assert (tmp_path / "DEMO_DATASET.txt").exists()


def test_instance_ids_encode_label_ids():
    _, label_ids, instance_ids = render_scene(np.random.default_rng(5), 256, 512)
    things = np.isin(LABEL_ID_TO_TRAIN_ID[label_ids], THING_TRAIN_IDS)
    assert things.any()
    assert np.array_equal(instance_ids[things] // 1000, label_ids[things])
    assert np.array_equal(instance_ids[~things], label_ids[~things])
    # Several instances of one class get distinct ids.
    assert len(np.unique(instance_ids[label_ids == 26])) >= 1


def test_deterministic_and_seed_dependent():
    a = render_scene(np.random.default_rng([0, 7]), 128, 256)
    b = render_scene(np.random.default_rng([0, 7]), 128, 256)
    c = render_scene(np.random.default_rng([1, 7]), 128, 256)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not np.array_equal(a[0], c[0])


def test_all_classes_present_with_cityscapes_like_imbalance():
    counts = np.zeros(256, np.int64)
    for i in range(40):
        _, label_ids, _ = render_scene(np.random.default_rng([0, i]), 256, 512)
        counts += np.bincount(LABEL_ID_TO_TRAIN_ID[label_ids].ravel(), minlength=256)
    share = counts[:NUM_CLASSES] / counts[:NUM_CLASSES].sum()
    assert (share > 0).all(), "every one of the 19 classes appears"
    big = [0, 2, 8, 10]  # road, building, vegetation, sky
    rare = [6, 7, 12, 17]  # traffic light, traffic sign, rider, motorcycle
    assert share[big].sum() > 0.5 and share[rare].max() < 0.015
    assert counts[255] > 0, "void regions exist"
    assert TRAIN_ID_TO_LABEL_ID[0] == 7
