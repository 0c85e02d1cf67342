import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import ndimage

from core.labelling.assign import PixelAssigner, bilinear_weights, clusters_to_train_ids
from core.labelling.maps import subsample
from core.mapping.majority import cluster_class_counts


def test_bilinear_weights_match_torch_interpolate():
    grid = torch.randn(1, 1, 5, 3)
    ours = bilinear_weights(20, 5, 5 / 20) @ grid[0, 0] @ bilinear_weights(12, 3, 3 / 12).T
    ref = F.interpolate(grid, size=(20, 12), mode="bilinear", align_corners=False)[0, 0]
    assert torch.allclose(ours, ref, atol=1e-6)


def test_nearest_centroid_per_pixel_for_two_fits():
    # A 1x2 patch grid (patch 2 px): left patch along e0, right along e1; a 2x4 image.
    features = np.array([[[1.0, 0.0]], [[0.0, 1.0]]])  # (D=2, 1, 2)
    fit_a = np.array([[1.0, 0.0], [0.0, 1.0]])
    fit_b = np.array([[0.0, 1.0], [1.0, 0.0], [-1.0, 0.0]])
    maps, logits = PixelAssigner([fit_a, fit_b]).assign(
        [(features, (2, 4))], patch_size=2, image_hw=(2, 4), first_fit_mapping=np.array([1, 1]), num_classes=2
    )
    assert maps[0].tolist() == [[0, 0, 1, 1], [0, 0, 1, 1]]
    assert maps[1].tolist() == [[1, 1, 0, 0], [1, 1, 0, 0]]
    # Both clusters of fit a map to class 1: its logit is the better cosine, class 0 has none (-1).
    assert (
        logits.shape == (3, 2, 4)
        and (logits[1] > 0.9).all()
        and np.allclose(logits[1][:, [0, 3]], 1.0)
        and np.allclose(logits[0], -1.0)
    )
    assert np.allclose(logits[2], -1.0)


def test_scales_average_scores():
    # Scale 1 says cluster 0 weakly, scale 2 says cluster 1 strongly: the average picks cluster 1.
    centroids = np.array([[1.0, 0.0], [0.0, 1.0]])
    weak = np.array([[[0.6]], [[0.5]]])  # cosine 0.77 / 0.64
    strong = np.array([[[0.0]], [[1.0]]])  # cosine 0 / 1
    maps, _ = PixelAssigner([centroids]).assign([(weak, (2, 2)), (strong, (2, 2))], patch_size=2, image_hw=(2, 2))
    assert (maps[0] == 1).all()


def test_cluster_class_counts_and_train_ids():
    cluster_map = np.array([[0, 1], [1, 2]])
    gt = np.array([[3, 3], [255, 0]], dtype=np.uint8)
    counts = cluster_class_counts(cluster_map, gt, k=3, num_classes=4)
    expected = np.zeros((3, 4), np.int64)
    expected[0, 3] = expected[1, 3] = expected[2, 0] = 1
    assert np.array_equal(counts, expected)
    mapping = np.array([3, 255, 0])
    assert clusters_to_train_ids(cluster_map, mapping).tolist() == [[3, 255], [255, 0]]


def test_equals_upsample_normalise_cosine_done_naively():
    rng = np.random.default_rng(0)
    features = rng.normal(size=(6, 3, 5))  # (D, gh, gw), grid overhangs a 40x66 resized image
    centroids = rng.normal(size=(7, 6))
    centroids /= np.linalg.norm(centroids, axis=1, keepdims=True)
    (ours,), _ = PixelAssigner([centroids]).assign([(features, (40, 66))], patch_size=14, image_hw=(30, 50))
    up = (
        bilinear_weights(30, 3, 40 / 30 / 14).double()
        @ torch.from_numpy(features)
        @ bilinear_weights(50, 5, 66 / 50 / 14).double().T
    ).numpy()  # (D, 30, 50)
    pixels = up.reshape(6, -1).T
    naive = (pixels / np.linalg.norm(pixels, axis=1, keepdims=True)) @ centroids.T
    assert np.array_equal(ours.ravel(), naive.argmax(axis=1))


