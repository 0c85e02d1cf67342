"""What each stage's results are made from, and the checks that keep stages from mixing results.

A stage's *plan* is the settings its results depend on: the dataset's fingerprint (ids, files,
sizes, modification times), the model's identity (architecture, checkpoint checksums, the init
seed of random weights, the inference settings that change features), the config sections the
stage reads and the plan of the stage before it. How many workers run it is not part of it.
Every stage folder records its plan in `_plan.json`, with the *inputs* it was made from (the
content key of the stage before: checksums of the files its markers list).

- A stage folder with another plan is refused, naming each setting that differs: results are
  never mixed. `ray_jobs.pipeline` checks every stage folder before it writes anything.
- A stage folder whose inputs changed (an earlier stage redid a shard and wrote other bytes) is
  stale: its markers are dropped and the stage runs again, which the log says.
- A stage reads only a complete earlier stage (`require_complete`): its plan, every planned
  shard marked done, every file the markers list present at its size. Otherwise it stops and
  says which stage to run.
"""

import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

from configs.geometry import feature_scales, image_limit_settings, paper_baseline_scales
from configs.schema import RunConfig
from configs.specs import model_spec
from core.errors import UserError
from core.models.checkpoints import require_file
from storage.datasets import ImageRecord
from storage.features import PATCH_FORMAT
from storage.run.atomic import write_json_atomic
from storage.run.layout import settings_key
from storage.run.markers import DONE_DIR, STAGE_COMPLETE, file_sha256, marker_problems, read_done
from storage.run.parts import PARTS_DIR
from storage.run.shards import dataset_fingerprint

log = logging.getLogger(__name__)
PLAN_FILE = "_plan.json"
FIT_FORMAT = 2  # 2: the main fit carries its class prototypes (prototype denoising)


class StageIncomplete(UserError, RuntimeError):
    """A stage cannot run or resume on what output_dir holds; the message says which stage to run or what to delete."""


@dataclass(frozen=True)
class Plan:
    stage: str
    settings: dict  # JSON-able; nested sections

    @property
    def key(self) -> str:
        return settings_key(self.settings)


def _weights_sha256(path: Path, key: str, recorded: dict | None) -> str:
    """A weight file's checksum; a file gone since the stage that needed it ran keeps the recorded
    one, as later stages read that stage's results and never load it."""
    if recorded is not None and key in recorded and not Path(path).is_file():
        return recorded[key]
    return file_sha256(require_file(path, key))


def model_identity(cfg: RunConfig, recorded: dict | None = None) -> dict:
    """Everything that decides the features: architecture, the checksum of every weight file the
    model loads, the init seed where weights are random, and the inference settings. `recorded`:
    the identity in an existing extract plan (used for weight files that are gone)."""
    spec = model_spec(cfg)
    files = {"backbone_checkpoint": spec.backbone_checkpoint}
    if cfg.model.feature_kind == "head":
        files |= {"head_checkpoint": spec.head_checkpoint, "codebook_path": spec.codebook_path}
    loaded = {key: path for key, path in files.items() if path is not None}
    random_weights = len(loaded) < len(files)
    known = (recorded or {}).get("weights_sha256")
    # which images pass inference.max_windows_per_image is a stage's plan (`image_limit_settings`), not the features
    inference = cfg.inference.model_dump(mode="json", exclude={"batch_size", "max_windows_per_image"})
    inference["scales"] = feature_scales(cfg)  # under protocol=paper the other scales are the baseline's rows only
    return {
        "vit": cfg.model.vit.model_dump(mode="json"),
        "feature_kind": cfg.model.feature_kind,
        "init_seed": cfg.model.init_seed if random_weights else None,
        "weights_sha256": {key: _weights_sha256(path, key, known) for key, path in loaded.items()},
        "inference": inference,
        "protocol": cfg.protocol,
    }  # the window merge, patch labels and precision (core.presets)


