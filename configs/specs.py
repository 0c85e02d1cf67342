"""Config -> the typed parameters each stage needs, made once by the driver: the one way from a config to
what a stage, an actor or a core function is given (`configs.geometry` for windows, scales and image limits)."""

from configs.geometry import label_scales, paper_baseline_scales
from configs.schema import RunConfig
from core.evaluation import EvaluationSpec
from core.evaluation.base import PanopticRules
from core.labelling.image import LabelFit, LabelRequest, baseline_labellings
from core.labelling.variants import REFINEMENTS, RefineSettings, enabled_variants
from core.models import ModelSpec, ViTSpec


def model_spec(cfg: RunConfig) -> ModelSpec:
    m = cfg.model
    spec = ModelSpec(
        vit=ViTSpec(**m.vit.model_dump()),
        feature_kind=m.feature_kind,
        init_seed=m.init_seed,
        backbone_checkpoint=m.backbone_checkpoint,
        head_checkpoint=m.head_checkpoint,
        codebook_path=m.codebook_path,
        cluster_probe_checkpoint=m.cluster_probe_checkpoint,
    )
    return spec.with_cause_root(m.cause_root) if m.cause_root is not None else spec


def label_variants(cfg: RunConfig) -> list[str]:
    """The main fit's variants: 'plain' first, then the refinements the config switches on."""
    switched_on = {name for name in REFINEMENTS if getattr(cfg.refine, name)}
    return enabled_variants(switched_on, len(label_scales(cfg)) > 1)


def refine_settings(cfg: RunConfig) -> RefineSettings:
    r = cfg.refine
    return RefineSettings(tau=r.tau, iterations=r.iterations, superpixel_step=r.superpixel_step)


def label_request(cfg: RunConfig) -> LabelRequest:
    """What the run's evaluators and report.sensitivity need labelled besides each fit's clusters."""
    sensitivity = cfg.report.sensitivity
    extra = baseline_labellings(cfg.protocol, bool(paper_baseline_scales(cfg)), cfg.refine.crf) if sensitivity else []
    return LabelRequest(
        baseline=True,
        both_labellings=sensitivity,
        baseline_labellings=tuple(extra),
        cause_crop="cause" in cfg.evaluators,
    )


def panoptic_rules(cfg: RunConfig) -> PanopticRules:
    p = cfg.panoptic
    return PanopticRules(p.thing_min_area, p.stuff_min_area, p.connectivity)


def evaluation_spec(cfg: RunConfig, fits: list[LabelFit]) -> EvaluationSpec:
    """The scoring step's parameters: the run's evaluators and each fit's k and pixel stride."""
    inference = cfg.inference
    return EvaluationSpec(
        evaluators=cfg.evaluators,
        sensitivity=cfg.report.sensitivity,
        fits=tuple((f.name, len(f.mapping), f.stride) for f in fits),
        num_folds=cfg.fit.heldout_folds,
        fold_seed=cfg.seed,
        rules=panoptic_rules(cfg),
        cause_view=(inference.short_side, inference.crop),
    )
