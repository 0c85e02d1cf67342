"""The `paper` protocol preset against references written here from the facts in docs/protocols.md about the
paper's scripts (not from the code under test): window merge, patch labels, k-means, pixel labels."""

from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from sklearn.cluster import MiniBatchKMeans

from actors.extract import patch_labels
from configs.schema import ConfigError, parse_config
from core.clustering.kmeans import assign_euclidean, fit_paper_minibatch
from core.evaluation.cause import crop_counts, hungarian_scores
from core.inference.dense import WindowModel
from core.inference.windows import (
    StoredWindows,
    WindowSpec,
    cause_view,
    cut_windows,
    layout_axis_weights,
    stitch_windows,
)
from core.labelling.cause_crop import crop_clusters
from core.labelling.image import ImageLabeller, LabelFit, LabelRequest
from core.labelling.variants import RefineSettings
from core.refine.crf import dense_crf
from core.refine.paper_heuristics import denoise_by_prototypes, diffuse_by_neighbours

SPEC = WindowSpec(short_side=112, crop=112, stride=56)  # 128x256 -> 112x224: windows at x = 0, 56, 112
PATCH = 14


def paper_pixel_map(window_features: np.ndarray, origins, resized: tuple[int, int], crop: int) -> torch.Tensor:
    """The paper's merge, step by step: each window's patch map upsampled bilinearly to its pixels,
    the windows averaged per pixel, cropped to the resized image."""
    h, w = resized
    total = torch.zeros(window_features.shape[1], h + crop, w + crop)
    count = torch.zeros(h + crop, w + crop)
    for (y, x), feat in zip(origins, window_features):
        up = F.interpolate(torch.tensor(feat)[None], size=(crop, crop), mode="bilinear", align_corners=False)[0]
        total[:, y : y + crop, x : x + crop] += up
        count[y : y + crop, x : x + crop] += 1
    return (total / count.clamp_min(1))[:, :h, :w]


def windows_of(image_hw=(128, 256), dim=6, seed=0):
    _, (layout,) = cut_windows(np.zeros((*image_hw, 3), np.uint8), SPEC, PATCH, [SPEC.short_side])
    feats = np.random.default_rng(seed).normal(size=(len(layout.origins), dim, 8, 8)).astype(np.float32)
    return feats, layout


def test_paper_merge_is_the_pooled_pixel_map_of_the_windows():
    feats, layout = windows_of()
    ((grid, _),) = stitch_windows(feats, [layout], SPEC.crop, SPEC.stride, PATCH, merge="pixels")
    reference = F.adaptive_avg_pool2d(
        paper_pixel_map(feats, layout.origins, layout.resized, SPEC.crop)[None], layout.grid
    )[0]
    assert grid.shape == (6, 8, 16)
    np.testing.assert_allclose(grid, reference.numpy(), atol=1e-5)
    # and it is not this tool's own merge (7 px cells), which keeps each window's patches sharp
    ((cells, _),) = stitch_windows(feats, [layout], SPEC.crop, SPEC.stride, PATCH)
    assert np.abs(cells - grid).max() > 0.1


def test_paper_merge_of_one_window_is_the_one_eighth_blur():
    """docs/protocols.md: pooling a 14x bilinear upsampling is a [1/8, 3/4, 1/8] blur per axis (edges: [7/8, 1/8])."""
    spec = WindowSpec(short_side=112, crop=112, stride=112)
    _, (layout,) = cut_windows(np.zeros((112, 112, 3), np.uint8), spec, PATCH, [112])
    feat = np.random.default_rng(1).normal(size=(1, 3, 8, 8)).astype(np.float32)
    ((grid, _),) = stitch_windows(feat, [layout], 112, 112, PATCH, merge="pixels")
    blur = np.diag(np.full(8, 0.75)) + np.diag(np.full(7, 0.125), 1) + np.diag(np.full(7, 0.125), -1)
    blur[0, 0] = blur[-1, -1] = 0.875
    np.testing.assert_allclose(grid, np.einsum("ij,djk,lk->dil", blur, feat[0], blur), atol=1e-5)


