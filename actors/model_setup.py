"""Config -> model on a device: the one place the actors build their model."""

from dataclasses import replace

import torch

from configs.geometry import HEAD_FEATURE_DIM, window_spec
from configs.schema import RunConfig, WorkersConfig
from configs.specs import model_spec
from core.errors import UserError
from core.inference.dense import WindowModel
from core.models import build_feature_model


def device_for(workers: WorkersConfig) -> torch.device:
    """CUDA when the pool asked for GPUs (Ray then sets CUDA_VISIBLE_DEVICES for the actor)."""
    if workers.gpus_per_actor > 0:
        if not torch.cuda.is_available():
            raise UserError(
                "gpus_per_actor > 0 but this worker sees no CUDA device; set gpus_per_actor: 0 to run on CPU"
            )
        return torch.device("cuda")
    # Ray gives the actor `cpus_per_actor` CPUs: use as many torch threads, at least one.
    torch.set_num_threads(max(1, round(workers.cpus_per_actor)))
    return torch.device("cpu")


def build_window_model(cfg: RunConfig, workers: WorkersConfig, with_backbone: bool = False) -> WindowModel:
    """with_backbone (model.compare_backbone): the backbone's tokens follow the head's features;
    under the paper protocol they are not flip-averaged (its raw DINOv2 features are not)."""
    device = device_for(workers)
    model = build_feature_model(model_spec(cfg), with_backbone=with_backbone).to(device)
    spec = window_spec(cfg)
    if with_backbone and cfg.protocol == "paper":
        spec = replace(spec, flip_dims=HEAD_FEATURE_DIM)
    return WindowModel(model, spec, device)
