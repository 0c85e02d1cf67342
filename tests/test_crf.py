"""Dense CRF: output shape and normalisation, no-op at 0 iterations, and edge-aware denoising."""

import numpy as np
import pytest

from core.refine.crf import dense_crf, softmax


def _scene(seed=0, h=40, w=60, flip=0.15):
    rng = np.random.default_rng(seed)
    truth = np.zeros((h, w), np.int64)
    truth[:, w // 2 :] = 1
    image = np.where(truth[..., None] == 1, 200, 40).astype(np.uint8).repeat(3, axis=2)
    image = np.clip(image + rng.integers(-5, 6, image.shape), 0, 255).astype(np.uint8)
    noisy = np.where(rng.random((h, w)) < flip, 1 - truth, truth)
    scores = np.stack([noisy == 0, noisy == 1]).astype(np.float32) * 0.3 + rng.normal(0, 0.02, (2, h, w)).astype(
        np.float32
    )
    return image, scores, truth


def test_crf_returns_normalised_probabilities_and_denoises():
    image, scores, truth = _scene()
    q = dense_crf(image, scores)
    assert q.shape == scores.shape and q.dtype == np.float32
    assert np.allclose(q.sum(axis=0), 1.0, atol=1e-4) and (q >= 0).all()
    before = (scores.argmax(0) == truth).mean()
    after = (q.argmax(0) == truth).mean()
    assert before < 0.9 and after > 0.99


def test_zero_iterations_is_the_unary_softmax():
    image, scores, _ = _scene(flip=0.0)
    q = dense_crf(image, scores, iterations=0)
    assert np.allclose(q, softmax(3.0 * scores), atol=1e-5)


def test_crf_checks_shapes():
    image, scores, _ = _scene()
    with pytest.raises(ValueError, match="H, W"):
        dense_crf(image, scores[:, :-1])
    with pytest.raises(ValueError, match="uint8"):
        dense_crf(image.astype(np.float32), scores)


def test_read_only_image_is_accepted():
    image = np.zeros((8, 8, 3), np.uint8)
    image.flags.writeable = False  # as numpy views of PIL images are
    scores = np.zeros((2, 8, 8), np.float32)
    scores[0, :, :4] = 1.0
    probs = dense_crf(image, scores, iterations=1)
    assert probs.shape == (2, 8, 8)
