"""The paper's CAUSE-baseline labelling (single- and multi-scale, with and without CRF) against a
reference written here, loop by loop, from the facts in docs/protocols.md about
generate_semantic_pseudolabels_cause.py: stretched sizes, window positions, per-window
log_softmax(3 * cos) upsampled and averaged, scales resized to the 1.0 size and averaged."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from configs.schema import parse_config
from core.inference.paper_windows import is_one_window, paper_common_size, paper_scale_layout, paper_scale_windows
from core.labelling.paper_baseline import merged_log_probs, paper_baseline_labels
from core.refine.crf import dense_crf

CROP, PATCH, DIM = 112, 14, 5
PROJECTION = np.random.default_rng(3).normal(size=(DIM, 3))


def toy_model(window: np.ndarray) -> np.ndarray:
    """(crop, crop, 3) uint8 -> (D, g, g): each patch's mean colour through a fixed random map."""
    g = CROP // PATCH
    means = window.reshape(g, PATCH, g, PATCH, 3).mean(axis=(1, 3)) / 255.0  # (g, g, 3)
    return np.tanh(np.einsum("yxc,dc->dyx", means, PROJECTION) - 0.3).astype(np.float32)


def reference_log_probs(image: np.ndarray, centroids: np.ndarray, scales: list[float]) -> torch.Tensor:
    """The script, step by step, for an image whose short side is its height."""
    height, width = image.shape[:2]
    base = CROP / min(height, width)
    common = (int(round(height * base)) // PATCH * PATCH, int(round(width * base)) // PATCH * PATCH)
    units = F.normalize(torch.tensor(centroids, dtype=torch.float32), dim=1)
    per_scale = []
    for s in scales:
        h = max(CROP, int(round(height * base * s)) // PATCH * PATCH)
        w = max(CROP, int(round(width * base * s)) // PATCH * PATCH)
        resized = np.asarray(Image.fromarray(image).resize((w, h), Image.BILINEAR))
        ys = [0] if h <= CROP else list(range(0, h - CROP, CROP // 2))
        xs = [0] if w <= CROP else list(range(0, w - CROP, CROP // 2))
        if h > CROP and ys[-1] + CROP < h:
            ys.append(h - CROP)
        if w > CROP and xs[-1] + CROP < w:
            xs.append(w - CROP)
        if (h, w) == (CROP, CROP):  # the script's single-crop shortcut: the patch logits as they are
            feat = F.normalize(torch.tensor(toy_model(resized)), dim=0)
            logits = torch.log_softmax(3 * torch.einsum("dyx,kd->kyx", feat, units), dim=0)
            if scales == [1.0]:  # single-scale: no resize to the common size
                return logits
            per_scale.append(F.interpolate(logits[None], size=common, mode="bilinear", align_corners=False)[0])
            continue
        total, count = torch.zeros(len(units), h, w), torch.zeros(1, h, w)
        for y in sorted(set(ys)):
            for x in sorted(set(xs)):
                feat = F.normalize(torch.tensor(toy_model(resized[y : y + CROP, x : x + CROP])), dim=0)
                logits = torch.log_softmax(3 * torch.einsum("dyx,kd->kyx", feat, units), dim=0)
                total[:, y : y + CROP, x : x + CROP] += F.interpolate(
                    logits[None], size=(CROP, CROP), mode="bilinear", align_corners=False
                )[0]
                count[:, y : y + CROP, x : x + CROP] += 1
        merged = total / count.clamp(min=1)
        per_scale.append(F.interpolate(merged[None], size=common, mode="bilinear", align_corners=False)[0])
    return torch.stack(per_scale).mean(dim=0)


def ours(image: np.ndarray, centroids: np.ndarray, scales: list[float]) -> np.ndarray:
    layouts = [paper_scale_layout(*image.shape[:2], s, CROP, PATCH) for s in scales]
    windows = paper_scale_windows(image, layouts, CROP)
    feats = np.stack([toy_model(w) for w in windows])
    scale_windows, start = [], 0
    for layout in layouts:
        scale_windows.append((feats[start : start + len(layout.origins)], layout))
        start += len(layout.origins)
    units = centroids / np.linalg.norm(centroids, axis=1, keepdims=True)
    common = paper_common_size(*image.shape[:2], CROP, PATCH)
    if scales == [1.0] and is_one_window(layouts[0], CROP):
        common = (CROP // PATCH, CROP // PATCH)
    return merged_log_probs(scale_windows, units, CROP, PATCH, common)


@pytest.fixture(scope="module")
def image():
    """A smooth random image (so that patch colours vary), 128x256."""
    coarse = np.random.default_rng(0).integers(0, 256, size=(8, 16, 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(coarse).resize((256, 128), Image.BICUBIC))


def test_the_papers_sizes_and_windows():
    """1024x2048 at the paper's 322 px windows: docs/protocols.md's 322x476, 322x644, 476x966."""
    sizes = {s: paper_scale_layout(1024, 2048, s, 322, 14) for s in (0.75, 1.0, 1.5)}
    assert {s: lay.resized for s, lay in sizes.items()} == {0.75: (322, 476), 1.0: (322, 644), 1.5: (476, 966)}
    assert sizes[1.0].origins == ((0, 0), (0, 161), (0, 322))
    assert sizes[0.75].origins == ((0, 0), (0, 154))
    assert [x for y, x in sizes[1.5].origins if y == 0] == [0, 161, 322, 483, 644] and {
        y for y, _ in sizes[1.5].origins
    } == {0, 154}
    assert paper_common_size(1024, 2048, 322, 14) == (322, 644)


@pytest.mark.parametrize("scales", [[1.0], [0.75, 1.0, 1.5], [0.5, 1.0]])  # 0.5: one exact 112x112 window
def test_merged_log_probabilities_match_the_scripts_loops(image, scales):
    centroids = np.random.default_rng(1).normal(size=(7, DIM))
    reference = reference_log_probs(image, centroids, scales)
    got = ours(image, centroids, scales)
    assert got.shape == (7, 112, 224)
    np.testing.assert_allclose(got, reference.numpy(), atol=2e-5)


@pytest.mark.parametrize("hw", [(130, 250), (128, 128)])  # sides not multiples of 14; a square image (one window)
def test_other_aspect_ratios_and_the_single_window_shortcut(image, hw):
    other = np.asarray(Image.fromarray(image).resize((hw[1], hw[0]), Image.BILINEAR))
    centroids = np.random.default_rng(4).normal(size=(5, DIM))
    for scales in ([1.0], [0.75, 1.0, 1.5]):
        np.testing.assert_allclose(
            ours(other, centroids, scales), reference_log_probs(other, centroids, scales).numpy(), atol=2e-5
        )


def test_labels_map_the_argmax_or_the_crf_and_upsample_nearest(image):
    centroids = np.random.default_rng(2).normal(size=(6, DIM))
    scales = [0.75, 1.0, 1.5]
    log_probs = ours(image, centroids, scales)
    mapping = np.array([0, 255, 2, 2, 5, 8], np.uint8)
    labels = paper_baseline_labels(log_probs, mapping, (128, 256))
    reference = np.asarray(
        Image.fromarray(mapping[reference_log_probs(image, centroids, scales).argmax(0).numpy()]).resize(
            (256, 128), Image.NEAREST
        )
    )
    assert (labels == reference).mean() > 0.999  # float ties aside
    # the CRF: softmax(3 x merged) with the image resized PIL-bilinear to 112x224, then mapped and NEAREST up
    with_crf = paper_baseline_labels(log_probs, mapping, (128, 256), image)
    small = np.asarray(Image.fromarray(image).resize((224, 112), Image.BILINEAR))
    expected = mapping[dense_crf(small, log_probs, alpha=3.0).argmax(axis=0)]
    np.testing.assert_array_equal(with_crf, np.asarray(Image.fromarray(expected).resize((256, 128), Image.NEAREST)))
    assert (with_crf != labels).any()


def test_config_keeps_the_papers_short_side_at_its_window_size():
    with pytest.raises(Exception, match="inference.short_side=224 and inference.crop=322"):
        parse_config({"protocol": "paper", "inference": {"short_side": 224, "crop": 322, "stride": 161}})
    cfg = parse_config({"protocol": "paper", "inference": {"scales": [0.75, 1.0, 1.5]}})
    assert cfg.inference.scales == [0.75, 1.0, 1.5]


def test_extract_cuts_only_the_seed_scales_whose_windows_differ_from_the_base_scale():
    from configs.geometry import extra_paper_layouts, paper_baseline_scales, paper_scale_layouts

    cfg = parse_config({"protocol": "paper", "inference": {"scales": [0.75, 1.0, 1.5]}})
    base, per_scale = paper_scale_layouts(cfg, (1024, 2048))
    assert base.resized == (322, 644) and per_scale[1] is None  # 1.0 reuses the base scale's 3 windows
    assert [len(layout.origins) for layout in extra_paper_layouts(cfg, (1024, 2048))] == [2, 10]
    # 1080x1920: the paper stretches to 322x560 with windows at 0, 161, 238, not the base scale's 322x572: cut apart
    single = paper_scale_layouts(parse_config({"protocol": "paper"}), (1080, 1920))[1][1.0]
    assert single.resized == (322, 560) and [x for _, x in single.origins] == [0, 161, 238]
    # as the paper's --scales: one scale other than 1.0 is its multi-scale path; 1.0 alone is not; other protocols never
    assert paper_baseline_scales(parse_config({"protocol": "paper", "inference": {"scales": [0.75]}})) == [0.75]
    assert paper_baseline_scales(parse_config({"protocol": "paper"})) == []
    assert paper_baseline_scales(parse_config({"inference": {"scales": [0.75, 1.0]}})) == []


def test_stored_windows_unpack_with_and_without_the_seed_scales():
    from configs.geometry import pack_windows, stored_window_count, unpack_windows

    cfg = parse_config(
        {
            "protocol": "paper",
            "model": {"vit": {"embed_dim": 32, "num_heads": 2}},
            "inference": {"short_side": 112, "crop": 112, "stride": 56, "scales": [0.75, 1.0, 1.5]},
        }
    )
    row = {"height": 128, "width": 256, "layouts": '[{"origins": [[0, 0], [0, 56], [0, 112]]}]'}
    assert stored_window_count(cfg, row) == 3 + 2 + 10 and stored_window_count(cfg, row, paper_scales=False) == 3
    feats = np.random.default_rng(5).normal(size=(15, 4, 8, 8)).astype(np.float32)
    stored = unpack_windows(cfg, pack_windows(feats, 15), (128, 256))
    assert stored.single[0] is not None and np.allclose(stored.single[0], feats[:3], atol=1e-2)  # 1.0: the base windows
    assert [len(w) for w, _ in stored.scales] == [2, 3, 10]
    np.testing.assert_allclose(stored.scales[2][0], feats[5:], atol=1e-2)
    base_only = unpack_windows(
        cfg, pack_windows(feats, 3), (128, 256), paper_scales=False
    )  # apply, not writing features
    assert base_only.single is None and list(base_only.scales) == [] and len(base_only.windows) == 3
    with pytest.raises(Exception, match="re-run extract"):
        unpack_windows(cfg, pack_windows(feats, 3), (128, 256))
