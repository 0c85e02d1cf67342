"""The feature sets a fit reads: this run's own `features/`, or another run's, or the features an
apply wrote (`apply.write_features`), each a complete stage made by this run's model.

A fit may be made on a large unlabelled set and mapped on a small labelled one (`fit.features`,
`fit.mapping_from`). A set is used only when it is what its own stage says it is: its plan
(`_plan.json`), the record that every planned shard finished (`_complete.json`, written by
`ray_jobs.streaming.run_image_stream`), every shard's marker and every file the markers list.
Features of another model (architecture, weights, inference settings, protocol) are refused.
"""

from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from configs.schema import FeatureSourceConfig
from core.errors import UserError
from storage.features import feature_path
from storage.run.layout import Layout
from storage.run.markers import STAGE_COMPLETE, content_key, read_done, read_json, read_verified_parquet
from storage.run.plans import PLAN_FILE, differences, recorded_plan, shards_problem


class FeatureSetError(UserError, ValueError):
    """A feature set named in the config cannot be used; the message names it and the fix."""


class FeatureShards:
    """The scale-1 Parquet files of a complete stage (or, with path_of=backbone_path, the backbone's
    beside them), read whole and checked against their markers (a file changed since the stage
    wrote it is an error naming it)."""

    def __init__(
        self,
        features_dir: Path,
        markers: dict[str, dict],
        path_of=feature_path,
        fix: str = "run `python submit.py extract` with this config: it redoes that shard",
    ):
        self.root, self.markers = Path(features_dir).parent, markers
        self.paths = [path_of(features_dir, shard) for shard in markers]
        self.fix = fix

    def tables(self, columns: list[str], desc: str):
        for marker, path in tqdm(
            zip(self.markers.values(), self.paths), total=len(self.paths), desc=desc, unit="shard"
        ):
            yield read_verified_parquet(self.root, marker, path, self.fix, columns)


@dataclass(frozen=True)
class FeatureSet:
    name: str  # "this run" or the path as the config gives it
    features_dir: Path
    stage: str  # the stage that wrote it: extract | apply
    markers: dict[str, dict]  # shard -> its marker, in shard order
    dataset_fingerprint: str
    rerun: str  # the command that repairs it

    @property
    def content_key(self) -> str:
        return content_key(self.markers)

    @property
    def num_patches(self) -> int:
        return sum(int(m.get("num_patches", 0)) for m in self.markers.values())

    @property
    def num_labelled_patches(self) -> int | None:
        """Patches with a ground-truth class; None where a marker predates the count."""
        if any("labelled_patches" not in m for m in self.markers.values()):
            return None
        return sum(int(m["labelled_patches"]) for m in self.markers.values())

    def patch_files(self) -> dict[str, Path]:
        """SHA-256 -> path of each shard's patch file (scale 1) that holds patches, from the markers."""
        files = {}
        for shard, marker in self.markers.items():
            path = feature_path(self.features_dir, shard)
            record = (marker.get("outputs") or {}).get(str(path.relative_to(self.features_dir.parent)))
            if record is not None and int(marker.get("num_patches", 0)):
                files[record["sha256"]] = path
        return files

    def shards(self, path_of=feature_path) -> FeatureShards:
        return FeatureShards(self.features_dir, self.markers, path_of, f"{self.rerun}: it redoes that shard")

    def record(self) -> dict:
        """What a fit records of the set it was made from (`fitted_on`, `mapped_on`)."""
        return {
            "features": self.name,
            "stage": self.stage,
            "content_key": self.content_key,
            "dataset_fingerprint": self.dataset_fingerprint,
            "num_shards": len(self.markers),
            "num_patches": self.num_patches,
        }