def _naive_scores(features, centroids, resized, patch, hw):
    """Upsample the features to every pixel (float64), then dot with every centroid: (H, W, k)."""
    _, gh, gw = features.shape
    up = (
        bilinear_weights(hw[0], gh, resized[0] / hw[0] / patch).double()
        @ torch.from_numpy(features).double()
        @ bilinear_weights(hw[1], gw, resized[1] / hw[1] / patch).double().T
    )
    return torch.einsum("dhw,kd->hwk", up, torch.from_numpy(centroids).double()).numpy()


@pytest.mark.parametrize("smooth", [0.0, 1.5])
@pytest.mark.parametrize("stride", [1, 3])
def test_envelope_assignment_equals_scoring_every_cluster_at_every_pixel(smooth, stride):
    """One scale takes the envelope path, which scores the k clusters only at crossings; it must
    pick the same cluster as scoring all k at every pixel (up to float near-ties), at any stride."""
    rng = np.random.default_rng(int(10 * smooth) + stride)
    features = rng.normal(size=(16, 9, 17))
    if smooth:  # neighbouring patches alike, as in real images: long runs of one winner
        features = ndimage.gaussian_filter(features, (0, smooth, smooth))
    features = features.astype(np.float32)
    fits = [rng.normal(size=(k, 16)) for k in (60, 7)]
    fits = [(c / np.linalg.norm(c, axis=1, keepdims=True)).astype(np.float32) for c in fits]
    hw, resized = (181, 333), (126, 238)
    maps, _ = PixelAssigner(fits, strides=[stride, 1]).assign([(features, resized)], 14, hw)
    for cluster_map, centroids, s in zip(maps, fits, (stride, 1)):
        scores = subsample(_naive_scores(features, centroids, resized, 14, hw), s)
        assert cluster_map.shape == scores.shape[:2]
        chosen = np.take_along_axis(scores, cluster_map[..., None].astype(np.int64), 2)[..., 0]
        assert (scores.max(axis=2) - chosen).max() < 1e-5  # never a worse cluster, beyond rounding
        assert (cluster_map == scores.argmax(axis=2)).mean() > 0.9999


def test_a_stride_beyond_the_image_still_scores_one_pixel():
    rng = np.random.default_rng(2)
    features = rng.normal(size=(4, 2, 3)).astype(np.float32)
    centroids = rng.normal(size=(5, 4)).astype(np.float32)
    centroids /= np.linalg.norm(centroids, axis=1, keepdims=True)
    (sparse, full), _ = PixelAssigner([centroids, centroids], strides=[300, 1]).assign(
        [(features, (28, 42))], 14, (20, 30)
    )
    assert sparse.shape == subsample(full, 300).shape == (1, 1) and sparse[0, 0] == subsample(full, 300)[0, 0]


def test_envelope_handles_three_winners_in_one_band():
    """Two patch rows; a, b and c each win a third of the band down the column: c never wins
    at a patch centre, so only the check at the crossing finds it."""
    features = np.array([[[1.0]], [[0.0]]], np.float32).repeat(2, axis=1)  # (D=2, 2, 1)
    features[:, 1, 0] = (0.0, 1.0)
    centroids = np.array([[1.0, 0.0], [0.0, 1.0], [0.8, 0.8]], np.float32)  # a, b, and c in between
    centroids /= np.linalg.norm(centroids, axis=1, keepdims=True)
    ((cluster_map,), _) = PixelAssigner([centroids]).assign([(features, (28, 14))], 14, (60, 1))
    assert set(np.unique(cluster_map)) == {0, 1, 2}
    scores = _naive_scores(features, centroids, (28, 14), 14, (60, 1))
    assert np.array_equal(cluster_map, scores.argmax(axis=2))


def test_the_same_grid_at_every_scale_gives_the_single_scale_answer():
    rng = np.random.default_rng(5)
    features = rng.normal(size=(12, 4, 7)).astype(np.float32)
    centroids = rng.normal(size=(30, 12))
    centroids /= np.linalg.norm(centroids, axis=1, keepdims=True)
    assigner = PixelAssigner([centroids])
    (single,), _ = assigner.assign([(features, (56, 98))], 14, (45, 80))
    (repeated,), _ = assigner.assign([(features, (56, 98))] * 3, 14, (45, 80))
    assert np.array_equal(single, repeated)
