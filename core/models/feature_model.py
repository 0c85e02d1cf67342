"""Spec -> patch-feature model: DINOv2 ViT (+ CAUSE Segment_TR head), local weights or seeded random init.

`build_feature_model(spec)` returns a frozen module in eval mode mapping an ImageNet-normalised batch
(B, 3, S, S) to patch features (B, D, S/p, S/p): D = embed_dim for `backbone` (tokens after the final
norm, CLS dropped, not L2-normalised) and D = 90 for `head` (CAUSE's head_ema output).

Without a backbone checkpoint the ViT is randomly initialised (DINOv2's init, seeded by init_seed):
demo only, and `description` says so. The `head` kind needs the CAUSE files (segment_tr.pth +
modular.npy) and a real backbone; the one exception is a fully random model (no backbone, head or
codebook file), which gets a seeded random head and codebook too, to exercise the 90-d path.
"""

import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from core.models.checkpoints import CheckpointError, cause_paths, load_codebook, load_strict, load_torch_file
from core.models.segment_tr import REDUCED_DIM, TRAIN_RESOLUTION, SegmentTR, num_queries_for
from core.models.vit import VisionTransformer


@dataclass(frozen=True)
class ViTSpec:
    patch_size: int = 14
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    img_size: int = 518
    init_values: float = 1e-5


@dataclass(frozen=True)
class ModelSpec:
    vit: ViTSpec = ViTSpec()
    feature_kind: Literal["backbone", "head"] = "backbone"
    init_seed: int = 0
    backbone_checkpoint: Path | None = None
    head_checkpoint: Path | None = None
    codebook_path: Path | None = None
    cluster_probe_checkpoint: Path | None = None

    def with_cause_root(self, root: Path | str) -> "ModelSpec":
        """Every unset checkpoint path filled from the CAUSE layout under `root`; set ones are kept."""
        filled = {key: path for key, path in cause_paths(root).items() if getattr(self, key) is None}
        return replace(self, **filled)

    @property
    def is_random(self) -> bool:
        """True when the backbone is randomly initialised (no backbone checkpoint)."""
        return self.backbone_checkpoint is None


class PatchFeatureModel(nn.Module):
    """(B, 3, S, S) normalised image -> (B, feature_dim, S/p, S/p) float features."""

    def __init__(
        self, backbone: VisionTransformer, head: SegmentTR | None, description: str, with_backbone: bool = False
    ):
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.with_backbone = with_backbone  # the head's features, then the backbone's tokens: (B, 90 + embed_dim, h, w)
        self.patch_size = backbone.patch_size
        self.feature_dim = head.reduced_dim if head is not None else backbone.embed_dim
        # the head's query_pos fixes its window: 529 queries = 23 x 23 patches = 322 px for patch 14
        self.required_crop = math.isqrt(head.num_queries) * self.patch_size if head is not None else None
        self.description = description

    def forward(self, x: torch.Tensor, backbone_autocast: bool = False) -> torch.Tensor:
        """backbone_autocast: the backbone under CUDA fp16 autocast and the head in fp32, as CAUSE tests."""
        b, _, height, width = x.shape
        h, w = height // self.patch_size, width // self.patch_size
        if backbone_autocast:
            with torch.autocast("cuda", dtype=torch.float16):
                tokens = self.backbone.forward_features(x).float()
        else:
            tokens = self.backbone.forward_features(x)  # (B, h*w, D)
        if self.head is None:
            return tokens.transpose(1, 2).reshape(b, -1, h, w)  # (B, D, h, w)
        if self.required_crop not in (None, height) or height != width:
            raise ValueError(
                f"the Segment_TR head runs on {self.required_crop}x{self.required_crop} windows, got {height}x{width}"
            )
        features = self.head(tokens)  # (B, 90, h, w), float32
        if self.with_backbone:
            return torch.cat([features, tokens.float().transpose(1, 2).reshape(b, -1, h, w)], dim=1)
        return features


def _vit(spec: ViTSpec) -> VisionTransformer:
    with torch.device("meta"):  # no throw-away default init: every tensor is then loaded or initialised
        model = VisionTransformer(
            img_size=spec.img_size,
            patch_size=spec.patch_size,
            embed_dim=spec.embed_dim,
            depth=spec.depth,
            num_heads=spec.num_heads,
            mlp_ratio=spec.mlp_ratio,
            init_values=spec.init_values,
        )
    return model.to_empty(device="cpu")


