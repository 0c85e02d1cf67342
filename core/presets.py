"""Protocol presets: which variant of each step before and after the model a run uses.

The same weights give different numbers under the official Cityscapes pipeline, the paper's
scripts and CAUSE's test code (docs/protocols.md). A preset names the variant of
every step that differs; each variant is one small function or an option of one, chosen here:

  step              official (default)                   paper (qbit-glitch/.../mbps_pytorch)
  window merge      7 px cells, pooled to patches        each window upsampled to pixels, averaged,
                                                         adaptive-average-pooled to patches
  patch labels      majority of the patch's valid pixels one NEAREST sample per patch
  precision         inference.precision                  fp32
  k-means           fit.engine on a per-image sample     MiniBatchKMeans(batch 10000, max_iter 300,
                                                         n_init 3, random_state 42) on each image's
                                                         labelled patches (<= 2000, drawn by one
                                                         RandomState(42) stream) in dataset order;
                                                         mapping by Euclidean predict to the
                                                         unnormalised centres
  pixel labels      at full resolution                   at the resized size (322x644) from the
                                                         windows' pixel map, NEAREST up
  patch-level mIoU  mean over the classes present        mean over all 19 classes, an absent class
                                                         counting 0 (overclustering_cause.py)

`cause` adds CAUSE's test protocol (test_tr.py) for the baseline and changes nothing else: each
image is also resized NEAREST (short side 322) and centre-cropped to one 322x322 window, run as
CAUSE's two test passes run it (actors.window_features; autocast only on CUDA): test_without_crf's
unflipped, the whole model under fp16 autocast, and test's flip-averaged, the backbone under fp16
autocast and the head in fp32. The baseline's centroids label that crop by cosine (bilinear
upsampling, per-pixel normalisation). It is scored
as CAUSE scores: 27 classes (labelIds 7..33), one Hungarian matching over the whole
(cluster x class) pixel table of the crops, mIoU over the 27 (the unflipped pass); and again
after CAUSE's CRF (27-way log_softmax(3 * cosine) of the flip-averaged pass, the image rebuilt from
the normalised tensor) (core.evaluation.cause).

The paper preset follows generate_overclustered_semantics.py, the script that makes the paper's
pixel labels. Its patch-level sweep (overclustering_cause.py) subsamples the same rows to 500,000
with an unseeded np.random.choice, so it cannot be repeated exactly. Two small differences
remain: a pixel takes its nearest cluster's class, while the paper takes the argmax of class
logits in which a class with no cluster scores 0 (they differ only where every centroid's
cosine is negative); and the paper's mapping sends a cluster with no labelled patch to class 0,
ours to the most frequent class. The paper's resize (short side to 322, each side rounded down
to a multiple of 14, stretched) equals ours wherever that is exact, e.g. 1024x2048 -> 322x644.

Under the paper preset `refine.crf` is the paper's CRF (softmax(5 * class logits) at 322x644,
NEAREST up: core.labelling.variants). The paper labels its overclusters at one scale; its multi-scale scheme
belongs to its CAUSE-baseline script, so under this preset the baseline is also labelled that way
(core.labelling.paper_baseline: windows' log_softmax(3 * cosine) averaged, on one scale and on
inference.scales at the paper's sizes, each also with its CRF under refine.crf) while the fits
use 1.0 only.
The refinements beyond the paper (em_*, superpixels) work on the full-resolution features under
every preset.

Scoring is not part of a preset: every run scores its labels under each evaluator (official
cityscapesscripts rules and the paper's 512x1024 evaluator) in the report's protocol sensitivity
table, so one run shows what each scoring choice is worth.
"""

from dataclasses import dataclass

PROTOCOLS = ("official", "paper", "cause")


@dataclass(frozen=True)
class ProtocolSteps:
    merge: str  # "cells" | "pixels" (core.inference.windows.stitch_windows)
    patch_labels: str  # "majority" | "nearest" (core.evaluation.metrics.patch_majority_labels, patch_nearest_labels)
    precision: str | None  # None: the config's inference.precision
    kmeans: str  # "config" (fit.engine and its sample) | "paper" (core.clustering.kmeans.fit_paper_minibatch)
    label_resolution: str  # "full" | "resized" (core.labelling.image.LABELLINGS)
    cause_crop: bool = (
        False  # also run CAUSE's test view (core.inference.windows.cause_view) and score the baseline on it
    )
    patch_miou: str = (
        "present"  # how the fit's patch-level mIoU averages the classes (core.evaluation.metrics.MIOU_RULES)
    )


PRESETS = {
    "official": ProtocolSteps(
        merge="cells", patch_labels="majority", precision=None, kmeans="config", label_resolution="full"
    ),
    "paper": ProtocolSteps(
        merge="pixels",
        patch_labels="nearest",
        precision="fp32",
        kmeans="paper",
        label_resolution="resized",
        patch_miou="all",
    ),
    "cause": ProtocolSteps(
        merge="cells",
        patch_labels="majority",
        precision=None,
        kmeans="config",
        label_resolution="full",
        cause_crop=True,
    ),
}


def protocol_steps(protocol: str) -> ProtocolSteps:
    if protocol not in PRESETS:
        raise ValueError(f"unknown protocol {protocol!r}; allowed: {', '.join(PRESETS)}")
    return PRESETS[protocol]
