import numpy as np
import pytest
import torch
from torch import nn

from core.inference.dense import DenseFeatureExtractor, normalize
from core.inference.windows import WindowSpec, cut_windows, resized_size, stitch_windows, window_starts


class PatchConv(nn.Module):
    """A patch-feature model with exactly known outputs: one linear map per 14x14 patch."""

    patch_size, feature_dim, required_crop, description = 14, 5, None, "test patch conv"

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.proj = nn.Conv2d(3, 5, 14, 14)

    def forward(self, x):
        return self.proj(x)


def _image(h, w, seed=0):
    return np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)


def test_resized_size_and_window_starts():
    assert resized_size(1024, 2048, 322) == (322, 644)
    assert resized_size(256, 512, 224) == (224, 448)
    assert window_starts(644, 322, 161) == [0, 161, 322]
    assert window_starts(322, 322, 161) == [0]
    assert window_starts(100, 322, 161) == [0]  # smaller than a window: one padded window


def test_aligned_windows_equal_the_whole_image_pass():
    """With a stride that is a multiple of the patch, every window sees the same patches at the
    same places as a single pass over the image, so the average must equal that pass exactly."""
    model = PatchConv().eval()
    image = _image(56, 112)
    dense = DenseFeatureExtractor(model, WindowSpec(short_side=56, crop=28, stride=14, flip=False))
    (features,) = dense([image])
    with torch.no_grad():
        expected = model(normalize(torch.from_numpy(image)[None]))[0].numpy()
    assert features.shape == (5, 4, 8)
    np.testing.assert_allclose(features, expected, atol=1e-5)


def test_cityscapes_geometry_gives_a_23x46_grid():
    dense = DenseFeatureExtractor(PatchConv().eval(), WindowSpec(short_side=322, crop=322, stride=161))
    windows, (layout,) = cut_windows(_image(1024, 2048), dense.spec, 14, [322])
    assert windows.shape == (3, 322, 322, 3) and layout.origins == ((0, 0), (0, 161), (0, 322))
    (features,) = dense([_image(1024, 2048)])  # 161 px steps: stitched on 7 px cells, gcd(14, 161)
    assert features.shape == (5, 23, 46) and np.isfinite(features).all()


def test_flip_averaging_matches_manual_flip():
    model = PatchConv().eval()
    image = _image(28, 28)
    (flipped,) = DenseFeatureExtractor(model, WindowSpec(short_side=28, crop=28, stride=14, flip=True))([image])
    with torch.no_grad():
        x = normalize(torch.from_numpy(image)[None])
        expected = 0.5 * (model(x) + model(x.flip(-1)).flip(-1))[0].numpy()
    np.testing.assert_allclose(flipped, expected, atol=1e-5)


def test_odd_sizes_padding_and_batching_invariance():
    dense = DenseFeatureExtractor(PatchConv().eval(), WindowSpec(short_side=100, crop=56, stride=28, batch_size=3))
    images = [_image(100, 130, 1), _image(120, 100, 2)]
    together = dense(images)
    alone = [dense([im])[0] for im in images]
    assert together[0].shape == (5, 8, 10) and together[1].shape == (5, 9, 8)  # ceil(120/14) x ceil(100/14)
    for a, b in zip(together, alone):
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_model_crop_mismatch_is_refused():
    model = PatchConv().eval()
    model.required_crop = 322
    with pytest.raises(ValueError, match="322 px windows"):
        DenseFeatureExtractor(model, WindowSpec(short_side=224, crop=224, stride=112))


def test_windows_cut_on_cpu_and_stitched_back_equal_the_one_process_pass():
    """The pipeline's split (cut on CPU, model elsewhere on windows of many images, stitch on CPU)
    gives what DenseFeatureExtractor gives, at every scale, whatever the window order in a batch."""
    model = PatchConv().eval()
    spec = WindowSpec(short_side=70, crop=28, stride=21)
    dense = DenseFeatureExtractor(model, spec)
    images = [_image(100, 130, 3), _image(90, 90, 4)]
    cut = [cut_windows(im, spec, 14, [70, 42]) for im in images]
    assert all(w.dtype == np.uint8 and w.shape[1:] == (28, 28, 3) for w, _ in cut)
    batch = np.concatenate([w for w, _ in cut])
    features = dense.windows(batch)  # one model call for both images
    start = 0
    for image, (windows, layouts) in zip(images, cut):
        grids = stitch_windows(features[start : start + len(windows)], layouts, 28, 21, 14)
        start += len(windows)
        assert [r for _, r in grids] == [resized_size(*image.shape[:2], s) for s in (70, 42)]
        np.testing.assert_allclose(grids[0][0], dense([image])[0], atol=1e-6)
        np.testing.assert_allclose(grids[1][0], dense([image], short_side=42)[0], atol=1e-6)
