"""Dense CRF post-processing (Kraehenbuehl & Koltun), as CAUSE / STEGO apply it at test time.

CAUSE passes `log_softmax(3 * cosine)` to its `dense_crf`, which takes a softmax of it again
(= softmax(3 * cosine)) and sets the unary to `-log(max(p, 1e-5))` (pydensecrf's
`unary_from_softmax`); pairwise terms: Gaussian sxy=1 compat=3, bilateral sxy=67 srgb=3
compat=4; 10 mean-field iterations. CAUSE feeds the image as BGR; the bilateral kernel treats the
three channels alike (one shared srgb), so RGB gives the same result.
Needs `pydensecrf2` (imports as `pydensecrf`); it is imported on first use, so the rest of the
project works without it.
"""

import numpy as np


def softmax(logits: np.ndarray, axis: int = 0) -> np.ndarray:
    z = logits - logits.max(axis=axis, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=axis, keepdims=True)


def dense_crf(
    image: np.ndarray,
    scores: np.ndarray,
    alpha: float = 3.0,
    iterations: int = 10,
    gaussian_sxy: float = 1.0,
    gaussian_compat: float = 3.0,
    bilateral_sxy: float = 67.0,
    bilateral_srgb: float = 3.0,
    bilateral_compat: float = 4.0,
) -> np.ndarray:
    """Refined (C, H, W) float32 class probabilities.

    image: (H, W, 3) uint8 RGB. scores: (C, H, W) cosine similarities (or any logits) at the
    image's resolution (upsample first); the unary is -log softmax(alpha * scores), clipped at
    p = 1e-5. Pass alpha=1 for logits that are already scaled.
    """
    try:
        import pydensecrf.densecrf as dcrf
        from pydensecrf.utils import unary_from_softmax
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("dense CRF needs pydensecrf2: pip install pydensecrf2==1.1") from err
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"image must be (H, W, 3) uint8, got {image.shape} {image.dtype}")
    if scores.ndim != 3 or scores.shape[1:] != image.shape[:2]:
        raise ValueError(f"scores must be (C, H, W) with the image's H, W {image.shape[:2]}, got {scores.shape}")
    c, h, w = scores.shape
    if c < 2:
        raise ValueError(f"a CRF needs at least 2 classes, got {c}")
    probs = softmax(alpha * scores.astype(np.float32), axis=0)
    unary = np.ascontiguousarray(unary_from_softmax(probs), dtype=np.float32)  # (C, H*W)
    crf = dcrf.DenseCRF2D(w, h, c)
    crf.setUnaryEnergy(unary)
    crf.addPairwiseGaussian(sxy=gaussian_sxy, compat=gaussian_compat)
    crf.addPairwiseBilateral(
        sxy=bilateral_sxy, srgb=bilateral_srgb, rgbim=np.array(image, order="C"), compat=bilateral_compat
    )
    q = np.asarray(crf.inference(iterations), dtype=np.float32)
    return q.reshape(c, h, w)
