"""core.refine: CLUSTSEG-style EM refinement (semantic, thing and superpixel modes)."""

import numpy as np
import pytest
import torch

from core.classes import IGNORE
from core.labelling.assign import PixelAssigner, bilinear_weights
from core.panoptic import panoptic_from_train_ids
from core.refine.em import em_refine, em_step, refine_semantic, soft_kmeans_objective
from core.refine.superpixels import _superpixel_em, _superpixel_input, refine_labels_by_superpixels, superpixels
from core.refine.things import split_things

# ---- one EM step by hand ---------------------------------------------------------------------
# 3 points, 2 centres, tau = 0.5. The numbers below were computed separately with Python's math
# module (exp / sum for A, weighted sums, hypot for the norm), not with core.refine.
X3 = np.array([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
C2 = np.array([[1.0, 0.0], [0.0, 1.0]])
A_HAND = np.array(
    [
        [0.8807970779778824, 0.11920292202211755],
        [0.11920292202211755, 0.8807970779778824],
        [0.401312339887548, 0.598687660112452],
    ]
)
C_COSINE_HAND = np.array(
    [
        [0.9308558745641076, 0.3653865635043116],  # normalise(A^T X)
        [0.3318975355149412, 0.9433154434859573],
    ]
)
C_MEAN_HAND = np.array(
    [
        [0.8003815066671116, 0.3141717812657564],  # A^T X / column sums
        [0.2992551516009931, 0.8505396269664077],
    ]
)
L0_HAND = -3.1834356372429493  # -tau * sum_n log sum_k exp(x.c / tau) at C2


def test_one_em_step_by_hand():
    centres, a = em_step(X3, C2, tau=0.5, metric="cosine")
    np.testing.assert_allclose(a, A_HAND, rtol=1e-12)
    np.testing.assert_allclose(centres, C_COSINE_HAND, rtol=1e-12)
    assert soft_kmeans_objective(X3, C2, 0.5) == pytest.approx(L0_HAND, rel=1e-12)
    assert soft_kmeans_objective(X3, centres, 0.5) <= L0_HAND
    # Euclidean: unit points and centres give the same softmax; the M-step is the plain mean.
    centres_e, a_e = em_step(X3, C2, tau=0.5, metric="euclidean")
    np.testing.assert_allclose(a_e, A_HAND, rtol=1e-12)
    np.testing.assert_allclose(centres_e, C_MEAN_HAND, rtol=1e-12)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize(
    "metric,prior_mass", [("cosine", 0.0), ("cosine", 2.0), ("euclidean", 0.0), ("euclidean", 2.0)]
)
def test_objective_never_increases(seed, metric, prior_mass):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((200, 6)) + 2 * np.eye(6)[rng.integers(0, 3, 200)]
    c0 = rng.standard_normal((7, 6))
    if metric == "cosine":
        c0 = c0 / np.linalg.norm(c0, axis=1, keepdims=True)
    tau = [0.05, 0.2, 1.0, 0.5][seed]
    c, values = c0, [soft_kmeans_objective(x, c0, tau, metric, c0, prior_mass)]
    for _ in range(8):
        c, _ = em_step(x, c, tau, metric, anchor=c0, prior_mass=prior_mass)
        values.append(soft_kmeans_objective(x, c, tau, metric, c0, prior_mass))
    steps = np.diff(values)
    assert (steps <= 1e-9 * np.abs(values[:-1])).all(), values
    assert values[-1] < values[0]
    # em_refine is the same iteration.
    c_ref, a = em_refine(x, c0, tau, 8, metric, prior_mass=prior_mass)
    np.testing.assert_allclose(c_ref, c, atol=1e-12)
    np.testing.assert_allclose(a.sum(1), 1.0)


def test_unnormalised_mean_is_not_the_cosine_m_step():
    """Why the cosine M-step renormalises: the plain weighted mean can raise the objective."""
    centres, a = em_step(X3, C2, tau=0.5)
    mean = (a.T @ X3) / a.sum(0)[:, None]
    assert np.allclose(mean, C_MEAN_HAND)

    # Scored as it stands (x.c / tau with |c| < 1), the mean *raises* L above its starting value,
    # while the renormalised step lowers it: without renormalisation EM is not monotone here.
    def objective(c):
        return -0.5 * np.log(np.exp(X3 @ c.T / 0.5).sum(1)).sum()

    assert objective(mean) > L0_HAND > objective(centres)


def test_t0_returns_inputs_unchanged():
    rng = np.random.default_rng(0)
    c = rng.standard_normal((4, 3)).astype(np.float32)
    out, a = em_refine(rng.standard_normal((10, 3)), c, 0.1, T=0)
    assert out.dtype == np.float32 and out.tobytes() == c.tobytes() and out is not c
    assert a.shape == (10, 4)


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
def test_empty_clusters_keep_their_centre_without_nan(metric):
    x = np.array([[1.0, 0.0], [0.9, 0.1], [0.95, -0.05]])
    c = np.array([[1.0, 0.0], [-1.0, 0.0], [0.0, -1.0]])  # clusters 1 and 2 far from every point
    out, a = em_refine(x, c, tau=1e-3, T=3, metric=metric)  # exp underflows: mass exactly 0
    assert np.isfinite(out).all() and np.isfinite(a).all()
    assert a[:, 1:].sum() == 0
    np.testing.assert_array_equal(out[1:], c[1:])
    # min_mass: a cluster with a little mass also stays put.
    out, _ = em_refine(x, c, tau=0.5, T=2, metric=metric, min_mass=10.0)
    np.testing.assert_array_equal(out, c)


# ---- semantic mode ---------------------------------------------------------------------------


def _semantic_case(seed=0, k=30, d=16, num_classes=5):
    rng = np.random.default_rng(seed)
    centroids = rng.standard_normal((k, d)).astype(np.float32)
    centroids /= np.linalg.norm(centroids, axis=1, keepdims=True)
    mapping = rng.integers(0, num_classes, k).astype(np.uint8)
    mapping[:3] = IGNORE
    mapping[mapping == 2] = 3  # class 2 has no cluster: -inf channel
    features = (
        centroids[rng.integers(0, k, 12 * 20)].T.reshape(d, 12, 20) + 0.3 * rng.standard_normal((d, 12, 20))
    ).astype(np.float32) * 4.0
    return features, centroids, mapping, num_classes


def test_semantic_t0_equals_baseline_exactly():
    features, centroids, mapping, nc = _semantic_case()
    assert refine_semantic(features, centroids, mapping, T=0, num_classes=nc).tobytes() == centroids.tobytes()


def test_semantic_refinement_adapts_present_clusters_only():
    features, centroids, mapping, nc = _semantic_case()
    shift = np.random.default_rng(5).standard_normal(features.shape[0]).astype(np.float32)
    features = features + shift[:, None, None]  # an image-level feature shift
    refined = refine_semantic(features, centroids, mapping, tau=0.05, T=3, min_mass=1.0, num_classes=nc)
    assert refined.shape == centroids.shape and refined.dtype == np.float32 and np.isfinite(refined).all()
    np.testing.assert_allclose(np.linalg.norm(refined, axis=1), 1.0, atol=1e-5)
    x = features.reshape(features.shape[0], -1).T

    def obj(c):
        return soft_kmeans_objective(x, c, 0.05)

    assert obj(refined) < obj(centroids)
    moved = np.abs(refined - centroids).max(1) > 0
    assert moved.any() and not moved.all()  # clusters absent from the image keep their global centre
    frozen = refine_semantic(features, centroids, mapping, T=3, adapt_unassigned=False, num_classes=nc)
    np.testing.assert_array_equal(frozen[mapping == IGNORE], centroids[mapping == IGNORE])
    (labels,), _ = PixelAssigner([refined]).assign([(features, (12 * 4, 20 * 4))], 4, (48, 80))
    assert labels.shape == (48, 80) and labels.max() < len(centroids)


def test_semantic_pixel_assigner_t0():
    features, centroids, mapping, nc = _semantic_case()
    refined = refine_semantic(features, centroids, mapping, T=0, num_classes=nc)
    grid = [(features, (12 * 4, 20 * 4))]
    base = PixelAssigner([centroids]).assign(grid, 4, (48, 80))[0]
    again = PixelAssigner([refined]).assign(grid, 4, (48, 80))[0]
    np.testing.assert_array_equal(base, again)


# ---- thing mode ------------------------------------------------------------------------------

CAR = 13


def _blob_scene(two_cars: bool, seed=0, d=8, h=24, w=40):
    """Patch-grid scene: road (feature e0) with one car region (rows 6..17, cols 4..35) that is
    either two touching cars (e1 left of col 20, e2 right) or one car (e1)."""
    rng = np.random.default_rng(seed)
    ids = np.zeros((h, w), np.uint8)
    ids[6:18, 4:36] = CAR
    feat = np.zeros((h, w), int)
    feat[6:18, 4:36] = 1
    if two_cars:
        feat[6:18, 20:36] = 2
    features = np.eye(d)[feat].transpose(2, 0, 1) + 0.05 * rng.standard_normal((d, h, w))
    return features, ids, feat


def _same_partition(a, b):
    """a, b label maps: equal up to renaming the labels."""
    pairs = np.unique(np.stack([a.ravel(), b.ravel()]), axis=1)
    return len(np.unique(pairs[0])) == pairs.shape[1] == len(np.unique(pairs[1]))


def test_split_things_two_touching_cars_and_one_car():
    features, ids, feat = _blob_scene(two_cars=True)
    inst = split_things(features, ids, min_area=10)
    assert inst.dtype == np.int32 and set(np.unique(inst)) == {0, 1, 2}
    assert _same_partition(inst, feat)
    features, ids, feat = _blob_scene(two_cars=False)
    inst = split_things(features, ids, min_area=10)
    assert set(np.unique(inst)) == {0, 1} and _same_partition(inst, feat)


def test_split_things_full_resolution_map_with_patch_features():
    features, ids, feat = _blob_scene(two_cars=True)
    ids_full = np.kron(ids, np.ones((4, 4), np.uint8))  # (96, 160) map, features at the (24, 40) grid
    feat_full = np.kron(feat, np.ones((4, 4), int))
    inst = split_things(features, ids_full)  # defaults: min_area = one patch cell = 16 px
    assert set(np.unique(inst)) == {0, 1, 2}
    assert ((inst > 0) == (ids_full == CAR)).all()
    for car in (1, 2):  # each true car is (almost) one instance
        values, counts = np.unique(inst[feat_full == car], return_counts=True)
        assert counts.max() / counts.sum() > 0.97


def test_split_things_small_regions_and_components():
    features, ids, _ = _blob_scene(two_cars=False)
    ids[0:2, 0:2] = CAR  # a 4-pixel car: below min_area -> 0
    ids[20:23, 0:10] = 11  # a person region elsewhere, its own instance
    ids[20:23, 30:33] = 2  # building: not a thing
    features[:, 20:23, 0:10] = np.eye(8)[3][:, None, None]
    inst = split_things(features, ids, min_area=10)
    assert (inst[0:2, 0:2] == 0).all() and (inst[20:23, 30:33] == 0).all()
    assert len(np.unique(inst[20:23, 0:10])) == 1 and inst[20, 0] > 0
    assert set(np.unique(inst)) == {0, 1, 2}
    # max_instances=1 falls back to connected components (with the area filter).
    features2, ids2, _ = _blob_scene(two_cars=True)
    assert set(np.unique(split_things(features2, ids2, max_instances=1, min_area=10))) == {0, 1}


def test_split_things_t0_assigns_to_seeds():
    features, ids, feat = _blob_scene(two_cars=True)
    inst = split_things(features, ids, T=0, min_area=10)
    assert _same_partition(inst, feat)


# ---- superpixel mode -------------------------------------------------------------------------


def _two_colour_scene(seed=0, h=48, w=64, edge=30):
    rng = np.random.default_rng(seed)
    image = np.where(np.arange(w)[None, :, None] < edge, [200, 60, 50], [60, 80, 190]) * np.ones((h, 1, 1))
    image = np.clip(image + rng.normal(0, 4, image.shape), 0, 255).astype(np.uint8)
    # 8-pixel patches: the patch whose centre is left of the edge gets the left feature.
    centres = np.arange(w // 8) * 8 + 3.5
    feat = np.where(centres < edge, 0, 1)
    features = np.eye(4)[np.broadcast_to(feat, (h // 8, w // 8))].transpose(2, 0, 1)
    truth = np.where(np.arange(w)[None, :] < edge, 0, 1) * np.ones((h, 1), np.uint8)
    return image, features, truth.astype(np.uint8)


def test_superpixels_follow_the_colour_edge():
    image, features, truth = _two_colour_scene()
    sp = superpixels(features, image, step=8)
    assert sp.shape == truth.shape and sp.dtype == np.int32
    assert sp.min() == 0 and sp.max() == len(np.unique(sp)) - 1
    pairs = np.unique(np.stack([sp.ravel(), truth.ravel()]), axis=1)
    assert len(np.unique(pairs[0])) == pairs.shape[1]  # no superpixel straddles the edge


@pytest.mark.parametrize("shift", [-3, 3])
def test_superpixel_refinement_fixes_an_offset_boundary(shift):
    image, features, truth = _two_colour_scene()
    sp = superpixels(features, image, step=8)
    x = np.arange(truth.shape[1])[None, :] * np.ones((truth.shape[0], 1))
    boundary = 30 + shift  # the coarse labels put the edge a few pixels off
    logits = np.stack([(boundary - 0.5 - x) / 10, (x - boundary + 0.5) / 10, np.full(x.shape, -np.inf)])
    coarse = logits[:2].argmax(0).astype(np.uint8)
    assert (coarse != truth).sum() == 3 * truth.shape[0]
    fixed = refine_labels_by_superpixels(logits, sp, num_classes=2)
    np.testing.assert_array_equal(fixed, truth)
    np.testing.assert_array_equal(refine_labels_by_superpixels(coarse, sp), truth)  # majority of trainIds
    np.testing.assert_array_equal(refine_labels_by_superpixels(torch.from_numpy(logits), sp, num_classes=2), truth)


def test_superpixel_refinement_resizes_the_map_and_marks_unassigned():
    image, features, truth = _two_colour_scene()
    sp = superpixels(features, image, step=8)
    big = np.kron(truth, np.ones((2, 2), np.uint8))
    logits = np.stack([np.zeros(big.shape), np.full(big.shape, -np.inf), (big == 1).astype(float)])
    out = refine_labels_by_superpixels(logits, sp, num_classes=2)  # channel 2 = unassigned
    np.testing.assert_array_equal(out, np.where(big == 1, IGNORE, 0))


def test_superpixel_em_objective_never_increases():
    image, features, _ = _two_colour_scene(seed=3)
    zb, mb = _superpixel_input(features, image, 8, 0.5, 3.0, 1.0, None, None)
    _, centres, history = _superpixel_em(zb.astype(np.float64), mb.astype(np.float64), 0.05, 6)
    assert np.isfinite(centres).all()
    assert (np.diff(history) <= 1e-9 * np.abs(history[:-1])).all(), history
    # Ragged sizes (padding) and colour-only mode work too.
    sp = superpixels(None, image[:45, :61], step=8, T=2)
    assert sp.shape == (45, 61) and np.isfinite(sp).all()


def test_feature_sampling_matches_the_labelling_convention():
    from core.refine.em import (
        grid_scale as _grid_scale,
    )
    from core.refine.em import (
        sample_features as _sample_features,
    )
    from core.refine.em import (
        upsample_features as _upsample_features,
    )

    rng = np.random.default_rng(0)
    features = rng.standard_normal((5, 4, 6)).astype(np.float32)
    image_hw, resized_hw, patch = (30, 50), (20, 33), 6  # the grid overhangs the resized image
    up = _upsample_features(features, image_hw, resized_hw, patch)  # (H, W, D)
    ys, xs = np.nonzero(np.ones(image_hw, bool))
    scale = _grid_scale(image_hw, (4, 6), resized_hw, patch)
    np.testing.assert_allclose(_sample_features(features, ys, xs, scale).reshape(up.shape), up, atol=1e-5)
    wy = bilinear_weights(30, 4, 20 / 30 / patch).numpy()
    wx = bilinear_weights(50, 6, 33 / 50 / patch).numpy()
    np.testing.assert_allclose(np.einsum("hg,dgk,wk->hwd", wy, features, wx), up, atol=1e-5)
    # Same map and grid size: exact patch values.
    np.testing.assert_array_equal(_upsample_features(features, (4, 6)), features.transpose(1, 2, 0))


def test_split_things_feeds_the_panoptic_builder():
    features, ids, feat = _blob_scene(two_cars=True)
    inst = split_things(features, ids, min_area=10)
    pan = panoptic_from_train_ids(ids, instances=inst)
    base = panoptic_from_train_ids(ids)  # connected components: one car
    assert (np.asarray(pan.category) == CAR).sum() == 2 and (np.asarray(base.category) == CAR).sum() == 1
