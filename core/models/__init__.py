"""Feature models: DINOv2 ViT (+ CAUSE Segment_TR head) from local checkpoints, or seeded random init."""

from core.models.checkpoints import CheckpointError, load_cluster_probe
from core.models.feature_model import ModelSpec, PatchFeatureModel, ViTSpec, build_feature_model

__all__ = ["CheckpointError", "ModelSpec", "PatchFeatureModel", "ViTSpec", "build_feature_model", "load_cluster_probe"]
