"""Runs cityscapesscripts' official evaluators in-process on a folder of Cityscapes-format outputs."""

import glob
from pathlib import Path

from cityscapesscripts.evaluation import evalPanopticSemanticLabeling as pan_eval
from cityscapesscripts.evaluation import evalPixelLevelSemanticLabeling as pix_eval
from cityscapesscripts.preparation import createPanopticImgs as create_panoptic


def official_pixel_level(gt_fine: Path, split: str, pred_label_ids: Path) -> dict:
    """The pixel-level evaluator's result dict (classScores, averageScoreClasses, ...)."""
    args = pix_eval.args  # the evaluator is configured through its module-level `args`
    args.groundTruthSearch = str(Path(gt_fine) / split / "*" / "*_gtFine_labelIds.png")
    args.predictionPath, args.predictionWalk = str(pred_label_ids), None
    args.evalInstLevelScore, args.evalPixelAccuracy, args.JSONOutput, args.quiet = False, False, False, True
    gts = sorted(glob.glob(args.groundTruthSearch))
    preds = [pix_eval.getPrediction(args, gt) for gt in gts]
    return pix_eval.evaluateImgLists(preds, gts, args)


def official_panoptic(gt_fine: Path, split: str, pred_json: Path, work_dir: Path) -> tuple[dict, dict]:
    """(PQ results, raw per-category statistics). The official ground-truth converter writes the
    panoptic GT; the per-image cores run in this process (the official pool starts one process
    per machine core)."""
    gt_dir = Path(work_dir) / "gt_official"
    gt_dir.mkdir(parents=True, exist_ok=True)
    create_panoptic.convert2panoptic(str(gt_fine), str(gt_dir), useTrainId=False, setNames=[split])
    gt_json = gt_dir / f"cityscapes_panoptic_{split}.json"
    captured = {}

    def single_process(matched, gt_folder, pred_folder, categories):
        captured["stat"] = pan_eval.pq_compute_single_core(0, matched, gt_folder, pred_folder, categories)
        return captured["stat"]

    original = pan_eval.pq_compute_multi_core
    pan_eval.pq_compute_multi_core = single_process
    try:
        result = pan_eval.evaluatePanoptic(
            str(gt_json),
            str(gt_json.with_suffix("")),
            str(pred_json),
            str(Path(pred_json).with_suffix("")),
            str(Path(work_dir) / "pq.json"),
        )
    finally:
        pan_eval.pq_compute_multi_core = original
    return result, captured["stat"]
