"""Report figures are written (atomically, no leftovers) and reject malformed input."""

import numpy as np
import pytest
from PIL import Image

from core.classes import CLASS_NAMES, colorize_train_ids
from core.reporting.plots import plot_confusion, plot_overlay_grid, plot_per_class_iou


def _only_png(folder, name):
    assert sorted(p.name for p in folder.iterdir()) == [name]
    with Image.open(folder / name) as img:
        assert img.size[0] > 100 and img.size[1] > 100


def test_plot_confusion(tmp_path):
    conf = np.eye(19, 20, dtype=np.int64) * 10 + 1
    conf[3] = 0  # a class without pixels
    plot_confusion(conf, CLASS_NAMES, tmp_path / "c.png")
    _only_png(tmp_path, "c.png")
    with pytest.raises(ValueError):
        plot_confusion(np.ones((3, 5)), ["a", "b", "c"], tmp_path / "bad.png")


def test_plot_per_class_iou(tmp_path):
    runs = {
        "baseline": {n: 0.5 for n in CLASS_NAMES},
        "k=300": {n: (None if n == "train" else 0.7) for n in CLASS_NAMES},
    }
    plot_per_class_iou(runs, tmp_path / "iou.png")
    _only_png(tmp_path, "iou.png")


def test_plot_overlay_grid(tmp_path):
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (32, 64, 3), dtype=np.uint8)
    label = colorize_train_ids(rng.integers(0, 19, (32, 64)).astype(np.uint8))
    plot_overlay_grid([(image, label, label, label)] * 2, tmp_path / "grid.png", row_titles=["a", "b"])
    _only_png(tmp_path, "grid.png")
