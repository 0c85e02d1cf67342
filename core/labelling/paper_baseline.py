"""The paper's own labelling of the CAUSE baseline (mbps_pytorch/generate_semantic_pseudolabels_cause.py),
single-scale and multi-scale, with and without its CRF: the rows of the paper's multi-scale table.

Unlike the overclustered labels (core.labelling.assign.window_cluster_maps, which average the windows'
*features*), this script averages each window's *cluster log-probabilities*:
  - per scale s, the image is stretched PIL-bilinear to max(322, round(side * 322 / short * s)
    // 14 * 14) per side (1024x2048: 0.75 -> 322x476, 1.0 -> 322x644, 1.5 -> 476x966), no padding;
  - 322 windows at range(0, side - 322, 161) plus side - 322 along each axis;
  - per window (flip-averaged 90-d map): log_softmax(3 * cosine) over the centroids on its
    23x23 patches, upsampled bilinearly to 322x322, and averaged per pixel where windows overlap;
  - each scale's map resized bilinearly to the 1.0-scale size (322x644), the scales averaged;
  - argmax, or the CRF on softmax(3 * merged) with the image resized PIL-bilinear to that size;
    the cluster -> class mapping, then PIL NEAREST up to the image size.
Every step before the argmax is linear in the log-probabilities, so each window's map is two
small matrices (core.inference.windows.layout_axis_weights, then the resize to the common size).

The paper maps its 27 clusters with a Hungarian matching to the 27 CAUSE classes on 322 centre
crops and then a fixed 27 -> 19 table; here the baseline keeps the mapping it has everywhere
else (Hungarian to the 19 trainIds over the patch counts), so these rows differ from the
baseline's other rows only in how the pixels are labelled.

A scale stretched to exactly one 322x322 window takes the script's shortcut: its 23x23 patch
logits are resized to the common size directly (one scale: kept at 23x23, argmax, NEAREST up).
There the script's CRF would pair 23x23 logits with a 322x322 image; here the image is resized to
23x23. The logits are computed in fp32 from fp16-stored features (CAUSE's test_without_crf runs
the cosine under autocast too: at most ties differ).
"""

import numpy as np
import torch

from core.image_ops import resize_nearest
from core.inference.paper_windows import is_one_window
from core.inference.windows import ScaleLayout, bilinear_upsample_weights, layout_axis_weights, resize_rgb
from core.refine.crf import dense_crf

LOG_SOFTMAX_SCALE = 3.0  # CAUSE's Cluster.forward_centroid(crf=True): log_softmax(3 * cosine)


def merged_log_probs(
    scale_windows: list[tuple[np.ndarray, ScaleLayout]],
    centroids: np.ndarray,
    crop: int,
    patch: int,
    common_hw: tuple[int, int],
) -> np.ndarray:
    """Per scale (window features (N, D, g, g), its layout) + (k, D) unit centroids -> (k, h, w)
    float32: the scales' window-averaged log_softmax(3 * cosine), resized to common_hw, averaged."""
    units = torch.from_numpy(np.array(centroids, np.float32))
    merged = torch.zeros((len(units), *common_hw))
    for windows, layout in scale_windows:
        feats = torch.nn.functional.normalize(torch.from_numpy(np.asarray(windows, np.float32)), dim=1)
        log_probs = torch.log_softmax(LOG_SOFTMAX_SCALE * torch.einsum("ndyx,kd->nkyx", feats, units), dim=1)
        if is_one_window(layout, crop):  # the script's shortcut: the (g, g) patch logits, not upsampled to the window
            rows = cols = [np.eye(crop // patch)]
            size = (crop // patch, crop // patch)
        else:
            rows, cols = layout_axis_weights(layout, crop, patch)
            size = layout.resized
        to_common = [torch.from_numpy(bilinear_upsample_weights(c, n)).float() for c, n in zip(common_hw, size)]
        for lp, wy, wx in zip(log_probs, rows, cols):
            a, b = to_common[0] @ torch.from_numpy(wy).float(), to_common[1] @ torch.from_numpy(wx).float()
            merged += torch.einsum("yi,kij,xj->kyx", a, lp, b)
    return (merged / len(scale_windows)).numpy()


def paper_baseline_labels(
    log_probs: np.ndarray, mapping: np.ndarray, image_hw: tuple[int, int], image: np.ndarray | None = None
) -> np.ndarray:
    """(k, h, w) merged log-probabilities -> (H, W) uint8 trainIds: argmax (or, given the image,
    the CRF on softmax(3 * log-probabilities)), mapped, NEAREST up."""
    if image is None:
        clusters = log_probs.argmax(axis=0)
    else:
        clusters = dense_crf(resize_rgb(image, log_probs.shape[1:]), log_probs, alpha=LOG_SOFTMAX_SCALE).argmax(axis=0)
    return resize_nearest(np.asarray(mapping)[clusters].astype(np.uint8), image_hw)
