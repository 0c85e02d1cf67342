"""Per-image parts and shard finishing, without Ray: a damaged part is done again, a shard whose
every image failed still gets files of the model's width, a too-small image is an input error."""

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from actors.extract import finish_features, image_windows, write_features
from actors.window_features import WindowFeatures
from storage.datasets import list_cityscapes
from storage.run.markers import read_done
from storage.run.parts import read_part, staged_ids, write_part
from storage.run.shards import plan_shards
from storage.synth import generate_demo_dataset
from tests.tiny_runs import tiny_config


def test_a_part_round_trips_and_a_damaged_one_or_another_plans_is_not_counted(tmp_path, caplog):
    write_part(tmp_path, "shard-00000", "a", {"x": np.arange(3)}, {"hw": [1, 2]}, "plan-a")
    write_part(tmp_path, "shard-00000", "b", {"x": np.arange(4)}, {"hw": [3, 4]}, "plan-a")
    write_part(tmp_path, "shard-00000", "z", {"x": np.arange(4)}, {"hw": [3, 4]}, "plan-old")  # a worker of another run
    arrays, meta, plan = read_part(tmp_path, "shard-00000", "a")
    assert arrays["x"].tolist() == [0, 1, 2] and meta == {"hw": [1, 2]} and plan == "plan-a"
    damaged = tmp_path / "_parts" / "shard-00000" / "b.npz"
    damaged.write_bytes(damaged.read_bytes()[:40])  # damaged after it was written whole
    (tmp_path / "_parts" / "shard-00000" / ".c.tmp-1.npz").write_bytes(b"partial")  # a write that never finished
    assert staged_ids(tmp_path, "shard-00000", "plan-a") == {"a"}
    assert not damaged.exists() and "b.npz is damaged" in caplog.text
    assert not (tmp_path / "_parts" / "shard-00000" / "z.npz").exists() and "written under another plan" in caplog.text
    assert staged_ids(tmp_path, "shard-00001", "plan-a") == set()


def _extract_by_hand(cfg, shard):
    """The extract steps in one process, as the stream runs them."""
    config, stage_dir = cfg, str(cfg.output_dir / "features")
    rows = list(image_windows(shard, config))
    model = WindowFeatures(config)
    model.setup()
    out = model({k: np.array([r[k] for r in rows]) for k in rows[0]})
    return [write_features({k: v[i] for k, v in out.items()}, config, stage_dir, "test-plan") for i in range(len(rows))]


def test_a_shard_whose_images_all_failed_keeps_the_feature_width(tmp_path):
    root = tmp_path / "data"
    generate_demo_dataset(root, split="val", num_images=2, height=128, width=256, seed=0)
    records = list_cityscapes(root, "val")
    for r in records:
        open(r.image_path, "wb").write(b"not a png")
    cfg = tiny_config(root, tmp_path / "out")
    (shard,) = plan_shards(records, 2)
    statuses = _extract_by_hand(cfg, shard)
    assert all("corrupt or truncated" in s["error"] for s in statuses)
    failed = [{"image_id": s["image_id"], "path": s["path"], "stage": "extract", "error": s["error"]} for s in statuses]
    finish_features(str(cfg.output_dir / "features"), shard, [], failed, "test-plan", cfg)
    table = pq.read_table(cfg.output_dir / "features" / "shard-00000.parquet")
    assert table.num_rows == 0 and table.schema.field("feature").type.list_size == 32  # the model's width, not 1
    (marker,) = read_done(cfg.output_dir / "features").values()
    assert marker["feature_dim"] == 32 and len(marker["failed"]) == 2


def test_an_image_smaller_than_its_patch_grid_is_an_input_error(tmp_path):
    root = tmp_path / "data"
    generate_demo_dataset(root, split="val", num_images=1, height=128, width=256, seed=0)
    (record,) = list_cityscapes(root, "val")
    from PIL import Image

    Image.new("RGB", (1, 1)).save(record.image_path)
    Image.new("L", (1, 1), 7).save(record.label_ids_path)
    cfg = tiny_config(root, tmp_path / "out")
    (status,) = _extract_by_hand(cfg, {"shard": "shard-00000", "records": json.dumps([record.to_dict()])})
    assert (
        "is 1x1 px, fewer pixels than its 8x8 patch grid" in status["error"] and "internal error" not in status["error"]
    )
    assert "or lower inference.short_side" in status["error"]  # the key that lowers the grid


@pytest.mark.parametrize("scale", [1e-3, 1e3])
def test_the_assignment_does_not_depend_on_the_feature_scale(scale):
    """Cosine argmax: features scaled by any factor give the same clusters (the kernel's tie
    tolerance is relative)."""
    from core.labelling.assign import PixelAssigner

    rng = np.random.default_rng(3)
    features = rng.normal(size=(8, 6, 11)).astype(np.float32)
    centroids = rng.normal(size=(200, 8))
    centroids = (centroids / np.linalg.norm(centroids, axis=1, keepdims=True)).astype(np.float32)
    assigner = PixelAssigner([centroids])
    (base,), _ = assigner.assign([(features, (84, 154))], 14, (90, 165))
    (scaled,), _ = assigner.assign([(features * np.float32(scale), (84, 154))], 14, (90, 165))
    assert (base == scaled).mean() > 0.9999
