"""Loading the CAUSE files: the folder layout, strict matching with readable errors, weights_only,
the cluster probe, and seeded random init when there are no weights."""

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

import core.models.checkpoints as checkpoints
from core.models import CheckpointError, ModelSpec, ViTSpec, build_feature_model, load_cluster_probe
from tests.test_models_head import random_state as random_head_state
from tests.test_models_vit import official_shapes as vit_shapes
from tests.test_models_vit import random_state as random_vit_state

SMALL_B14 = ViTSpec(depth=1)  # ViT-B/14 widths (the head needs 768-d tokens), one block to keep files small
BACKBONE = "checkpoint/dinov2_vit_base_14.pth"
SEGMENT = "CAUSE/cityscapes/dinov2_vit_base_14/2048/segment_tr.pth"
CLUSTER = "CAUSE/cityscapes/dinov2_vit_base_14/2048/cluster_tr.pth"
MODULAR = "CAUSE/cityscapes/modularity/dinov2_vit_base_14/2048/modular.npy"


def _save(root: Path, rel: str, obj) -> Path:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, obj) if rel.endswith(".npy") else torch.save(obj, path)
    return path


@pytest.fixture(scope="module")
def cause_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("cause")
    g = torch.Generator().manual_seed(11)
    _save(root, BACKBONE, random_vit_state(vit_shapes(depth=1), seed=1))
    _save(root, SEGMENT, random_head_state(seed=2))
    codebook = torch.randn(2048, 768, generator=g)
    _save(root, CLUSTER, {"codebook": codebook, "cluster_probe": torch.randn(27, 90, generator=g)})
    _save(root, MODULAR, codebook.numpy())
    return root


def _spec(root: Path, kind: str = "head") -> ModelSpec:
    return ModelSpec(vit=SMALL_B14, feature_kind=kind).with_cause_root(root)


def test_with_cause_root_fills_only_unset_paths(tmp_path):
    spec = ModelSpec(head_checkpoint=Path("/elsewhere/segment_tr.pth")).with_cause_root(tmp_path)
    assert spec.backbone_checkpoint == tmp_path / BACKBONE
    assert spec.head_checkpoint == Path("/elsewhere/segment_tr.pth")
    assert (spec.codebook_path, spec.cluster_probe_checkpoint) == (tmp_path / MODULAR, tmp_path / CLUSTER)
    assert not spec.is_random and ModelSpec().is_random
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.init_seed = 1


