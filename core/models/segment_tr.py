"""CAUSE Segment_TR head (byungkwanlee/causal-unsupervised-segmentation), ported for inference.

Source of truth: `modules/segment.py` (Segment_TR), `modules/segment_module.py` (Decoder, TRDecoder,
ProjectionSegment, vqt / codebook_index / cos_distance_matrix, transform / untransform) and
`test_tr.py` (inference) of the CAUSE repository. Defaults from its argparse for DINOv2 ViT-B/14:
dim 768, reduced_dim 90, projection_dim 2048, num_codebook 2048, n_classes 27 (Cityscapes),
train/test resolution 322 -> num_queries = 322**2 // 14**2 = 529.

State dict (`segment_tr.pth`, 56 keys = 2 x 27 + 2):
  head.query_pos (529, 768)
  head.tr.self_attn.{in_proj_weight (2304, 768), in_proj_bias (2304), out_proj.weight (768, 768), out_proj.bias}
  head.tr.multihead_attn.{same}          nn.MultiheadAttention(768, num_heads=1)
  head.tr.linear1 (2048, 768) + bias, head.tr.linear2 (768, 2048) + bias
  head.tr.norm1/2/3.{weight, bias} (768)  nn.LayerNorm(768), eps 1e-5
  head.tr.f1 (90, 768, 1, 1) + bias, head.tr.f2.0 (768, 768, 1, 1) + bias, head.tr.f2.2 (90, 768, 1, 1) + bias
  projection_head.f (2048, 90, 1, 1) + bias
  head_ema.*, projection_head_ema.*      (the same shapes: the EMA teacher)
  linear.f (27, 90, 1, 1) + bias         (linear probe)
The codebook (2048, 768) is not in this file: CAUSE loads `modular.npy` and assigns it as a plain
attribute (`segment.head.codebook = segment.head_ema.codebook = cb`); here it is a non-persistent
buffer, so the state dict keeps exactly the 56 keys.

Inference (test_tr.py `test`): `seg_feat = segment.head_ema(feat)` with feat = ViT tokens after the
final norm, CLS dropped; the 90-d output of head_ema is the feature (projection heads and `linear` are
training-only / linear-probe parts and are loaded but unused). head_ema runs outside `autocast` there,
so this port runs the head in float32. Flip averaging is on the 90-d output (done by core.inference.dense).

TRDecoder (post-norm, DETR style; MultiheadAttention is sequence-first (P, B, D)):
  tgt = vqt(feat)  (each patch feature replaced by the codebook row of highest cosine similarity)
  q = k = tgt + pos;  tgt = norm1(tgt + self_attn(q, k, value=tgt))
  tgt = norm2(tgt + multihead_attn(query=tgt + pos, key=memory, value=memory))
  tgt = norm3(tgt + linear2(relu(linear1(tgt))))
  x = memory + tgt;  out = f1(x) + f2(x)   (1x1 convs on the 23x23 map)
Dropout (p=0.1 in both attentions, after each residual branch and inside the FFN, plus `drop` on the
f1/f2 input during fine-tuning) is active in training only; the modules are kept, and are identity
in eval mode, which is the only mode this port is used in.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

DIM = 768
REDUCED_DIM = 90
PROJECTION_DIM = 2048
HIDDEN_DIM = 2048
NUM_CODEBOOK = 2048
NUM_CLASSES = 27
TRAIN_RESOLUTION = 322  # CAUSE sets train/test resolution 322 for DINOv2 checkpoints


def num_queries_for(patch_size: int, resolution: int = TRAIN_RESOLUTION) -> int:
    """CAUSE: args.num_queries = train_resolution**2 // patch**2 (322, 14 -> 529)."""
    return resolution**2 // patch_size**2


def to_map(x: torch.Tensor) -> torch.Tensor:
    """CAUSE `transform`: (B, P, D) -> (B, D, sqrt(P), sqrt(P)), patches in row-major order."""
    b, p, d = x.shape
    side = math.isqrt(p)
    if side * side != p:
        raise ValueError(f"{p} patches do not form a square grid")
    return x.permute(0, 2, 1).reshape(b, d, side, side)