def config(protocol: str, **sections):
    return parse_config({"protocol": protocol, "inference": {"short_side": 112, "crop": 112, "stride": 56}, **sections})


def test_paper_patch_labels_are_one_nearest_sample_per_patch():
    labels = np.array(
        [
            [0, 1, 1, 1, 2, 2, 3, 3],
            [0, 4, 1, 5, 2, 6, 3, 7],
            [8, 8, 9, 9, 255, 255, 10, 10],
            [8, 11, 9, 12, 255, 255, 10, 13],
        ],
        np.uint8,
    )
    # 4x8 -> 2x4: PIL NEAREST samples pixel floor((i + 0.5) * 2) = rows 1, 3 and columns 1, 3, 5, 7
    assert patch_labels(config("paper"), labels, (2, 4)).tolist() == [[4, 5, 6, 7], [11, 12, 255, 13]]
    # the official labels are each 2x2 patch's majority (ties to the lower id)
    assert patch_labels(config("official"), labels, (2, 4)).tolist() == [[0, 1, 2, 3], [8, 9, 255, 10]]


def test_paper_kmeans_is_minibatch_with_the_papers_settings():
    x = np.random.default_rng(2).normal(size=(600, 5)).astype(np.float32)
    x[3, 1] = np.nan  # the paper's nan_to_num makes it 0
    reference_x = np.nan_to_num(x.astype(np.float64))
    reference_x /= np.linalg.norm(reference_x, axis=1, keepdims=True)
    reference = MiniBatchKMeans(n_clusters=7, batch_size=10000, max_iter=300, n_init=3, random_state=42).fit(
        reference_x
    )
    centres = fit_paper_minibatch(x, 7)
    np.testing.assert_array_equal(centres, reference.cluster_centers_)
    np.testing.assert_array_equal(assign_euclidean(x, centres), reference.predict(reference_x))
    with pytest.raises(ValueError, match="lower fit.k"):
        fit_paper_minibatch(x[:5], 7)


def test_paper_pixel_labels_come_from_the_windows_pixel_map_at_the_resized_size():
    feats, layout = windows_of(dim=5, seed=3)
    rng = np.random.default_rng(4)
    centroids = rng.normal(size=(9, 5)).astype(np.float32)
    centroids /= np.linalg.norm(centroids, axis=1, keepdims=True)
    mapping = rng.integers(0, 19, 9)
    fit = LabelFit("k9", centroids, mapping)
    labeller = ImageLabeller(
        [fit, LabelFit("baseline_k9", centroids, mapping)],
        ["plain"],
        RefineSettings(),
        labelling="resized",
        request=LabelRequest(baseline=True, both_labellings=True),
    )
    ((grid, resized),) = stitch_windows(feats, [layout], SPEC.crop, SPEC.stride, PATCH, merge="pixels")
    labels = labeller.label(
        [(grid, resized)],
        PATCH,
        (128, 256),
        windows=StoredWindows(feats, layout_axis_weights(layout, SPEC.crop, PATCH), layout),
    )
    pixel = F.normalize(paper_pixel_map(feats, layout.origins, layout.resized, SPEC.crop), dim=0)
    clusters = torch.einsum("kd,dyx->kyx", torch.tensor(centroids), pixel).argmax(dim=0).numpy()
    reference = np.asarray(Image.fromarray(mapping[clusters].astype(np.uint8)).resize((256, 128), Image.NEAREST))
    assert labels.variant("plain").train_ids.shape == (128, 256)
    assert (labels.variant("plain").train_ids == reference).mean() > 0.999  # float rounding may flip a near-tie pixel
    # asked for (the sensitivity table), the full-size labelling is made too, from the grid; the own one is the variant
    assert labels.targets["fit/k9/full"].train_ids.shape == (128, 256)
    assert labels.targets["fit/k9/resized"] is labels.variant("plain")