def _head(spec: ViTSpec) -> SegmentTR:
    with torch.device("meta"):
        head = SegmentTR(num_queries_for(spec.patch_size, TRAIN_RESOLUTION), dim=spec.embed_dim)
    head = head.to_empty(device="cpu")
    head.head.codebook = torch.zeros(0, spec.embed_dim)  # to_empty left the (empty) buffers unset; keep them empty
    head.head_ema.codebook = torch.zeros(0, spec.embed_dim)
    return head


def _vit_text(spec: ViTSpec) -> str:
    return (
        f"ViT patch {spec.patch_size}, dim {spec.embed_dim}, depth {spec.depth}, heads {spec.num_heads}, "
        f"mlp {spec.mlp_ratio:g}, img {spec.img_size}"
    )


BACKBONE_FIX = (
    "use the official DINOv2 ViT-B/14 pretrain file (dinov2_vitb14_pretrain.pth = CAUSE's "
    "checkpoint/dinov2_vit_base_14.pth, 175 tensors) and make model.vit match it "
    "(patch_size 14, embed_dim 768, depth 12, num_heads 12, mlp_ratio 4, img_size 518)"
)
HEAD_FIX = (
    "use CAUSE's segment_tr.pth trained on DINOv2 ViT-B/14 features "
    "(CAUSE/cityscapes/dinov2_vit_base_14/2048/segment_tr.pth, 56 tensors, query_pos 529 x 768)"
)


def build_feature_model(spec: ModelSpec, with_backbone: bool = False) -> PatchFeatureModel:
    """The frozen eval-mode feature model of `spec`; CheckpointError when a needed file is unset, missing
    or does not match. with_backbone (head models): the backbone's tokens follow the head's features."""
    if spec.feature_kind not in ("backbone", "head"):
        raise ValueError(f"model.feature_kind must be 'backbone' or 'head', not {spec.feature_kind!r}")
    generator = torch.Generator().manual_seed(int(spec.init_seed))
    backbone = _vit(spec.vit)
    if spec.is_random:
        backbone.init_weights(generator)
        parts = [f"RANDOMLY INITIALISED ViT (not DINOv2 weights): {_vit_text(spec.vit)}, init_seed {spec.init_seed}"]
    else:
        load_strict(
            backbone,
            load_torch_file(spec.backbone_checkpoint, "backbone_checkpoint"),
            spec.backbone_checkpoint,
            "backbone_checkpoint",
            BACKBONE_FIX,
        )
        parts = [f"DINOv2 {_vit_text(spec.vit)} from {spec.backbone_checkpoint}"]

    head = None
    if spec.feature_kind == "head":
        head = _head(spec.vit)
        head_files = (spec.head_checkpoint, spec.codebook_path)
        if spec.is_random and head_files == (None, None):
            head.init_weights(generator)
            codebook = torch.empty(2048, spec.vit.embed_dim).uniform_(-1 / 2048, 1 / 2048, generator=generator)
            head.set_codebook(codebook)  # CAUSE's `reset` init of the codebook parameter
            parts.append(
                f"RANDOMLY INITIALISED Segment_TR head and codebook (not CAUSE weights), init_seed {spec.init_seed}"
            )
        else:
            unset = [
                key
                for key, value in (
                    ("backbone_checkpoint", spec.backbone_checkpoint),
                    ("head_checkpoint", spec.head_checkpoint),
                    ("codebook_path", spec.codebook_path),
                )
                if value is None
            ]
            if unset:
                raise CheckpointError(
                    f"model.feature_kind='head' needs the CAUSE files: the DINOv2 backbone, segment_tr.pth and "
                    f"modular.npy (the head was trained on DINOv2 features with that codebook); unset: "
                    f"{', '.join('model.' + key for key in unset)}. Set model.cause_root to a folder in the CAUSE "
                    f"layout, or set those keys; or use model.feature_kind='backbone'"
                )
            load_strict(
                head,
                load_torch_file(spec.head_checkpoint, "head_checkpoint"),
                spec.head_checkpoint,
                "head_checkpoint",
                HEAD_FIX,
            )
            head.set_codebook(load_codebook(spec.codebook_path, spec.vit.embed_dim))
            parts.append(
                f"CAUSE Segment_TR head_ema ({REDUCED_DIM}-d) from {spec.head_checkpoint}, "
                f"codebook {spec.codebook_path}"
            )
    else:
        parts.append(f"features: backbone ({spec.vit.embed_dim}-d patch tokens)")

    model = PatchFeatureModel(backbone, head, "; ".join(parts), with_backbone=with_backbone and head is not None)
    model.requires_grad_(False)
    return model.eval()