def codebook_index(z: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """CAUSE `codebook_index`: (..., D), (K, D) -> (...) index of the entry with the highest cosine similarity."""
    sim = F.normalize(z.reshape(-1, z.shape[-1]), dim=1) @ F.normalize(codebook, dim=1).T  # (N, K)
    return sim.argmax(dim=1).reshape(z.shape[:-1])


def quantize(z: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """CAUSE `vqt`: (..., D) -> (..., D), each vector replaced by its nearest (cosine) codebook row (unnormalised)."""
    return codebook[codebook_index(z, codebook)]


class TRDecoder(nn.Module):
    def __init__(
        self,
        dim: int = DIM,
        reduced_dim: int = REDUCED_DIM,
        hidden_dim: int = HIDDEN_DIM,
        nhead: int = 1,
        dropout: float = 0.1,
    ):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(dim, nhead, dropout=dropout)
        self.multihead_attn = nn.MultiheadAttention(dim, nhead, dropout=dropout)
        self.linear1 = nn.Linear(dim, hidden_dim)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(hidden_dim, dim)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.dropout3 = nn.Dropout(dropout)
        self.f1 = nn.Conv2d(dim, reduced_dim, (1, 1))
        self.f2 = nn.Sequential(nn.Conv2d(dim, dim, (1, 1)), nn.ReLU(), nn.Conv2d(dim, reduced_dim, (1, 1)))

    def forward(self, tgt: torch.Tensor, memory: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """tgt, memory (P, B, D); pos (P, 1, D) -> (B, C, sqrt(P), sqrt(P))."""
        q = k = tgt + pos
        tgt = self.norm1(tgt + self.dropout1(self.self_attn(q, k, value=tgt, need_weights=False)[0]))
        cross = self.multihead_attn(query=tgt + pos, key=memory, value=memory, need_weights=False)[0]
        tgt = self.norm2(tgt + self.dropout2(cross))
        tgt = self.norm3(tgt + self.dropout3(self.linear2(self.dropout(F.relu(self.linear1(tgt))))))
        x = to_map((memory + tgt).transpose(0, 1))  # (B, D, s, s)
        return self.f1(x) + self.f2(x)  # (B, C, s, s)


class Decoder(nn.Module):
    """CAUSE `Decoder`: learned query positions + one TRDecoder layer on the quantised features."""

    def __init__(self, num_queries: int, dim: int = DIM, reduced_dim: int = REDUCED_DIM):
        super().__init__()
        self.query_pos = nn.Parameter(torch.zeros(num_queries, dim))  # (P, D)
        self.tr = TRDecoder(dim, reduced_dim)
        self.register_buffer("codebook", torch.zeros(0, dim), persistent=False)  # (K, D), set from modular.npy

    def forward(self, feat: torch.Tensor) -> torch.Tensor:
        """feat (B, P, D) -> (B, C, sqrt(P), sqrt(P))."""
        if self.codebook.shape[0] == 0:
            raise RuntimeError("the Segment_TR codebook is not set (modular.npy): call SegmentTR.set_codebook")
        if feat.shape[1] != self.query_pos.shape[0]:
            raise ValueError(
                f"the head takes {self.query_pos.shape[0]} patches per window (query_pos), got {feat.shape[1]}"
            )
        discrete_query = quantize(feat, self.codebook)  # (B, P, D)
        return self.tr(discrete_query.transpose(0, 1), feat.transpose(0, 1), self.query_pos.unsqueeze(1))


class ProjectionSegment(nn.Module):
    """CAUSE `ProjectionSegment`: a 1x1 convolution stored as `.f`."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.f = nn.Conv2d(in_dim, out_dim, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.f(x)


class SegmentTR(nn.Module):
    """CAUSE `Segment_TR`; forward = the EMA head used at test time: (B, P, D) -> (B, 90, sqrt(P), sqrt(P))."""

    def __init__(
        self,
        num_queries: int,
        dim: int = DIM,
        reduced_dim: int = REDUCED_DIM,
        projection_dim: int = PROJECTION_DIM,
        n_classes: int = NUM_CLASSES,
    ):
        super().__init__()
        self.reduced_dim = reduced_dim
        self.head = Decoder(num_queries, dim, reduced_dim)
        self.projection_head = ProjectionSegment(reduced_dim, projection_dim)
        self.head_ema = Decoder(num_queries, dim, reduced_dim)
        self.projection_head_ema = ProjectionSegment(reduced_dim, projection_dim)
        self.linear = ProjectionSegment(reduced_dim, n_classes)

    @property
    def num_queries(self) -> int:
        return self.head_ema.query_pos.shape[0]

    def set_codebook(self, codebook: torch.Tensor) -> "SegmentTR":
        """(K, D) float codebook (modular.npy) for both heads, as CAUSE assigns it."""
        dim = self.head_ema.query_pos.shape[1]
        if codebook.ndim != 2 or codebook.shape[1] != dim:
            raise ValueError(f"codebook must be (K, {dim}), got {tuple(codebook.shape)}")
        device = self.head_ema.query_pos.device
        codebook = codebook.detach().to(device=device, dtype=torch.float32)
        self.head.codebook = codebook
        self.head_ema.codebook = codebook
        return self

    @torch.no_grad()
    def init_weights(self, generator: torch.Generator | None = None) -> "SegmentTR":
        """Random init as CAUSE's constructors (query_pos ~ N(0, 1), PyTorch defaults elsewhere), then the
        EMA twins copied from the student (CAUSE `ema_init`). Deterministic for a given generator."""
        for module in (self.head, self.projection_head, self.linear):
            for sub in module.modules():
                if isinstance(sub, (nn.Linear, nn.Conv2d)):
                    nn.init.kaiming_uniform_(sub.weight, a=math.sqrt(5), generator=generator)
                    bound = 1 / math.sqrt(sub.weight[0].numel())
                    nn.init.uniform_(sub.bias, -bound, bound, generator=generator)
                elif isinstance(sub, nn.MultiheadAttention):
                    nn.init.xavier_uniform_(sub.in_proj_weight, generator=generator)
                    nn.init.zeros_(sub.in_proj_bias)
                    nn.init.zeros_(sub.out_proj.bias)
                elif isinstance(sub, nn.LayerNorm):
                    nn.init.ones_(sub.weight)
                    nn.init.zeros_(sub.bias)
        # out_proj is an nn.Linear visited above (kaiming), its bias is then zeroed as MultiheadAttention does
        for sub in self.head.modules():
            if isinstance(sub, nn.MultiheadAttention):
                nn.init.zeros_(sub.out_proj.bias)
        nn.init.normal_(self.head.query_pos, generator=generator)
        self.head_ema.load_state_dict(self.head.state_dict())
        self.projection_head_ema.load_state_dict(self.projection_head.state_dict())
        return self

    def forward(self, feat: torch.Tensor) -> torch.Tensor:
        """feat (B, P, D) ViT patch tokens -> (B, 90, sqrt(P), sqrt(P)) = head_ema(feat), in float32."""
        with torch.autocast(device_type=feat.device.type, enabled=False):
            return self.head_ema(feat.float())
