"""Config -> model on a device: the one place the actors build their model."""

import torch

from actors.geometry import window_spec
from configs.schema import RunConfig, WorkersConfig
from core.errors import UserError
from core.dense import WindowModel
from core.models import ModelSpec, ViTSpec, build_feature_model


def model_spec(cfg: RunConfig) -> ModelSpec:
    m = cfg.model
    spec = ModelSpec(
        vit=ViTSpec(**m.vit.model_dump()), feature_kind=m.feature_kind, init_seed=m.init_seed,
        backbone_checkpoint=m.backbone_checkpoint, head_checkpoint=m.head_checkpoint, codebook_path=m.codebook_path,
        cluster_probe_checkpoint=m.cluster_probe_checkpoint,
    )
    return spec.with_cause_root(m.cause_root) if m.cause_root is not None else spec


def device_for(workers: WorkersConfig) -> torch.device:
    """CUDA when the pool asked for GPUs (Ray then sets CUDA_VISIBLE_DEVICES for the actor)."""
    if workers.gpus_per_actor > 0:
        if not torch.cuda.is_available():
            raise UserError("gpus_per_actor > 0 but this worker sees no CUDA device; set gpus_per_actor: 0 to run on CPU")
        return torch.device("cuda")
    # Ray gives the actor `cpus_per_actor` CPUs: use as many torch threads, at least one.
    torch.set_num_threads(max(1, round(workers.cpus_per_actor)))
    return torch.device("cpu")


def build_window_model(cfg: RunConfig, workers: WorkersConfig) -> WindowModel:
    device = device_for(workers)
    model = build_feature_model(model_spec(cfg)).to(device)
    return WindowModel(model, window_spec(cfg), device)
