"""Local checkpoint files: the CAUSE folder layout, safe loading, strict matching with clear errors.

Files are read with `torch.load(path, map_location="cpu", weights_only=True)` (tensors and plain
containers only, no arbitrary pickled code) and `np.load(path, allow_pickle=False)`.

CAUSE layout (as its scripts write and read it, relative to the folder CAUSE runs in):
  checkpoint/dinov2_vit_base_14.pth                                  DINOv2 ViT-B/14 (= dinov2_vitb14_pretrain.pth)
  CAUSE/cityscapes/dinov2_vit_base_14/2048/segment_tr.pth            Segment_TR state dict (56 keys)
  CAUSE/cityscapes/dinov2_vit_base_14/2048/cluster_tr.pth            Cluster state dict: codebook, cluster_probe
  CAUSE/cityscapes/modularity/dinov2_vit_base_14/2048/modular.npy    codebook (2048, 768) float32
"""

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from torch import nn

from core.errors import UserError

CAUSE_LAYOUT = {
    "backbone_checkpoint": Path("checkpoint/dinov2_vit_base_14.pth"),
    "head_checkpoint": Path("CAUSE/cityscapes/dinov2_vit_base_14/2048/segment_tr.pth"),
    "cluster_probe_checkpoint": Path("CAUSE/cityscapes/dinov2_vit_base_14/2048/cluster_tr.pth"),
    "codebook_path": Path("CAUSE/cityscapes/modularity/dinov2_vit_base_14/2048/modular.npy"),
}

WHAT = {
    "backbone_checkpoint": "DINOv2 backbone checkpoint",
    "head_checkpoint": "CAUSE Segment_TR head checkpoint",
    "cluster_probe_checkpoint": "CAUSE cluster probe checkpoint",
    "codebook_path": "CAUSE modularity codebook",
}

MAX_LISTED = 20


class CheckpointError(UserError, ValueError):
    """A checkpoint file is missing, unreadable or does not match the model; the message says how to fix it."""


def cause_paths(root: Path | str) -> dict[str, Path]:
    """The four files of the CAUSE layout under `root`, by ModelSpec field name."""
    return {key: Path(root) / rel for key, rel in CAUSE_LAYOUT.items()}


def _where_to_set(key: str) -> str:
    return (
        f"set model.{key} to the file, or model.cause_root to a folder in the CAUSE layout "
        f"(<cause_root>/{CAUSE_LAYOUT[key].as_posix()})"
    )


def require_file(path: Path | str | None, key: str) -> Path:
    """`path` as a Path if it is an existing file; else CheckpointError naming the config key to set."""
    what = WHAT.get(key, key)
    if path is None:
        raise CheckpointError(f"no {what} configured: {_where_to_set(key)}")
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{what} not found: {path} does not exist (or is not a file); {_where_to_set(key)}")
    return path


def load_torch_file(path: Path | str | None, key: str) -> dict[str, torch.Tensor]:
    """A state dict (name -> tensor) from a torch file, loaded on CPU with weights_only=True."""
    path = require_file(path, key)
    what = WHAT.get(key, key)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle.UnpicklingError for non-weights content, RuntimeError for corrupt files
        raise CheckpointError(
            f"cannot read {what} {path} with torch.load(weights_only=True): {type(exc).__name__}: {exc}. "
            "The file must be a plain state dict of tensors (as torch.save(module.state_dict()) writes); "
            "files that need arbitrary unpickling are refused."
        ) from exc
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        kind = type(obj).__name__
        keys = ", ".join(list(map(str, obj.keys()))[:MAX_LISTED]) if isinstance(obj, Mapping) else ""
        raise CheckpointError(
            f"{what} {path} is not a state dict of tensors (found a {kind}{': ' + keys if keys else ''}); "
            f"{_where_to_set(key)}"
        )
    state = {str(k): v for k, v in obj.items()}
    if state and all(k.startswith("module.") for k in state):  # saved from a DistributedDataParallel wrapper
        state = {k[len("module.") :]: v for k, v in state.items()}
    return state


def _listing(items: list[str]) -> str:
    shown = items[:MAX_LISTED]
    more = f", ... and {len(items) - MAX_LISTED} more" if len(items) > MAX_LISTED else ""
    return ", ".join(shown) + more


def load_strict(module: nn.Module, state: Mapping[str, torch.Tensor], path: Path | str, key: str, fix: str) -> None:
    """`module.load_state_dict(state, strict=True)`, checked first so a mismatch names the file, the
    missing and unexpected keys, expected vs found shapes, and how to fix it."""
    expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    found = {k: tuple(v.shape) for k, v in state.items()}
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    wrong = [
        f"{k}: expected {expected[k]}, found {found[k]}" for k in expected if k in found and expected[k] != found[k]
    ]
    if missing or unexpected or wrong:
        lines = [
            f"{WHAT.get(key, key)} {path} does not match the model "
            f"({len(expected)} tensors expected, {len(found)} in the file):"
        ]
        if missing:
            lines.append(f"  missing keys ({len(missing)}): {_listing(missing)}")
        if unexpected:
            lines.append(f"  unexpected keys ({len(unexpected)}): {_listing(unexpected)}")
        if wrong:
            lines.append(f"  wrong shapes ({len(wrong)}): {_listing(wrong)}")
        lines.append(f"  fix: {fix}")
        raise CheckpointError("\n".join(lines))
    module.load_state_dict(state, strict=True)


def load_codebook(path: Path | str | None, dim: int) -> torch.Tensor:
    """CAUSE's modularity codebook `modular.npy` -> (K, dim) float32 tensor (np.load, allow_pickle=False)."""
    path = require_file(path, "codebook_path")
    try:
        array = np.load(path, allow_pickle=False)
    except Exception as exc:
        raise CheckpointError(
            f"cannot read the CAUSE codebook {path} with np.load(allow_pickle=False): {type(exc).__name__}: {exc}"
        ) from exc
    if not isinstance(array, np.ndarray) or array.ndim != 2 or array.shape[1] != dim or array.shape[0] == 0:
        shape = getattr(array, "shape", None)
        raise CheckpointError(
            f"CAUSE codebook {path}: expected shape (K, {dim}) (2048 x {dim} for CAUSE), found {shape}; "
            f"point model.codebook_path at modular.npy of the same backbone"
        )
    if not np.issubdtype(array.dtype, np.floating):
        raise CheckpointError(f"CAUSE codebook {path}: expected floats, found dtype {array.dtype}")
    return torch.from_numpy(array.astype(np.float32))


def load_cluster_probe(path: Path | str | None, expected_shape: tuple[int, int] = (27, 90)) -> np.ndarray:
    """CAUSE's 27 cluster centroids from `cluster_tr.pth` (key `cluster_probe`, stored with `codebook`)
    -> (27, 90) float32 array."""
    state = load_torch_file(path, "cluster_probe_checkpoint")
    if "cluster_probe" not in state:
        raise CheckpointError(
            f"CAUSE cluster probe checkpoint {path} has no key 'cluster_probe' "
            f"(keys: {_listing(sorted(state))}); point model.cluster_probe_checkpoint at CAUSE's cluster_tr.pth"
        )
    probe = state["cluster_probe"]
    if tuple(probe.shape) != tuple(expected_shape):
        raise CheckpointError(
            f"CAUSE cluster probe checkpoint {path}: 'cluster_probe' expected shape {tuple(expected_shape)}, "
            f"found {tuple(probe.shape)}; use the cluster_tr.pth trained with the Segment_TR head (27 classes x 90-d)"
        )
    return probe.detach().to(torch.float32).numpy().copy()
