"""Protocol presets: which variant of each step before and after the model a run uses.

The same weights give different numbers under the official Cityscapes pipeline, the seed's
scripts and CAUSE's test code (DESIGN.md, "Evaluation protocols"). A preset names the variant of
every step that differs; each variant is one small function or an option of one, chosen here:

  step              official (default)                   seed (qbit-glitch/.../mbps_pytorch)
  window merge      7 px cells, pooled to patches        each window upsampled to pixels, averaged,
                                                         adaptive-average-pooled to patches
  patch labels      majority of the patch's valid pixels one NEAREST sample per patch
  precision         inference.precision                  fp32
  k-means           fit.engine on a per-image sample     MiniBatchKMeans(batch 10000, max_iter 300,
                                                         n_init 3, random_state 42) on every
                                                         labelled patch; mapping by Euclidean
                                                         predict to the unnormalised centres
  pixel labels      at full resolution                   at the resized size (322x644) from the
                                                         windows' pixel map, NEAREST up

Not part of the seed preset yet (it runs this tool's own version of them): the seed's CRF
(softmax(5 * logits) at 322x644), its multi-scale scheme (refused by the config) and the
refinements beyond the seed (em_*, superpixels), which work on the full-resolution features.

Scoring is not part of a preset: every run scores its labels under each evaluator (official
cityscapesscripts rules and the seed's 512x1024 evaluator) in the report's protocol sensitivity
table, so one run shows what each scoring choice is worth.
"""

from dataclasses import dataclass

PROTOCOLS = ("official", "seed")


@dataclass(frozen=True)
class ProtocolSteps:
    merge: str  # "cells" | "pixels" (core.windows.stitch_windows)
    patch_labels: str  # "majority" | "nearest" (core.metrics.patch_labels)
    precision: str | None  # None: the config's inference.precision
    kmeans: str  # "config" (fit.engine and its sample) | "seed" (core.clustering.fit_seed_minibatch)
    label_resolution: str  # "full" | "resized" (core.label_image.LABELLINGS)


PRESETS = {
    "official": ProtocolSteps(merge="cells", patch_labels="majority", precision=None, kmeans="config",
                              label_resolution="full"),
    "seed": ProtocolSteps(merge="pixels", patch_labels="nearest", precision="fp32", kmeans="seed",
                          label_resolution="resized"),
}


def protocol_steps(protocol: str) -> ProtocolSteps:
    if protocol not in PRESETS:
        raise ValueError(f"unknown protocol {protocol!r}; allowed: {', '.join(PRESETS)}")
    return PRESETS[protocol]
