"""The label stage's scoring step, beside the labelling and not inside it:

score_image    CPU task per image: its ground truth read once, the run's evaluators
               (`core.evaluation`) on the label maps the label step made, the image's part
finish_scores  per shard, when every image is out: parts -> scores npz (+ the panoptic JSON of
               the written labels) + marker
"""

import json
from pathlib import Path

import numpy as np

from actors.rows import run_on_image, step
from core.clustering.sampling import image_fold
from core.evaluation import EvaluationSpec, build_evaluators
from core.evaluation.base import ImageToScore, Segmenter, add_images
from core.labelling.maps import ImageLabels
from storage.cityscapes_outputs import label_pngs, remove_image_predictions
from storage.images import read_ground_truth
from storage.run.atomic import write_json_atomic, write_npz_atomic
from storage.run.parts import complete_shard, read_shard_parts, write_part


@step(resources="label.score")
def score_image(row: dict, spec: EvaluationSpec, stage_dir: str, plan_key: str, labels_dir: str, split: str) -> dict:
    status = run_on_image("label", row, lambda: _score(row, spec, Path(stage_dir), plan_key))
    if status["error"] and not row["error"]:  # labelled, then its ground truth failed: its pseudo-labels go too
        remove_image_predictions(Path(labels_dir), row["group"], row["image_id"], split)
    return status


def _score(row: dict, spec: EvaluationSpec, stage_dir: Path, plan_key: str) -> None:
    labels = ImageLabels.from_bytes(row["labels"])
    hw = (int(row["height"]), int(row["width"]))
    truth = (
        read_ground_truth(Path(row["label_ids_path"]), Path(row["instance_ids_path"]), hw)
        if row["label_ids_path"]
        else None
    )
    known = {id(labels.targets[name]): (labels.targets[name], panoptic) for name, panoptic in labels.segments.items()}
    fold = image_fold(row["image_id"], spec.num_folds, spec.fold_seed)
    image = ImageToScore(
        targets=labels.targets,
        clusters={n: (labels.clusters[n], stride) for n, _, stride in spec.fits},
        cluster_counts={n: k for n, k, _ in spec.fits},
        crops=labels.crops,
        truth=truth,
        fold=fold,
        segment=Segmenter(spec.rules, known),
    )
    counts = {f"label/wins/{n}": np.bincount(labels.clusters[n].ravel(), minlength=k) for n, k, _ in spec.fits}
    counts |= {f"label/seconds/{name}": np.float64(seconds) for name, seconds in labels.seconds.items()}
    for evaluator in build_evaluators(spec):
        counts |= evaluator.process(image)
    write_part(
        stage_dir,
        row["shard"],
        row["image_id"],
        counts,
        {"fold": fold, "annotation": json.loads(row["annotation"])},
        plan_key,
    )


def finish_scores(
    stage_dir: str,
    shard_row: dict,
    written: list[str],
    failed: list[dict],
    plan_key: str,
    num_folds: int,
    labels_dir: str,
    split: str,
    write_label_pngs: bool,
) -> None:
    """The parts of a shard (in shard order) -> its scores npz and COCO annotations, the marker
    (listing these and the images' label PNGs), no parts."""
    stage_dir, shard = Path(stage_dir), shard_row["shard"]
    order, parts, written_at = read_shard_parts(stage_dir, shard_row, written, plan_key)
    arrays = add_images([a for a, _ in parts], [meta["fold"] for _, meta in parts], num_folds)
    outputs = [stage_dir / f"{shard}.npz", stage_dir / "_panoptic" / f"{shard}.json"]
    write_npz_atomic({"image_ids": np.array(order, dtype=np.str_), **arrays}, outputs[0])
    write_json_atomic([meta["annotation"] for _, meta in parts if meta["annotation"]], outputs[1])
    if write_label_pngs:
        outputs += label_pngs(Path(labels_dir), shard_row, order, split)
    complete_shard(stage_dir, shard, order, written_at, failed, outputs, plan_key)
