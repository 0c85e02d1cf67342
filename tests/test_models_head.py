"""CAUSE Segment_TR head port: official 56-key layout, a known-answer forward written with plain tensor
ops, cosine nearest-codebook quantisation, and the head inside the dense extractor."""

import math
from dataclasses import replace

import numpy as np
import pytest
import torch

from core.inference.dense import DenseFeatureExtractor, WindowModel
from core.inference.windows import WindowSpec
from core.models import ModelSpec, ViTSpec, build_feature_model
from core.models.segment_tr import SegmentTR, codebook_index, quantize

D, C, PROJ, FFN, CLASSES, P = 768, 90, 2048, 2048, 27, 529


def official_shapes() -> dict[str, tuple[int, ...]]:
    """segment_tr.pth: CAUSE Segment_TR(args) for dinov2_vit_base_14 (dim 768, reduced 90, projection 2048)."""
    shapes = {}
    for head, proj in (("head", "projection_head"), ("head_ema", "projection_head_ema")):
        shapes[f"{head}.query_pos"] = (P, D)
        for attn in ("self_attn", "multihead_attn"):
            shapes.update(
                {
                    f"{head}.tr.{attn}.in_proj_weight": (3 * D, D),
                    f"{head}.tr.{attn}.in_proj_bias": (3 * D,),
                    f"{head}.tr.{attn}.out_proj.weight": (D, D),
                    f"{head}.tr.{attn}.out_proj.bias": (D,),
                }
            )
        shapes.update(
            {
                f"{head}.tr.linear1.weight": (FFN, D),
                f"{head}.tr.linear1.bias": (FFN,),
                f"{head}.tr.linear2.weight": (D, FFN),
                f"{head}.tr.linear2.bias": (D,),
            }
        )
        for norm in ("norm1", "norm2", "norm3"):
            shapes.update({f"{head}.tr.{norm}.weight": (D,), f"{head}.tr.{norm}.bias": (D,)})
        shapes.update(
            {
                f"{head}.tr.f1.weight": (C, D, 1, 1),
                f"{head}.tr.f1.bias": (C,),
                f"{head}.tr.f2.0.weight": (D, D, 1, 1),
                f"{head}.tr.f2.0.bias": (D,),
                f"{head}.tr.f2.2.weight": (C, D, 1, 1),
                f"{head}.tr.f2.2.bias": (C,),
                f"{proj}.f.weight": (PROJ, C, 1, 1),
                f"{proj}.f.bias": (PROJ,),
            }
        )
    shapes.update({"linear.f.weight": (CLASSES, C, 1, 1), "linear.f.bias": (CLASSES,)})
    return shapes


def random_state(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    state = {}
    for name, shape in official_shapes().items():
        if name.endswith("query_pos"):
            t = torch.randn(shape, generator=g)
        elif "norm" in name and name.endswith("weight"):
            t = 1 + 0.1 * torch.randn(shape, generator=g)
        elif name.endswith("weight"):
            t = torch.randn(shape, generator=g) / math.sqrt(shape[1] * (shape[2] if len(shape) == 4 else 1))
        else:
            t = 0.1 * torch.randn(shape, generator=g)
        state[name] = t
    return state


def layer_norm(x, w, b, eps=1e-5):
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps) * w + b


def attention(query, key, value, s, prefix):
    """Single-head attention as nn.MultiheadAttention(768, 1) computes it, with plain matmuls; (B, L, D)."""
    wq, wk, wv = s[prefix + "in_proj_weight"].chunk(3)
    bq, bk, bv = s[prefix + "in_proj_bias"].chunk(3)
    q, k, v = query @ wq.T + bq, key @ wk.T + bk, value @ wv.T + bv
    weights = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(q.shape[-1]), dim=-1)
    return (weights @ v) @ s[prefix + "out_proj.weight"].T + s[prefix + "out_proj.bias"]


def reference_head(feat, s, codebook, h="head_ema."):
    """CAUSE Decoder + TRDecoder forward for feat (B, P, D) -> (B, 90, 23, 23), written out by hand."""
    unit = feat / feat.norm(dim=-1, keepdim=True)
    unit_cb = codebook / codebook.norm(dim=-1, keepdim=True)
    tgt = codebook[(unit @ unit_cb.T).argmax(-1)]  # nearest entry by cosine
    pos = s[h + "query_pos"]
    t = layer_norm(
        tgt + attention(tgt + pos, tgt + pos, tgt, s, h + "tr.self_attn."),
        s[h + "tr.norm1.weight"],
        s[h + "tr.norm1.bias"],
    )
    t = layer_norm(
        t + attention(t + pos, feat, feat, s, h + "tr.multihead_attn."),
        s[h + "tr.norm2.weight"],
        s[h + "tr.norm2.bias"],
    )
    ffn = (
        torch.relu(t @ s[h + "tr.linear1.weight"].T + s[h + "tr.linear1.bias"]) @ s[h + "tr.linear2.weight"].T
        + s[h + "tr.linear2.bias"]
    )
    t = layer_norm(t + ffn, s[h + "tr.norm3.weight"], s[h + "tr.norm3.bias"])
    x = feat + t  # memory + norm3(...)

    def conv1x1(v, name):
        return v @ s[name + ".weight"][:, :, 0, 0].T + s[name + ".bias"]

    out = conv1x1(x, h + "tr.f1") + conv1x1(torch.relu(conv1x1(x, h + "tr.f2.0")), h + "tr.f2.2")  # (B, P, 90)
    side = math.isqrt(feat.shape[1])
    return out.reshape(feat.shape[0], side, side, -1).permute(0, 3, 1, 2)


