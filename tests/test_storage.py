import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from storage.datasets import DatasetError, ImageRecord, list_cityscapes, list_image_folder
from storage.features import features_from_table, patch_schema, patch_table
from storage.images import ImageLimits, InputError, read_rgb, read_train_ids, safe_path, write_png_atomic
from storage.run.atomic import write_parquet_atomic
from storage.run.markers import mark_done, read_done
from storage.run.shards import dataset_fingerprint, plan_shards, shard_records
from tests.tiny_runs import one_colour_png

LIMITS = ImageLimits(max_pixels=10_000, max_aspect_ratio=16)


def _png(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


def test_read_rgb_accepts_rgb_and_opaque_rgba(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 255, (6, 8, 3), dtype=np.uint8)
    assert np.array_equal(read_rgb(_png(tmp_path / "a.png", rgb), LIMITS), rgb)
    rgba = np.dstack([rgb, np.full((6, 8), 255, np.uint8)])
    assert np.array_equal(read_rgb(_png(tmp_path / "b.png", rgba), LIMITS), rgb)


@pytest.mark.parametrize(
    "case, message",
    [
        ("grayscale", "grayscale image"),
        ("translucent", "transparent pixels"),
        ("truncated", "corrupt or truncated"),
        ("garbage", "corrupt or truncated"),
        ("missing", "image file is missing"),
    ],
)
def test_read_rgb_errors_name_the_file_and_fix(tmp_path, case, message):
    path = tmp_path / f"{case}.png"
    if case == "grayscale":
        _png(path, np.zeros((4, 4), np.uint8))
    elif case == "translucent":
        _png(path, np.zeros((4, 4, 4), np.uint8))
    elif case == "truncated":
        _png(path, np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
        path.write_bytes(path.read_bytes()[:200])
    elif case == "garbage":
        path.write_bytes(b"not a png at all")
    with pytest.raises(InputError, match=message) as err:
        read_rgb(path, LIMITS)
    assert str(path) in str(err.value)


class Decoded(Exception):
    """Raised where PIL would decode pixels: the checks before it have passed."""


@pytest.fixture
def never_decoded(monkeypatch):
    from PIL import ImageFile

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", Image.MAX_IMAGE_PIXELS)  # restored after the test

    def load(self):
        raise Decoded(self.size)

    monkeypatch.setattr(ImageFile.ImageFile, "load", load)


def test_a_decompression_bomb_is_too_large_before_it_is_decoded_and_our_limit_decides(tmp_path, never_decoded):
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(one_colour_png(14000, 14000))  # 196 Mpx of one colour in 24 kB
    assert bomb.stat().st_size < 100_000
    fix = "downscale it, or raise dataset.max_image_pixels"
    # over our limit, under twice it (PIL only warns there): ours refuses it from the header
    with pytest.raises(InputError) as err:
        read_rgb(bomb, ImageLimits(max_pixels=100_000_000, max_aspect_ratio=16))
    assert str(err.value).startswith(
        f"{bomb}: image too large: 14000x14000 px = 196,000,000 pixels, more than "
        "dataset.max_image_pixels=100,000,000; " + fix
    )
    # over twice our limit PIL refuses it as the file opens (DecompressionBombError): the same input problem
    with pytest.raises(InputError) as err:
        read_rgb(bomb, ImageLimits(max_pixels=10_000_000, max_aspect_ratio=16))
    assert str(err.value).startswith(
        f"{bomb}: image too large: over 20,000,000 pixels, more than dataset.max_image_pixels=10,000,000; " + fix
    )
    # raised above PIL's own refusal (2 x 89 Mpx by default), ours still decides: the image goes on to be decoded
    with pytest.raises(Decoded):
        read_rgb(bomb, ImageLimits(max_pixels=200_000_000, max_aspect_ratio=16))
    assert Image.MAX_IMAGE_PIXELS == 1024 * 1024 * 1024 // 4 // 3  # PIL's own limit is left as it was


@pytest.mark.parametrize("width, height", [(100_000, 1), (1, 100_000), (1700, 100)])
def test_an_image_of_extreme_aspect_ratio_is_refused_before_it_is_decoded(tmp_path, never_decoded, width, height):
    strip = tmp_path / "strip.png"
    strip.write_bytes(one_colour_png(width, height))
    with pytest.raises(InputError) as err:
        read_rgb(strip, ImageLimits(max_pixels=100_000_000, max_aspect_ratio=16))
    ratio = max(width, height) / min(width, height)
    assert str(err.value) == (
        f"{strip}: extreme aspect ratio: {height}x{width} px is {ratio:,.1f}:1, more than "
        "dataset.max_aspect_ratio=16; crop it into pieces of a usual shape, or raise "
        "dataset.max_aspect_ratio"
    )
    with pytest.raises(Decoded):  # within a raised limit it is read
        read_rgb(strip, ImageLimits(max_pixels=100_000_000, max_aspect_ratio=ratio))


def test_the_configs_size_checks_run_on_the_header_after_pixels_and_aspect(tmp_path, never_decoded):
    path = tmp_path / "a.png"
    path.write_bytes(one_colour_png(20, 10))
    seen = []
    limits = ImageLimits(
        max_pixels=200, max_aspect_ratio=2, size_problem=lambda h, w: seen.append((h, w)) or "too few windows"
    )
    with pytest.raises(InputError, match=f"^{path}: too few windows$"):
        read_rgb(path, limits)
    assert seen == [(10, 20)]
    with pytest.raises(InputError, match="image too large: 10x20 px = 200 pixels"):
        read_rgb(path, ImageLimits(max_pixels=199, max_aspect_ratio=2, size_problem=lambda h, w: seen.append((h, w))))
    assert seen == [(10, 20)]  # not asked: the pixel limit came first


def test_ground_truth_of_another_size_or_a_bomb_is_refused_before_it_is_decoded(tmp_path, never_decoded):
    bomb = tmp_path / "x_gtFine_labelIds.png"
    bomb.write_bytes(one_colour_png(14000, 14000))
    # PIL refuses it as it opens (over twice its default limit): the same problem, not an internal error
    with pytest.raises(InputError, match=rf"^{bomb}: ground truth is too large \(Image size \(196000000 pixels\) "):
        read_train_ids(bomb, (128, 256))
    Image.MAX_IMAGE_PIXELS = None  # without PIL's check, the header's size is compared with the image's
    with pytest.raises(InputError, match=f"^{bomb}: ground truth is 14000x14000 but its image is 128x256; they must"):
        read_train_ids(bomb, (128, 256))


def test_read_train_ids_maps_label_ids(tmp_path):
    label_ids = np.array([[7, 8, 0], [26, 33, 5]], np.uint8)  # road, sidewalk, unlabeled / car, bicycle, dynamic
    path = _png(tmp_path / "x_gtFine_labelIds.png", label_ids)
    assert read_train_ids(path, (2, 3)).tolist() == [[0, 1, 255], [13, 18, 255]]


@pytest.mark.parametrize(
    "array, hw, message",
    [
        (np.zeros((2, 3), np.uint8), (4, 3), "same size"),
        (np.full((2, 3), 40, np.uint8), (2, 3), "unknown labelId 40"),
        (np.zeros((2, 3, 3), np.uint8), (2, 3), "single-channel"),
    ],
)
def test_read_train_ids_errors(tmp_path, array, hw, message):
    path = _png(tmp_path / "x_gtFine_labelIds.png", array)
    with pytest.raises(InputError, match=message):
        read_train_ids(path, hw)
    with pytest.raises(InputError, match="ground truth is missing"):
        read_train_ids(tmp_path / "absent.png", hw)


@pytest.mark.parametrize("name", ["..", "../x", "/etc/passwd", "a/b", "", ".hidden"])
def test_safe_path_refuses_names_that_leave_the_output_dir(tmp_path, name):
    with pytest.raises(InputError):
        safe_path(tmp_path, name)


def test_safe_path_accepts_plain_names(tmp_path):
    assert (
        safe_path(tmp_path, "frankfurt", "frankfurt_000000_000294_x.png")
        == tmp_path / "frankfurt" / "frankfurt_000000_000294_x.png"
    )


def _cityscapes(root, split, ids_by_city):
    for city, ids in ids_by_city.items():
        for i in ids:
            _png(root / "leftImg8bit" / split / city / f"{city}_{i}_leftImg8bit.png", np.zeros((2, 4, 3), np.uint8))
    if split != "test":
        (root / "gtFine" / split).mkdir(parents=True, exist_ok=True)


def test_list_cityscapes_sorted_with_gt_paths(tmp_path):
    _cityscapes(tmp_path, "val", {"munster": ["000001_000019", "000000_000019"], "lindau": ["000000_000019"]})
    records = list_cityscapes(tmp_path, "val")
    assert [r.image_id for r in records] == ["lindau_000000_000019", "munster_000000_000019", "munster_000001_000019"]
    assert records[0].label_ids_path.endswith("gtFine/val/lindau/lindau_000000_000019_gtFine_labelIds.png")
    assert len(list_cityscapes(tmp_path, "val", max_images=2)) == 2


def test_the_dataset_fingerprint_is_the_images_not_the_spelling_of_their_folder(tmp_path, monkeypatch):
    root = tmp_path / "data" / "set"
    _cityscapes(root, "val", {"lindau": ["000000_000019", "000001_000019"]})
    fingerprint = dataset_fingerprint(list_cityscapes(root, "val"), root)
    monkeypatch.chdir(tmp_path)
    for spelling in ("data/set", "./data/set/", str(root) + "/"):
        assert dataset_fingerprint(list_cityscapes(Path(spelling), "val"), spelling) == fingerprint
    (tmp_path / "moved").mkdir()
    (tmp_path / "data").rename(tmp_path / "moved" / "data")
    assert dataset_fingerprint(list_cityscapes(Path("moved/data/set"), "val"), "moved/data/set") == fingerprint
    image = (
        tmp_path / "moved" / "data" / "set" / "leftImg8bit" / "val" / "lindau" / "lindau_000001_000019_leftImg8bit.png"
    )
    image.write_bytes(image.read_bytes() + b"\0")  # the same name, other bytes
    assert dataset_fingerprint(list_cityscapes(Path("moved/data/set"), "val"), "moved/data/set") != fingerprint


def test_split_without_gtfine_is_unlabelled(tmp_path):
    _cityscapes(tmp_path, "test", {"berlin": ["000000_000019"]})
    (record,) = list_cityscapes(tmp_path, "test")
    assert record.label_ids_path is None and record.instance_ids_path is None


def test_list_cityscapes_errors(tmp_path):
    with pytest.raises(DatasetError, match="dataset.root"):
        list_cityscapes(tmp_path, "val")
    (tmp_path / "leftImg8bit" / "val").mkdir(parents=True)
    with pytest.raises(DatasetError, match="split is empty"):
        list_cityscapes(tmp_path, "val")


def test_list_image_folder_ids_unique_and_safe(tmp_path):
    _png(tmp_path / "a b" / "x.png", np.zeros((2, 2, 3), np.uint8))
    _png(tmp_path / "c" / "x.jpg", np.zeros((2, 2, 3), np.uint8))
    records = list_image_folder(tmp_path)
    assert [r.image_id for r in records] == ["a_b__x", "c__x"]
    assert all(r.label_ids_path is None for r in records)


def test_plan_shards_is_deterministic_and_round_trips():
    records = [ImageRecord(f"img{i}", "g", f"/d/img{i}.png") for i in range(5)]
    shards = plan_shards(records, 2)
    assert [s["shard"] for s in shards] == ["shard-00000", "shard-00001", "shard-00002"]
    assert shard_records(shards[2]) == records[4:]
    assert plan_shards(records, 2) == shards


def test_patch_table_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    feats = [rng.normal(size=(4, 2, 3)).astype(np.float32), rng.normal(size=(4, 1, 2)).astype(np.float32)]
    labels = [np.arange(6, dtype=np.uint8).reshape(2, 3), np.array([[255, 1]], np.uint8)]
    table = patch_table(["a", "b"], feats, labels, patch_schema(4, "float32"), [(28, 42), (14, 28)])
    write_parquet_atomic(table, tmp_path / "shard-00000.parquet")
    back = pq.read_table(tmp_path / "shard-00000.parquet")
    assert back.column("image_id").to_pylist() == ["a"] * 6 + ["b"] * 2
    assert back.column("row").to_pylist() == [0, 0, 0, 1, 1, 1, 0, 0]
    assert back.column("col").to_pylist() == [0, 1, 2, 0, 1, 2, 0, 1]
    assert back.column("label").to_pylist() == [0, 1, 2, 3, 4, 5, 255, 1]
    x = features_from_table(back)
    assert np.array_equal(x[4], feats[0][:, 1, 1]) and np.array_equal(x[7], feats[1][:, 0, 1])
    assert [p.name for p in tmp_path.iterdir()] == ["shard-00000.parquet"]  # no temporary files left


def test_float16_features_are_stored_half_size():
    table = patch_table(
        ["a"], [np.ones((8, 1, 1), np.float32)], [np.zeros((1, 1), np.uint8)], patch_schema(8), [(14, 14)]
    )
    assert str(table.schema.field("feature").type.value_type) == "halffloat"
    assert features_from_table(table).dtype == np.float32


def test_markers_and_atomic_png(tmp_path):
    mark_done(tmp_path, "shard-00001", {"num_images": 3, "failed": []})
    assert read_done(tmp_path) == {"shard-00001": {"num_images": 3, "failed": []}}
    (tmp_path / "_done" / "shard-00002.json").write_text('{"num_images": 3, "fai')  # damaged: dropped, so redone
    assert list(read_done(tmp_path)) == ["shard-00001"] and not (tmp_path / "_done" / "shard-00002.json").exists()
    assert json.loads((tmp_path / "_done" / "shard-00001.json").read_text())["num_images"] == 3
    write_png_atomic(np.full((2, 2), 700, np.uint16), tmp_path / "p" / "inst.png")
    assert np.asarray(Image.open(tmp_path / "p" / "inst.png")).max() == 700
    with pytest.raises(TypeError, match="uint8 or uint16"):
        write_png_atomic(np.zeros((2, 2), np.int32), tmp_path / "bad.png")