def test_protocols_refuse_settings_they_cannot_honour():
    with pytest.raises(ConfigError, match="short_side=126 and inference.crop=112"):
        config("paper", inference={"short_side": 126, "crop": 112, "stride": 56})
    with pytest.raises(ConfigError, match="lloyd_iterations"):
        config("paper", fit={"lloyd_iterations": 2})
    with pytest.raises(ConfigError, match="protocol"):
        config("caus")
    with pytest.raises(ConfigError, match="must not exceed the short side"):
        config("cause", inference={"short_side": 112, "crop": 126, "stride": 56})


def test_cause_view_is_nearest_resize_of_the_short_side_then_the_centre_crop():
    image = np.random.default_rng(6).integers(0, 255, size=(30, 50, 3), dtype=np.uint8)
    # torchvision Resize(12): 30x50 -> 12 x int(12 * 50 / 30) = 12x20; CenterCrop(12): left = round((20 - 12) / 2) = 4
    reference = np.asarray(Image.fromarray(image).resize((20, 12), Image.NEAREST))[:, 4:16]
    assert np.array_equal(cause_view(image, 12, 12), reference)
    labels = image[..., 0].T.copy()  # a portrait 50x30 label map: 20x12, top = 4
    assert np.array_equal(
        cause_view(labels, 12, 12), np.asarray(Image.fromarray(labels).resize((12, 20), Image.NEAREST))[4:16]
    )


def test_cause_scores_one_hungarian_matching_over_27_classes():
    counts = np.zeros((3, 27), np.int64)
    counts[0, 0], counts[0, 1] = 80, 20  # cluster 0: mostly road (class 0 = labelId 7)
    counts[1, 1], counts[1, 0] = 30, 10  # cluster 1: sidewalk
    counts[2, 4] = 50  # cluster 2: building (class 4 = labelId 11)
    counts[2, 10] = 10  # pole (labelId 17): no cluster of its own left
    scores = hungarian_scores(counts)
    assert scores["mapping"] == {0: 0, 1: 1, 2: 4}
    # road 80 / (90 + 100 - 80); sidewalk 30 / (50 + 40 - 30); building 50 / (50 + 60 - 50); pole 0 / 10
    expected = [80 / 110, 30 / 60, 50 / 60, 0.0]
    assert scores["miou"] == pytest.approx(np.mean(expected))
    assert scores["pixel_accuracy"] == pytest.approx(160 / 200)
    assert scores["per_class_iou"]["pole"] == 0.0 and scores["per_class_iou"]["sky"] is None


def test_cause_counts_label_the_crop_by_cosine_after_bilinear_upsampling():
    rng = np.random.default_rng(7)
    grid = rng.normal(size=(4, 2, 2)).astype(np.float32)
    centroids = rng.normal(size=(3, 4)).astype(np.float32)
    centroids /= np.linalg.norm(centroids, axis=1, keepdims=True)
    label_ids = np.full((8, 8), 7, np.uint8)
    label_ids[:, 4:] = 0  # labelId 0 (unlabeled) is outside the 27 classes
    crops = crop_clusters(
        grid, grid[:, :, ::-1].copy(), centroids, rng.integers(0, 255, size=(8, 8, 3), dtype=np.uint8)
    )
    counts = crop_counts(crops["crop"], label_ids, 3)
    pixels = F.interpolate(torch.tensor(grid)[None], size=(8, 8), mode="bilinear", align_corners=False)[0]
    nearest = torch.einsum("kd,dyx->kyx", torch.tensor(centroids), F.normalize(pixels, dim=0)).argmax(dim=0).numpy()
    assert np.array_equal(crops["crop"], nearest) and crops["crop+crf"].shape == (8, 8)
    assert counts.shape == (3, 27) and np.array_equal(counts[:, 0], np.bincount(nearest[:, :4].ravel(), minlength=3))
    assert counts.sum() == 32


