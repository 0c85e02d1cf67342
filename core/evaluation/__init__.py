"""Evaluators: each scores an image's label maps under one set of rules (`base.Evaluator`).

official  cityscapesscripts' rules at full resolution; also every fit's (cluster, class) counts
paper     the paper's evaluate_cascade_pseudolabels.py (512 x 1024, no void or crowd rules)
cause     CAUSE's test_tr.py: the baseline on the 322 centre crop, 27 classes, Hungarian
"""

from dataclasses import dataclass

from core.evaluation.base import Evaluator, PanopticRules
from core.evaluation.cause import CauseEvaluator
from core.evaluation.official import OfficialEvaluator
from core.evaluation.paper import PaperEvaluator


@dataclass(frozen=True)
class EvaluationSpec:
    """What a run scores with, made once by the driver (`configs.specs.evaluation_spec`)."""

    evaluators: tuple[str, ...]  # names (`configs.schema.RunConfig.evaluators`)
    sensitivity: bool  # report.sensitivity: also the paper's evaluator on every fit's both labellings
    fits: tuple[tuple[str, int, int], ...]  # (name, k, pixel stride of its labels), main first, baseline last
    num_folds: int  # fit.heldout_folds
    fold_seed: int  # the run's seed: which images fall in which fold
    rules: PanopticRules
    cause_view: tuple[int, int]  # CAUSE's (short side, crop): inference.short_side, inference.crop


def build_evaluators(spec: EvaluationSpec) -> list[Evaluator]:
    """official on every target; paper on every full-size target where named, on the protocol
    sensitivity's targets (every fit both ways, the baseline's extra labellings) with sensitivity;
    cause on the baseline's crops where named."""
    evaluators: list[Evaluator] = [OfficialEvaluator()]
    if "paper" in spec.evaluators:
        evaluators.append(PaperEvaluator())
    elif spec.sensitivity:
        evaluators.append(PaperEvaluator(scores=lambda target: not target.startswith("variant/")))
    if "cause" in spec.evaluators:
        evaluators.append(CauseEvaluator(spec.fits[-1][1], *spec.cause_view))
    return evaluators