def extract_plan(cfg: RunConfig, records: list[ImageRecord], model: dict) -> Plan:
    """`model`: what decides the features a fit uses; `stored`: what extract keeps beside them."""
    stored = {"compare_backbone": cfg.model.compare_backbone, "paper_baseline_scales": paper_baseline_scales(cfg)}
    return Plan("extract", {**_patch_features(cfg, records, model), "stored": stored})


def _patch_features(cfg: RunConfig, records: list[ImageRecord], model: dict) -> dict:
    """What decides the patch features of a stage that reads the images (extract, apply): the
    images, their sharding and limits, and the model."""
    return {
        "format": PATCH_FORMAT,
        "dataset": dataset_fingerprint(records, cfg.dataset.root),
        "images_per_shard": cfg.dataset.images_per_shard,
        "image_limits": image_limit_settings(cfg),
        "model": model,
    }


# How Lloyd's assignment step runs, not what it computes: every assigner gives the same assignment
# (near ties re-scored in float64) and so the same fits.
FIT_RESOURCES = {"lloyd_assign", "lloyd_gpus_per_task"}
# The codebook merge's settings, which a k-means fit does not read: changing them redoes nothing.
CODEBOOK_SETTINGS = {"codebook_ratio", "codebook_rows", "codebook_iterations"}
OTHER_SET = "(another run's features)"


def fit_plan(cfg: RunConfig, extract: Plan, recorded: dict | None = None) -> Plan:
    probe = None
    if cfg.fit.baseline == "cluster_probe":
        known = {"cluster_probe_checkpoint": recorded["cluster_probe_sha256"]} if recorded else None
        probe = _weights_sha256(model_spec(cfg).cluster_probe_checkpoint, "cluster_probe_checkpoint", known)
    unused = CODEBOOK_SETTINGS if cfg.fit.method == "kmeans" else set()
    fit = cfg.fit.model_dump(mode="json", exclude=FIT_RESOURCES | unused)
    # Another run's sets enter by their content (the fit's inputs: `fit.fit_inputs`), not by how
    # their path is spelt: the same set named another way, or moved, is the same plan.
    fit["features"] = [{**s, "path": None if s["path"] is None else OTHER_SET} for s in fit["features"]]
    fit["mapping_from"] = None if fit["mapping_from"] is None else OTHER_SET
    return Plan(
        "fit",
        {"format": FIT_FORMAT, "extract": extract.key, "seed": cfg.seed, "fit": fit, "cluster_probe_sha256": probe},
    )


def label_plan(cfg: RunConfig, fit: Plan) -> Plan:
    # a human mapping is an input, as the fits are (`label.label_inputs`): a new one relabels
    label = cfg.label.model_dump(mode="json", exclude={"read", "workers", "score", "human_mapping"})
    # what is labelled and scored: the evaluators and the sensitivity (report's other keys are the report's),
    # under the section's own name, so that a refusal names the keys to set
    report = {"evaluators": list(cfg.evaluators), "sensitivity": cfg.report.sensitivity}
    return Plan(
        "label",
        {
            "fit": fit.key,
            "label": label,
            "report": report,
            "refine": cfg.refine.model_dump(mode="json"),
            "panoptic": cfg.panoptic.model_dump(mode="json"),
        },
    )


def apply_plan(cfg: RunConfig, records: list[ImageRecord], model: dict, fit: dict) -> Plan:
    """`fit`: the applied fit's identity (its fit plan's key and its content key)."""
    return Plan(
        "apply",
        {
            **_patch_features(cfg, records, model),
            "fit": fit,
            "panoptic": cfg.panoptic.model_dump(mode="json"),
            "apply": cfg.apply.model_dump(mode="json", exclude={"model_actors", "label_actors"}),
        },
    )


def differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    """'key.sub: old -> new' for every leaf that differs."""
    out = []
    for key in sorted(set(old) | set(new), key=str):
        a, b, name = old.get(key), new.get(key), f"{prefix}{key}"
        if isinstance(a, dict) and isinstance(b, dict):
            out += differences(a, b, f"{name}.")
        elif a != b:
            out.append(f"{name}: {json.dumps(a)} -> {json.dumps(b)}")
    return out