def refuse_repeated_content(sets: list[FeatureSet], role: str = "fit.features") -> None:
    """Each set once: one folder under two spellings, a copy, or the same images extracted again
    elsewhere (byte-identical files, whenever they were written) would weigh their patches twice.
    Sets overlap where their content keys are equal, or where a patch file of one has the content of
    one of another's (a partial copy)."""
    fix = "list each set once, with its weight (a re-extracted copy of a set is the same set)"
    for i, fs in enumerate(sets):
        for other in sets[:i]:
            if fs.features_dir.resolve() == other.features_dir.resolve():
                raise FeatureSetError(
                    f"{role} names the same features twice: {other.features_dir} and {fs.features_dir} are "
                    f"one folder: {fix}"
                )
            if fs.content_key == other.content_key:
                raise FeatureSetError(
                    f"{role} names the same features twice: {other.features_dir} and {fs.features_dir} "
                    f"have the same content (content key {fs.content_key}): {fix}"
                )
            shared = sorted(set(fs.patch_files()) & set(other.patch_files()))
            if shared:
                raise FeatureSetError(
                    f"{role} names the same features twice: {other.patch_files()[shared[0]]} and "
                    f"{fs.patch_files()[shared[0]]} have the same content ({len(shared)} such files "
                    f"in {other.features_dir} and {fs.features_dir}): {fix}"
                )


def own_feature_set(features_dir: Path, markers: dict[str, dict], dataset_fingerprint: str) -> FeatureSet:
    """This run's extract stage (checked complete by the caller: `plans.require_complete`)."""
    return FeatureSet(
        "this run",
        Path(features_dir),
        "extract",
        markers,
        dataset_fingerprint,
        "run `python submit.py extract` with this config",
    )


def open_feature_set(path: str, model: dict, role: str) -> FeatureSet:
    """Another run's features (an output_dir or its features/ folder), complete and made by `model`
    (this run's `plans.model_identity`); `role` names the config key in every message."""
    given = Path(path)
    features_dir = given / "features" if (given / "features" / PLAN_FILE).is_file() else given
    plan = recorded_plan(features_dir)
    if plan is None:
        raise FeatureSetError(
            f"{role}={path!r}: no extracted features there ({features_dir / PLAN_FILE} is missing). Name a "
            "run's output_dir or its features/ folder, written by `python submit.py extract` or by "
            "`python submit.py apply --set apply.write_features=true`"
        )
    stage = plan.get("stage")
    if stage not in ("extract", "apply") or features_dir.name != "features":
        what = "cluster histograms" if stage == "apply" else f"{stage} results"
        raise FeatureSetError(
            f"{role}={path!r}: {features_dir} holds {what}, not patch features. Name a run's output_dir "
            "or its features/ folder (kept under that name: its markers name the files from the folder "
            "above it); an apply writes features only with `--set apply.write_features=true`"
        )
    rerun = f"run the `python submit.py {stage}` that wrote {features_dir} again, with its config"
    settings = plan.get("settings", {})
    if settings.get("model") != model:
        diff = differences(settings.get("model") or {}, model)
        raise FeatureSetError(
            f"{role}={path!r}: its features were made by another model than this run's: "
            f"{'; '.join(diff[:8])}. Extract them with this run's model and inference settings (or "
            "fit with the config that made them)"
        )
    markers_dir = features_dir if stage == "extract" else Layout(features_dir.parent).histograms
    complete = read_json(markers_dir / STAGE_COMPLETE)
    if complete is None or complete.get("plan_key") != plan.get("plan_key"):
        raise FeatureSetError(
            f"{role}={path!r}: the {stage} stage that writes {features_dir} has not recorded that it "
            f"finished ({markers_dir / STAGE_COMPLETE} is {'missing' if complete is None else 'of another plan'}): "
            f"{rerun}; it resumes and records it"
        )
    done = read_done(markers_dir)
    if problem := shards_problem(features_dir.parent, done, complete["shards"], plan["plan_key"]):
        raise FeatureSetError(f"{role}={path!r}: {stage} in {features_dir}: {problem}: {rerun}")
    markers = {shard: done[shard] for shard in complete["shards"]}
    if not markers:
        raise FeatureSetError(f"{role}={path!r}: {features_dir} holds no shards (the dataset was empty)")
    return FeatureSet(str(path), features_dir, stage, markers, settings.get("dataset", ""), rerun)


Sources = list[tuple[FeatureSet, FeatureSourceConfig]]  # what the centroids are fitted on, with each set's share
