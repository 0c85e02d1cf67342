"""DINOv2 Vision Transformer, ported so the official checkpoints load with `strict=True`.

Source of truth: facebookresearch/dinov2, `dinov2/models/vision_transformer.py` (DinoVisionTransformer)
and `dinov2/layers/{patch_embed,attention,mlp,layer_scale,block}.py`, as built by
`dinov2/hub/backbones.py` for `dinov2_vitb14` (img_size 518, patch 14, block_chunks=0,
num_register_tokens=0, interpolate_antialias=False, interpolate_offset=0.1, qkv/proj/ffn biases on),
and CAUSE's vendored copy `models/dinov2vit.py` (`dinov2_vit_base_14`: same modules and names).

Parameter names (175 for ViT-B/14, identical to `dinov2_vitb14_pretrain.pth`):
  cls_token (1,1,D), pos_embed (1,1+G*G,D) with G = img_size/patch (37 -> 1370 rows), mask_token (1,D),
  patch_embed.proj.{weight (D,3,p,p), bias (D)},
  blocks.{i}.{norm1, attn.qkv (3D,D), attn.proj (D,D), ls1.gamma (D), norm2, mlp.fc1 (rD,D), mlp.fc2 (D,rD), ls2.gamma},
  norm.{weight, bias}.
Pre-norm blocks: x = x + ls1(attn(norm1(x))); x = x + ls2(mlp(norm2(x))); LayerNorm eps 1e-6, GELU (exact erf).
`mask_token` is only used for masked pre-training; it is kept so the official file loads strictly.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

LAYER_NORM_EPS = 1e-6


class PatchEmbed(nn.Module):
    """(B, 3, H, W) -> (B, H/p * W/p, D): one strided convolution (row-major patch order)."""

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, _, h, w = x.shape
        if h % self.patch_size or w % self.patch_size:
            raise ValueError(f"input {h}x{w} is not a multiple of the patch size {self.patch_size}")
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, D, h, w) -> (B, h*w, D)


class Attention(nn.Module):
    """Multi-head self-attention with a fused qkv projection (dinov2/layers/attention.py)."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads)  # (B, N, 3, heads, D/heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, heads, N, D/heads)
        x = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(D/heads)) v
        return self.proj(x.transpose(1, 2).reshape(b, n, c))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class LayerScale(nn.Module):
    def __init__(self, dim: int, init_values: float):
        super().__init__()
        self.init_values = init_values
        self.gamma = nn.Parameter(torch.full((dim,), float(init_values)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class Block(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, init_values: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.attn = Attention(dim, num_heads)
        self.ls1 = LayerScale(dim, init_values)
        self.norm2 = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.ls2 = LayerScale(dim, init_values)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


class VisionTransformer(nn.Module):
    """DINOv2 ViT without register tokens. ViT-B/14: embed 768, depth 12, heads 12, mlp 4, img 518."""

    def __init__(
        self,
        img_size: int = 518,
        patch_size: int = 14,
        in_chans: int = 3,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        init_values: float = 1e-5,
        interpolate_offset: float = 0.1,
        interpolate_antialias: bool = False,
    ):
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
        if img_size % patch_size:
            raise ValueError(f"img_size {img_size} is not a multiple of patch_size {patch_size}")
        self.patch_size, self.embed_dim, self.num_heads = patch_size, embed_dim, num_heads
        self.interpolate_offset, self.interpolate_antialias = interpolate_offset, interpolate_antialias
        self.grid = img_size // patch_size  # 37 for 518 / 14
        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))  # (1, 1, D)
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.grid**2, embed_dim))  # (1, 1370, D)
        self.blocks = nn.ModuleList(Block(embed_dim, num_heads, mlp_ratio, init_values) for _ in range(depth))
        self.norm = nn.LayerNorm(embed_dim, eps=LAYER_NORM_EPS)
        self.mask_token = nn.Parameter(torch.zeros(1, embed_dim))  # (1, D)

    @torch.no_grad()
    def init_weights(self, generator: torch.Generator | None = None) -> "VisionTransformer":
        """DINOv2's init (init_weights + init_weights_vit_timm): pos_embed trunc_normal(.02), cls_token
        normal(1e-6), every Linear trunc_normal(.02) with zero bias, LayerScale = init_values,
        LayerNorm (1, 0), mask_token 0; the patch conv keeps PyTorch's default (kaiming_uniform a=sqrt(5)),
        as the official code never re-initialises it. Deterministic for a given generator."""
        nn.init.trunc_normal_(self.pos_embed, std=0.02, generator=generator)
        nn.init.normal_(self.cls_token, std=1e-6, generator=generator)
        nn.init.zeros_(self.mask_token)
        conv = self.patch_embed.proj
        nn.init.kaiming_uniform_(conv.weight, a=math.sqrt(5), generator=generator)
        bound = 1 / math.sqrt(conv.weight[0].numel())
        nn.init.uniform_(conv.bias, -bound, bound, generator=generator)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02, generator=generator)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, LayerScale):
                nn.init.constant_(module.gamma, module.init_values)
        return self

    def interpolate_pos_encoding(self, num_tokens: int, h0: int, w0: int) -> torch.Tensor:
        """Position embeddings (1, 1 + h0*w0, D) for an h0 x w0 patch grid.

        Follows DinoVisionTransformer.interpolate_pos_encoding of the dinov2 repository at the versions
        that go with `dinov2_vitb14_pretrain.pth` (first release fc49f49 through the current e1277af+,
        since the hub builds it with interpolate_offset=0.1): bicubic, antialias=False, with
        `scale_factor=((h0 + 0.1) / M, (w0 + 0.1) / M)` (M = 37), NOT `size=(h0, w0)`. The two give the
        same output size but sample at slightly different source coordinates, because PyTorch uses the
        given scale factor for the coordinate mapping. CAUSE's vendored copy is the same formula.
        (Hugging Face's Dinov2 uses `size=`; interpolate_offset=0 selects that variant, as upstream does.)
        The unchanged table is returned when the grid is the native square one, as upstream does.
        """
        n = self.pos_embed.shape[1] - 1
        if num_tokens - 1 == n and h0 == w0:
            return self.pos_embed
        m = int(math.sqrt(n))
        pos = self.pos_embed.float()
        patch_pos = pos[:, 1:].reshape(1, m, m, -1).permute(0, 3, 1, 2)  # (1, D, M, M)
        if self.interpolate_offset:
            kwargs = {"scale_factor": ((h0 + self.interpolate_offset) / m, (w0 + self.interpolate_offset) / m)}
        else:
            kwargs = {"size": (h0, w0)}
        patch_pos = F.interpolate(patch_pos, mode="bicubic", antialias=self.interpolate_antialias, **kwargs)
        if patch_pos.shape[-2:] != (h0, w0):
            raise RuntimeError(f"position embeddings interpolated to {tuple(patch_pos.shape[-2:])}, not {(h0, w0)}")
        patch_pos = patch_pos.permute(0, 2, 3, 1).reshape(1, h0 * w0, -1)  # (1, h0*w0, D)
        return torch.cat((pos[:, :1], patch_pos), dim=1).to(self.pos_embed.dtype)

    def prepare_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, 1 + h*w, D): CLS token first, then patches row by row, plus positions."""
        _, _, height, width = x.shape
        h0, w0 = height // self.patch_size, width // self.patch_size
        tokens = self.patch_embed(x)  # (B, h*w, D)
        # under autocast the bf16/fp16 conv output is concatenated with the fp32 CLS token, so the residual
        # stream stays fp32 (as upstream): cat promotes, LayerNorm runs in fp32, residual adds promote
        tokens = torch.cat((self.cls_token.expand(tokens.shape[0], -1, -1), tokens), dim=1)
        return tokens + self.interpolate_pos_encoding(tokens.shape[1], h0, w0).to(tokens.dtype)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) ImageNet-normalised -> (B, h*w, D) patch tokens after the final norm, CLS dropped
        (upstream's `x_norm_patchtokens`; CAUSE's `net(img)[:, 1:, :]`)."""
        tokens = self.prepare_tokens(x)
        for block in self.blocks:
            tokens = block(tokens)
        return self.norm(tokens)[:, 1:]

    forward = forward_features
