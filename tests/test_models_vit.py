"""DINOv2 ViT-B/14 port: the official state-dict layout loads strictly, and the forward pass matches an
independent implementation (Hugging Face transformers' Dinov2Model) given the same random weights.

Position embeddings, apples to apples: upstream DINOv2 (and CAUSE's copy) resizes the 37x37 table
with `F.interpolate(scale_factor=((h+0.1)/37, (w+0.1)/37), mode="bicubic", antialias=False)`, while
the installed Hugging Face Dinov2 uses `size=(h, w)`. Same output size, different sampling positions
(PyTorch maps coordinates with the given scale factor), so the two differ whenever the grid is not
37x37. The cross-check therefore replaces HF's `interpolate_pos_encoding` with the upstream formula,
written out here independently of core.models.vit; a separate test shows that with the offset
switched off (interpolate_offset=0 -> size=) our embeddings equal HF's unpatched ones, and that the
difference between the two formulas is far above the tolerance, so the cross-check can tell them apart.
"""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import transformers

from core.inference.dense import DenseFeatureExtractor
from core.inference.windows import WindowSpec
from core.models import ModelSpec, ViTSpec, build_feature_model
from core.models.vit import VisionTransformer

D, DEPTH, HEADS, PATCH, GRID = 768, 12, 12, 14, 37


def official_shapes(depth: int = DEPTH, dim: int = D) -> dict[str, tuple[int, ...]]:
    """dinov2_vitb14_pretrain.pth: names and shapes, written out from the upstream module tree."""
    shapes = {
        "cls_token": (1, 1, dim),
        "pos_embed": (1, 1 + GRID * GRID, dim),
        "mask_token": (1, dim),
        "patch_embed.proj.weight": (dim, 3, PATCH, PATCH),
        "patch_embed.proj.bias": (dim,),
    }
    for i in range(depth):
        b = f"blocks.{i}."
        shapes.update(
            {
                b + "norm1.weight": (dim,),
                b + "norm1.bias": (dim,),
                b + "attn.qkv.weight": (3 * dim, dim),
                b + "attn.qkv.bias": (3 * dim,),
                b + "attn.proj.weight": (dim, dim),
                b + "attn.proj.bias": (dim,),
                b + "ls1.gamma": (dim,),
                b + "norm2.weight": (dim,),
                b + "norm2.bias": (dim,),
                b + "mlp.fc1.weight": (4 * dim, dim),
                b + "mlp.fc1.bias": (4 * dim,),
                b + "mlp.fc2.weight": (dim, 4 * dim),
                b + "mlp.fc2.bias": (dim,),
                b + "ls2.gamma": (dim,),
            }
        )
    shapes.update({"norm.weight": (dim,), "norm.bias": (dim,)})
    return shapes


def random_state(shapes: dict[str, tuple[int, ...]], seed: int = 0) -> dict[str, torch.Tensor]:
    """Random tensors of the official shapes, scaled so every part matters: strong position embeddings
    (to expose interpolation differences), LayerScale far from its 1e-5 init (so the blocks count)."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for name, shape in shapes.items():
        if name.endswith("gamma"):
            t = 0.1 + 0.4 * torch.rand(shape, generator=g)
        elif "norm" in name and name.endswith("weight"):
            t = 1 + 0.1 * torch.randn(shape, generator=g)
        elif name in ("pos_embed", "cls_token", "mask_token"):
            t = 0.5 * torch.randn(shape, generator=g)
        elif name.endswith("weight"):
            fan_in = math.prod(shape[1:])
            t = torch.randn(shape, generator=g) / math.sqrt(fan_in)
        else:
            t = 0.02 * torch.randn(shape, generator=g)
        state[name] = t
    return state


def to_hf(state: dict[str, torch.Tensor], hf_keys: set[str], depth: int = DEPTH) -> dict[str, torch.Tensor]:
    """Official names -> Hugging Face Dinov2Model names (the fused qkv split into q, k, v, in that order)."""
    out = {
        "embeddings.cls_token": state["cls_token"],
        "embeddings.mask_token": state["mask_token"],
        "embeddings.position_embeddings": state["pos_embed"],
        "embeddings.patch_embeddings.projection.weight": state["patch_embed.proj.weight"],
        "embeddings.patch_embeddings.projection.bias": state["patch_embed.proj.bias"],
        "layernorm.weight": state["norm.weight"],
        "layernorm.bias": state["norm.bias"],
    }
    for i in range(depth):
        src, dst = f"blocks.{i}.", f"encoder.layer.{i}."
        if dst + "attention.q_proj.weight" in hf_keys:  # transformers >= 5 naming
            q, k, v, o = "attention.q_proj", "attention.k_proj", "attention.v_proj", "attention.o_proj"
        else:  # transformers 4.x naming
            q, k, v, o = (
                "attention.attention.query",
                "attention.attention.key",
                "attention.attention.value",
                "attention.output.dense",
            )
        for part, tensor in (("weight", state[src + "attn.qkv.weight"]), ("bias", state[src + "attn.qkv.bias"])):
            for name, chunk in zip((q, k, v), tensor.chunk(3, dim=0)):
                out[f"{dst}{name}.{part}"] = chunk
        out.update(
            {
                f"{dst}{o}.weight": state[src + "attn.proj.weight"],
                f"{dst}{o}.bias": state[src + "attn.proj.bias"],
                dst + "layer_scale1.lambda1": state[src + "ls1.gamma"],
                dst + "layer_scale2.lambda1": state[src + "ls2.gamma"],
            }
        )
        for name in (
            "norm1.weight",
            "norm1.bias",
            "norm2.weight",
            "norm2.bias",
            "mlp.fc1.weight",
            "mlp.fc1.bias",
            "mlp.fc2.weight",
            "mlp.fc2.bias",
        ):
            out[dst + name] = state[src + name]
    return out


def upstream_pos_embed(table: torch.Tensor, h0: int, w0: int) -> torch.Tensor:
    """The dinov2 repository's interpolate_pos_encoding (offset 0.1, scale_factor, bicubic, no antialias)."""
    n = table.shape[1] - 1
    m = int(math.sqrt(n))
    if n == h0 * w0 and h0 == w0:
        return table
    grid = table[:, 1:].float().reshape(1, m, m, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, scale_factor=((h0 + 0.1) / m, (w0 + 0.1) / m), mode="bicubic", antialias=False)
    assert grid.shape[-2:] == (h0, w0)
    return torch.cat((table[:, :1], grid.permute(0, 2, 3, 1).reshape(1, h0 * w0, -1)), dim=1)