def test_cause_layout_loads_backbone_head_and_codebook(cause_root):
    model = build_feature_model(_spec(cause_root))
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    assert (model.feature_dim, model.required_crop, model.patch_size) == (90, 322, 14)
    assert str(cause_root / BACKBONE) in model.description and str(cause_root / SEGMENT) in model.description
    assert "RANDOM" not in model.description
    vit_file = torch.load(cause_root / BACKBONE, weights_only=True)
    head_file = torch.load(cause_root / SEGMENT, weights_only=True)
    assert all(torch.equal(v, vit_file[k]) for k, v in model.backbone.state_dict().items())
    assert all(torch.equal(v, head_file[k]) for k, v in model.head.state_dict().items())
    codebook = torch.from_numpy(np.load(cause_root / MODULAR))
    assert torch.equal(model.head.head_ema.codebook, codebook) and torch.equal(model.head.head.codebook, codebook)
    x = torch.randn(1, 3, 322, 322, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        out = model(x)
        expected = model.head.head_ema(model.backbone.forward_features(x))
    assert out.shape == (1, 90, 23, 23) and torch.equal(out, expected)

    backbone_only = build_feature_model(_spec(cause_root, "backbone"))
    assert (backbone_only.feature_dim, backbone_only.required_crop) == (768, None)
    assert backbone_only.head is None


def test_load_cluster_probe(cause_root, tmp_path):
    probe = load_cluster_probe(cause_root / CLUSTER)
    saved = torch.load(cause_root / CLUSTER, weights_only=True)["cluster_probe"]
    assert probe.dtype == np.float32 and probe.shape == (27, 90)
    np.testing.assert_array_equal(probe, saved.numpy())
    only = _save(tmp_path, "only.pth", {"cluster_probe": torch.ones(27, 90, dtype=torch.float64)})
    assert load_cluster_probe(only).dtype == np.float32
    with pytest.raises(CheckpointError, match=r"no key 'cluster_probe'.*codebook"):
        load_cluster_probe(_save(tmp_path, "nokey.pth", {"codebook": torch.zeros(4, 768)}))
    with pytest.raises(CheckpointError, match=r"expected shape \(27, 90\), found \(27, 768\)"):
        load_cluster_probe(_save(tmp_path, "shape.pth", {"cluster_probe": torch.zeros(27, 768)}))
    with pytest.raises(CheckpointError, match="model.cluster_probe_checkpoint"):
        load_cluster_probe(tmp_path / "absent.pth")
    with pytest.raises(CheckpointError, match="model.cluster_probe_checkpoint"):
        load_cluster_probe(None)


def test_missing_files_name_the_path_and_the_config_key(cause_root, tmp_path):
    with pytest.raises(CheckpointError) as err:
        build_feature_model(_spec(tmp_path))
    message = str(err.value)
    assert (
        str(tmp_path / BACKBONE) in message and "model.backbone_checkpoint" in message and "model.cause_root" in message
    )
    root = tmp_path / "partial"
    (root / BACKBONE).parent.mkdir(parents=True)
    (root / BACKBONE).write_bytes((cause_root / BACKBONE).read_bytes())
    with pytest.raises(CheckpointError, match=r"(?s)segment_tr\.pth does not exist.*model\.head_checkpoint"):
        build_feature_model(_spec(root))


def test_head_needs_the_cause_files(cause_root):
    with pytest.raises(CheckpointError, match=r"unset: model\.head_checkpoint, model\.codebook_path") as err:
        build_feature_model(ModelSpec(vit=SMALL_B14, feature_kind="head", backbone_checkpoint=cause_root / BACKBONE))
    assert "model.cause_root" in str(err.value)
    with pytest.raises(CheckpointError, match=r"unset: model\.backbone_checkpoint"):  # real head on a random ViT
        build_feature_model(
            ModelSpec(
                vit=SMALL_B14,
                feature_kind="head",
                head_checkpoint=cause_root / SEGMENT,
                codebook_path=cause_root / MODULAR,
            )
        )


def test_mismatched_state_dict_lists_keys_shapes_and_fix(tmp_path):
    state = random_vit_state(vit_shapes(depth=1))
    del state["blocks.0.ls1.gamma"]
    state["pos_embed"] = torch.zeros(1, 257, 768)
    state["register_tokens"] = torch.zeros(1, 4, 768)
    path = _save(tmp_path, "bad.pth", state)
    with pytest.raises(CheckpointError) as err:
        build_feature_model(ModelSpec(vit=SMALL_B14, backbone_checkpoint=path))
    message = str(err.value)
    assert str(path) in message
    assert "missing keys (1): blocks.0.ls1.gamma" in message
    assert "unexpected keys (1): register_tokens" in message
    assert "wrong shapes (1): pos_embed: expected (1, 1370, 768), found (1, 257, 768)" in message
    assert "fix:" in message and "dinov2_vitb14_pretrain.pth" in message


def test_ddp_module_prefix_is_stripped(tmp_path):
    state = random_vit_state(vit_shapes(depth=1))
    path = _save(tmp_path, "ddp.pth", {"module." + k: v for k, v in state.items()})
    model = build_feature_model(ModelSpec(vit=SMALL_B14, backbone_checkpoint=path))
    assert torch.equal(model.backbone.pos_embed, state["pos_embed"])


class NotAWeight:
    pass


def test_files_are_loaded_with_weights_only_on_cpu(cause_root, tmp_path, monkeypatch):
    calls = []
    real_load = torch.load

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real_load(*args, **kwargs)

    monkeypatch.setattr(checkpoints.torch, "load", spy)
    build_feature_model(_spec(cause_root))
    load_cluster_probe(cause_root / CLUSTER)
    assert len(calls) == 3 and all(c.get("weights_only") is True and c.get("map_location") == "cpu" for c in calls)
    monkeypatch.setattr(checkpoints.torch, "load", real_load)
    path = tmp_path / "pickled.pth"
    torch.save({"pos_embed": torch.zeros(1), "extra": NotAWeight()}, path)
    with pytest.raises(CheckpointError, match="weights_only=True"):
        build_feature_model(ModelSpec(vit=SMALL_B14, backbone_checkpoint=path))
    torch.save([torch.zeros(1)], path)
    with pytest.raises(CheckpointError, match="not a state dict"):
        build_feature_model(ModelSpec(vit=SMALL_B14, backbone_checkpoint=path))


def test_codebook_file_checks(cause_root, tmp_path):
    spec = _spec(cause_root)
    bad = _save(tmp_path, "bad.npy", np.zeros((2048, 384), dtype=np.float32))
    with pytest.raises(CheckpointError, match=r"expected shape \(K, 768\).*found \(2048, 384\)"):
        build_feature_model(dataclasses.replace(spec, codebook_path=bad))
    pickled = tmp_path / "object.npy"
    np.save(pickled, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(CheckpointError, match="allow_pickle=False"):
        build_feature_model(dataclasses.replace(spec, codebook_path=pickled))


def test_random_init_is_seeded_and_labelled():
    tiny = ViTSpec(embed_dim=64, depth=2, num_heads=2)
    a, b = (build_feature_model(ModelSpec(vit=tiny, init_seed=0)) for _ in range(2))
    c = build_feature_model(ModelSpec(vit=tiny, init_seed=1))
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())
    assert not torch.equal(a.backbone.pos_embed, c.backbone.pos_embed)
    assert "RANDOMLY INITIALISED ViT (not DINOv2 weights)" in a.description
    assert "dim 64" in a.description and "depth 2" in a.description and "init_seed 0" in a.description
    assert (a.feature_dim, a.required_crop) == (64, None)
    vit = a.backbone
    assert torch.all(vit.blocks[0].ls1.gamma == 1e-5) and torch.all(vit.mask_token == 0)
    assert abs(vit.blocks[0].mlp.fc1.weight.std().item() - 0.02) < 0.002 and torch.all(vit.blocks[0].mlp.fc1.bias == 0)
    assert abs(vit.pos_embed.std().item() - 0.02) < 0.002
    with torch.inference_mode():
        out = a(torch.randn(2, 3, 28, 42))
    assert out.shape == (2, 64, 2, 3) and torch.isfinite(out).all()

    h1, h2 = (build_feature_model(ModelSpec(vit=ViTSpec(depth=1), feature_kind="head", init_seed=4)) for _ in range(2))
    assert all(torch.equal(v, h2.state_dict()[k]) for k, v in h1.state_dict().items())
    assert torch.equal(h1.head.head_ema.codebook, h2.head.head_ema.codebook)
    assert "RANDOMLY INITIALISED Segment_TR head" in h1.description