@pytest.fixture(scope="module")
def loaded():
    state = random_state()
    head = SegmentTR(num_queries=P)
    head.load_state_dict(state, strict=True)
    codebook = torch.randn(64, D, generator=torch.Generator().manual_seed(5))
    head.set_codebook(codebook)
    return head.eval(), state, codebook


def test_official_layout_is_56_keys_and_loads_strictly(loaded):
    head, state, _ = loaded
    assert len(official_shapes()) == 56
    assert {k: tuple(v.shape) for k, v in head.state_dict().items()} == official_shapes()  # codebook is not saved
    for name, tensor in head.state_dict().items():
        assert torch.equal(tensor, state[name]), name
    with pytest.raises(RuntimeError, match="codebook"):
        SegmentTR(num_queries=P).load_state_dict({**state, "head.codebook": torch.zeros(2048, D)}, strict=True)


def test_head_ema_forward_matches_hand_written_reference(loaded):
    head, state, codebook = loaded
    feat = torch.randn(1, P, D, generator=torch.Generator().manual_seed(7))
    with torch.inference_mode():
        got = head(feat)
        expected = reference_head(feat, state, codebook)
        student = reference_head(feat, state, codebook, h="head.")
    assert got.shape == (1, C, 23, 23) and got.dtype == torch.float32
    assert (got - expected).abs().max().item() < 1e-4
    assert (got - student).abs().max().item() > 1e-2  # the EMA head is the one used, not the student


def test_codebook_quantisation_picks_the_nearest_entry_by_cosine():
    g = torch.Generator().manual_seed(0)
    codebook = torch.randn(32, 16, generator=g)
    index = torch.randint(0, 32, (3, 10), generator=g)
    z = codebook[index] * (0.2 + 3 * torch.rand(3, 10, 1, generator=g)) + 1e-3 * torch.randn(3, 10, 16, generator=g)
    assert torch.equal(codebook_index(z, codebook), index)
    assert torch.equal(quantize(z, codebook), codebook[index])  # the raw (unnormalised) codebook rows
    # cosine, not Euclidean: [3, 1.2] is closer to [3, 3] in L2 but closer to [1, 0] in angle
    two = torch.tensor([[1.0, 0.0], [3.0, 3.0]])
    assert codebook_index(torch.tensor([[3.0, 1.2]]), two).item() == 0


def test_head_runs_in_fp32_under_autocast(loaded):
    head, _, codebook = loaded
    feat = torch.randn(1, P, D, generator=torch.Generator().manual_seed(9))
    with torch.inference_mode():
        plain = head(feat)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            auto = head(feat.bfloat16())
    assert auto.dtype == torch.float32
    assert (auto - head(feat.bfloat16().float())).abs().max().item() < 1e-5
    assert plain.shape == auto.shape


def test_head_model_in_the_dense_extractor():
    """A fully random (depth-1) model with the head: the Cityscapes geometry gives a 90 x 23 x 46 grid."""
    model = build_feature_model(ModelSpec(vit=ViTSpec(depth=1), feature_kind="head", init_seed=3))
    assert (model.feature_dim, model.required_crop, model.patch_size) == (90, 322, 14)
    assert "RANDOMLY INITIALISED ViT (not DINOv2 weights)" in model.description
    image = np.random.default_rng(0).integers(0, 255, (1024, 2048, 3), dtype=np.uint8)
    (features,) = DenseFeatureExtractor(model, WindowSpec(short_side=322, crop=322, stride=161), "cpu")([image])
    assert features.shape == (90, 23, 46) and features.dtype == np.float32 and np.isfinite(features).all()
    with pytest.raises(ValueError, match="322"):
        DenseFeatureExtractor(model, WindowSpec(short_side=224, crop=224, stride=112), "cpu")
    with pytest.raises(ValueError, match="322"):
        model(torch.zeros(1, 3, 224, 224))


def test_head_model_with_backbone_gives_both_and_the_seed_keeps_the_tokens_unflipped():
    """model.compare_backbone: the head's 90 channels, then exactly the backbone model's tokens (same
    seeded weights); flip_dims=90 flip-averages the head only, as the paper's raw DINOv2 rows are not."""
    vit = ViTSpec(embed_dim=32, depth=1, num_heads=2)
    both = build_feature_model(ModelSpec(vit=vit, feature_kind="head", init_seed=5), with_backbone=True)
    head = build_feature_model(ModelSpec(vit=vit, feature_kind="head", init_seed=5))
    tokens = build_feature_model(ModelSpec(vit=vit, feature_kind="backbone", init_seed=5))
    windows = np.random.default_rng(1).integers(0, 255, (2, 322, 322, 3), dtype=np.uint8)
    spec = WindowSpec(short_side=322, crop=322, stride=161)
    out = WindowModel(both, spec)(windows)
    assert out.shape == (2, 90 + 32, 23, 23)
    np.testing.assert_allclose(out[:, :90], WindowModel(head, spec)(windows), atol=1e-5)
    np.testing.assert_allclose(out[:, 90:], WindowModel(tokens, spec)(windows), atol=1e-5)
    paper = WindowModel(both, replace(spec, flip_dims=90))(windows)
    np.testing.assert_allclose(paper[:, :90], out[:, :90], atol=1e-6)
    np.testing.assert_allclose(paper[:, 90:], WindowModel(tokens, replace(spec, flip=False))(windows), atol=1e-5)
    assert np.abs(paper[:, 90:] - out[:, 90:]).max() > 1e-3