@pytest.fixture(scope="module")
def weights():
    return random_state(official_shapes())


@pytest.fixture(scope="module")
def ours(weights):
    model = VisionTransformer()
    model.load_state_dict(weights, strict=True)
    return model.eval()


@pytest.fixture(scope="module")
def hf(weights):
    config = transformers.Dinov2Config(
        hidden_size=D,
        num_hidden_layers=DEPTH,
        num_attention_heads=HEADS,
        mlp_ratio=4,
        image_size=518,
        patch_size=PATCH,
        layerscale_value=1e-5,
        layer_norm_eps=1e-6,
        hidden_act="gelu",
        qkv_bias=True,
        use_swiglu_ffn=False,
        attn_implementation="eager",
    )
    with torch.device("meta"):  # no throw-away random init: every tensor is assigned below
        model = transformers.Dinov2Model(config)
    model.load_state_dict(to_hf(weights, set(model.state_dict())), strict=True, assign=True)
    return model.eval()


def test_official_layout_loads_strictly():
    shapes = official_shapes()
    assert len(shapes) == 175
    with torch.device("meta"):
        model = VisionTransformer()
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == shapes
    model = VisionTransformer(depth=2)
    state = random_state(official_shapes(depth=2), seed=3)
    assert model.load_state_dict(state, strict=True) is not None
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, state[name]), name
    with pytest.raises(RuntimeError, match="register_tokens"):
        model.load_state_dict({**state, "register_tokens": torch.zeros(1, 4, D)}, strict=True)


def test_native_grid_uses_the_table_unchanged(ours):
    assert ours.interpolate_pos_encoding(1 + GRID * GRID, GRID, GRID) is ours.pos_embed
    assert ours.interpolate_pos_encoding(1 + 23 * 46, 23, 46).shape == (1, 1 + 23 * 46, D)


@pytest.mark.parametrize("size", [(518, 518), (322, 322), (322, 644)])
def test_matches_hugging_face_dinov2(ours, hf, size, monkeypatch):
    h, w = size
    monkeypatch.setattr(
        hf.embeddings,
        "interpolate_pos_encoding",
        lambda emb, height, width: upstream_pos_embed(
            hf.embeddings.position_embeddings, height // PATCH, width // PATCH
        ),
    )
    x = torch.randn(1, 3, h, w, generator=torch.Generator().manual_seed(h + w))
    with torch.inference_mode():
        expected = hf(pixel_values=x).last_hidden_state[:, 1:]  # after layernorm, CLS dropped
        got = ours.forward_features(x)
    assert got.shape == (1, (h // PATCH) * (w // PATCH), D)
    assert expected.std() > 0.5  # normalised tokens, not a degenerate comparison
    assert (got - expected).abs().max().item() < 1e-4


def test_position_interpolation_variants(ours, hf, weights):
    """offset 0.1 + scale_factor (upstream, our default) vs size= (HF): equal sizes, different values."""
    x = torch.randn(1, 3, 322, 644, generator=torch.Generator().manual_seed(1))
    size_variant = VisionTransformer(depth=0, interpolate_offset=0.0)
    size_variant.load_state_dict({k: v for k, v in weights.items() if not k.startswith("blocks.")}, strict=True)
    with torch.inference_mode():
        hf_tokens = hf.embeddings(x)  # HF's own (unpatched) interpolation
        assert (size_variant.prepare_tokens(x) - hf_tokens).abs().max().item() < 1e-5
        ours_tokens = ours.prepare_tokens(x)
        assert (
            ours_tokens[:, 1:] - upstream_pos_embed(weights["pos_embed"], 23, 46)[:, 1:] - ours.patch_embed(x)
        ).abs().max().item() < 1e-5
        assert (ours_tokens - hf_tokens).abs().max().item() > 1e-2  # the formulas really differ


def test_backbone_model_in_the_dense_extractor():
    """The consumer's contract: a 1024x2048 image, 322 px windows at stride 161 -> a (768, 23, 46) grid."""
    model = build_feature_model(ModelSpec(vit=ViTSpec(depth=1)))
    image = np.random.default_rng(0).integers(0, 255, (1024, 2048, 3), dtype=np.uint8)
    (features,) = DenseFeatureExtractor(model, WindowSpec(short_side=322, crop=322, stride=161), "cpu")([image])
    assert features.shape == (768, 23, 46) and features.dtype == np.float32 and np.isfinite(features).all()