def test_paper_crf_is_softmax_of_five_times_the_class_logits_at_the_resized_size():
    feats, layout = windows_of(dim=5, seed=8)
    rng = np.random.default_rng(9)
    centroids = rng.normal(size=(6, 5)).astype(np.float32)
    centroids /= np.linalg.norm(centroids, axis=1, keepdims=True)
    mapping = np.array([0, 0, 2, 5, 2, 11])  # classes 0, 2, 5, 11 have clusters; the other 15 score 0
    image = rng.integers(0, 255, size=(128, 256, 3), dtype=np.uint8)
    fit = LabelFit("k6", centroids, mapping)
    labeller = ImageLabeller(
        [fit, fit], ["plain", "crf"], RefineSettings(), labelling="resized", request=LabelRequest(baseline=True)
    )
    ((grid, resized),) = stitch_windows(feats, [layout], SPEC.crop, SPEC.stride, PATCH, merge="pixels")
    labels = labeller.label(
        [(grid, resized)],
        PATCH,
        (128, 256),
        image,
        windows=StoredWindows(feats, layout_axis_weights(layout, SPEC.crop, PATCH), layout),
    )
    cosine = torch.einsum(
        "kd,dyx->kyx",
        torch.tensor(centroids),
        F.normalize(paper_pixel_map(feats, layout.origins, layout.resized, SPEC.crop), dim=0),
    ).numpy()
    logits = np.zeros((19, *resized), np.float32)
    for c in set(mapping.tolist()):
        logits[c] = cosine[mapping == c].max(axis=0)
    small = np.asarray(Image.fromarray(image).resize((resized[1], resized[0]), Image.BILINEAR))
    expected = dense_crf(small, logits, alpha=5.0).argmax(axis=0).astype(np.uint8)
    expected = np.asarray(Image.fromarray(expected).resize((256, 128), Image.NEAREST))
    crf_labels = labels.variant("crf").train_ids
    assert (crf_labels == expected).mean() > 0.999


def test_the_baselines_full_size_crf_row_is_the_crf_variant_of_the_baseline_fit():
    rng = np.random.default_rng(11)
    grid = rng.normal(size=(5, 8, 16)).astype(np.float32)
    main, base = (rng.normal(size=(k, 5)).astype(np.float32) for k in (9, 4))
    main, base = (c / np.linalg.norm(c, axis=1, keepdims=True) for c in (main, base))
    baseline = LabelFit("baseline_k4", base, np.array([0, 2, 255, 5]))
    image = rng.integers(0, 255, size=(128, 256, 3), dtype=np.uint8)
    grids = [(grid, (112, 224))]
    labeller = ImageLabeller(
        [LabelFit("k9", main, rng.integers(0, 19, 9)), baseline],
        ["plain"],
        RefineSettings(),
        request=LabelRequest(baseline=True, baseline_labellings=("full+crf",)),
    )
    labels = labeller.label(grids, PATCH, (128, 256), image)
    extra = labels.targets["baseline/full+crf"].train_ids
    alone = ImageLabeller([baseline], ["plain", "crf"], RefineSettings())
    np.testing.assert_array_equal(extra, alone.label(grids, PATCH, (128, 256), image).variant("crf").train_ids)
    assert (extra != labels.variant("baseline_k4").train_ids).any()  # the CRF changed pixels


def test_prototype_denoising_flips_only_patches_far_from_their_class_prototype():
    # 1x3 patch grid of 2-d features; each patch is 2x2 pixels of a 2x6 label map
    features = np.array([[[1.0, 0.0, 0.6]], [[0.0, 1.0, 0.8]]])  # (D=2, 1, 3): patch 2 is (0.6, 0.8)
    prototypes = np.zeros((19, 2))
    prototypes[0], prototypes[1] = (1.0, 0.0), (0.0, 1.0)
    labels = np.repeat(np.repeat(np.array([[0, 0, 0]], np.uint8), 2, axis=0), 2, axis=1)
    out = denoise_by_prototypes(labels, features, prototypes)
    # patch 1: cosine 0 to class 0 (< 0.3) and best is class 1 -> flipped; patch 2: 0.6 to class 0 (>= 0.3) -> kept
    assert out[0].tolist() == [0, 0, 1, 1, 0, 0]