def recorded_plan(stage_dir: Path) -> dict | None:
    path = Path(stage_dir) / PLAN_FILE
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except ValueError:
        raise StageIncomplete(f"{path} is damaged: delete {stage_dir} to recompute that stage") from None


def plan_conflict(stage_dir: Path, plan: Plan) -> str | None:
    """Why `stage_dir` cannot hold this plan's results (read-only), or None."""
    old = recorded_plan(stage_dir)
    if old is None or old.get("plan_key") == plan.key:
        return None
    diff = differences(old["settings"], plan.settings) if "settings" in old else []
    diff = diff or ["made by an older version of this tool"]
    hint = (
        "; 'dataset' is a fingerprint of the image list, files, sizes and modification times"
        if any(d.startswith(("dataset", "model.weights")) for d in diff)
        else ""
    )
    return (
        f"{stage_dir} holds {old.get('stage', plan.stage)} results made with other settings: {'; '.join(diff[:8])}"
        f"{' ...' if len(diff) > 8 else ''}{hint}"
    )


def refuse_conflicts(conflicts: list[str]) -> None:
    if conflicts:
        raise StageIncomplete(
            "; ".join(conflicts) + ". Use a new output_dir, or delete those folders to recompute them "
            "with these settings (nothing was changed)"
        )


def check_plan(stage_dir: Path, plan: Plan, inputs: str | None = None) -> None:
    """Record the plan of a new stage folder; refuse one made with another plan; start a stale one
    (made from other inputs) afresh."""
    stage_dir = Path(stage_dir)
    refuse_conflicts([c] if (c := plan_conflict(stage_dir, plan)) else [])
    old = recorded_plan(stage_dir)
    if old is not None and old.get("inputs") != inputs:
        log.warning(
            "%s: the %s results there were made from inputs that have changed since (%s, now %s); recomputing them",
            stage_dir,
            plan.stage,
            old.get("inputs"),
            inputs,
        )
        for folder in (DONE_DIR, PARTS_DIR):
            shutil.rmtree(stage_dir / folder, ignore_errors=True)
        (stage_dir / STAGE_COMPLETE).unlink(missing_ok=True)
        old = None
    if old is None:
        write_json_atomic(
            {"stage": plan.stage, "plan_key": plan.key, "inputs": inputs, "settings": plan.settings},
            stage_dir / PLAN_FILE,
        )


def shards_problem(root: Path, done: dict[str, dict], shards: list[str], plan_key: str) -> str | None:
    """Why the done markers of a stage's `shards` (relative to output_dir `root`) cannot be used:
    shards not done, or a marker of another plan or whose files changed; None when all can."""
    missing = [s for s in shards if s not in done]
    if missing:
        return (
            f"{len(missing)} of {len(shards)} shards are not done ({', '.join(missing[:3])}"
            f"{' ...' if len(missing) > 3 else ''})"
        )
    for shard in shards:
        if problems := marker_problems(root, done[shard], plan_key):
            return f"shard {shard}: {'; '.join(problems[:3])} since it was done"
    return None


def require_complete(stage_dir: Path, plan: Plan, shards: list[str], needed_by: str) -> dict[str, dict]:
    """The markers of a finished stage whose results this plan describes; else StageIncomplete
    saying what is missing and which stage to run (it repairs what it finds damaged)."""
    stage_dir = Path(stage_dir)
    fix = f"run `python submit.py {plan.stage}` with this config (or `run`), then {needed_by} again"
    old = recorded_plan(stage_dir)
    if old is None:
        raise StageIncomplete(
            f"{needed_by} needs the {plan.stage} stage's results in {stage_dir}, and there are none: {fix}"
        )
    refuse_conflicts([c] if (c := plan_conflict(stage_dir, plan)) else [])
    done = read_done(stage_dir)
    if problem := shards_problem(stage_dir.parent, done, shards, plan.key):
        raise StageIncomplete(
            f"{needed_by} needs the whole {plan.stage} stage, but {problem}: {fix}"
            f"{' (it redoes that shard)' if problem.startswith('shard ') else ''}"
        )
    return {s: done[s] for s in shards}