def test_knn_diffusion_spreads_labels_over_the_most_similar_patches():
    rng = np.random.default_rng(10)
    centres = np.array([[1.0, 0, 0], [0, 1.0, 0]])
    which = np.array([0] * 12 + [1] * 12)
    features = (centres[which] + 0.01 * rng.normal(size=(24, 3))).T.reshape(3, 4, 6)
    labels = np.where(which == 0, 2, 7).astype(np.uint8).reshape(4, 6)
    labels[0, 0] = 7  # one wrong patch among the eleven others of its cluster
    out = diffuse_by_neighbours(labels, features, 19)
    expected = np.where(which == 0, 2, 7).reshape(4, 6)
    assert np.array_equal(out, expected)


def test_the_cause_crop_runs_apart_and_comes_back_in_place():
    """Each image's last two windows are CAUSE's crop: the plain pass (whole model under fp16
    autocast, no flip) and the CRF pass (flip-averaged, autocast on the backbone only)."""
    from actors.window_features import WindowFeatures

    cfg = parse_config(
        {
            "protocol": "cause",
            "model": {"vit": {"embed_dim": 32, "depth": 1, "num_heads": 2}},
            "inference": {"short_side": 112, "crop": 112, "stride": 56},
        }
    )
    actor = WindowFeatures(cfg)
    actor.setup()
    plain, flipped = actor.crop_models
    assert (plain.spec.precision, plain.spec.flip, flipped.spec.precision, flipped.spec.flip) == (
        "fp16",
        False,
        "fp16_backbone",
        True,
    )
    assert actor.model.spec.precision == "fp32"
    rng = np.random.default_rng(11)
    windows = [
        rng.integers(0, 255, size=(n, 112, 112, 3), dtype=np.uint8) for n in (4, 0, 3)
    ]  # the middle image failed
    out = actor({"windows": np.array(windows, dtype=object), "image_id": np.array(["a", "b", "c"])})["window_features"]
    # on the CPU autocast does nothing: each pass gives the numbers of the plain model with its flip setting
    unflipped = WindowModel(actor.model.model, replace(actor.model.spec, flip=False))
    for got, w in ((out[0], windows[0]), (out[2], windows[2])):
        np.testing.assert_allclose(got[:-2].astype(np.float32), actor.model(w[:-2]), atol=1e-2)
        np.testing.assert_allclose(got[-2].astype(np.float32), unflipped(w[-2:-1])[0], atol=1e-2)
        np.testing.assert_allclose(got[-1].astype(np.float32), actor.model(w[-1:])[0], atol=1e-2)
    assert out[1].shape[0] == 0


def test_compare_names_each_runs_protocol_and_scores_all_runs_the_same_ways():
    from core.reporting.markdown import render_comparison

    def report(protocol, own, full, scored_pixels=100):
        level = {"miou": own, "per_class_iou": {"road": own}}
        return {
            "protocol": protocol,
            "feature_kind": "head",
            "model": "m",
            "dataset": {"scored_pixels": scored_pixels},
            "fits": {"k300": {"k": 300, "pixel_level": {"same_set": level}}},
            "protocol_sensitivity": {
                "fits": {"k300": {"full/official": {"miou": full}, "resized/paper": {"miou": 0.5}}}
            },
        }

    text = render_comparison({"off": report("official", 0.4, 0.4), "paper": report("paper", 0.45, 0.42)})
    assert "| off | official | head | k300 | 300 | 40.0 | 40.0 | 50.0 |" in text
    assert "| paper | paper | head | k300 | 300 | 45.0 | 42.0 | 50.0 |" in text
    assert "Nothing was scored" not in text
    text = render_comparison({"off": report("official", 0.4, 0.4), "frames": report("official", None, None, 0)})
    assert "Nothing was scored in frames: none of its images has ground truth" in text
