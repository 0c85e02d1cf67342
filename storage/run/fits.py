"""The fits of a run, one home: which fits a config makes and in what order, where they are and whether they
still stand for the features they were made from (the fit stage's one marker), the fits imported from
another tool (`import_fit`), and each fit's pixel stride.
"""

import json
import logging
import re
from pathlib import Path

from configs.schema import RunConfig
from core.classes import NUM_CLASSES
from core.clustering.fit_artifact import FitArtifact
from core.clustering.imported import read_centre_file
from core.errors import UserError
from storage.run.atomic import write_json_atomic
from storage.run.feature_sets import FeatureSet, Sources
from storage.run.layout import Layout, settings_key
from storage.run.markers import marker_problems, output_records, read_json
from storage.run.plans import Plan, StageIncomplete, check_plan, plan_conflict, refuse_conflicts

log = logging.getLogger(__name__)


class FitError(UserError, ValueError):
    """The features cannot be fitted as configured; the message says what to change."""


def baseline_name(cfg: RunConfig) -> str:
    return "baseline_probe27" if cfg.fit.baseline == "cluster_probe" else f"baseline_k{NUM_CLASSES}"


def fit_names(cfg: RunConfig) -> list[str]:
    """The main fit first (its labels are the ones written), then the sweep, then the baseline."""
    sweep = [f"k{k}" for k in cfg.all_k if k != cfg.fit.k]
    return [f"k{cfg.fit.k}", *sweep, baseline_name(cfg)]


def fit_inputs(sources: Sources, mapping: FeatureSet) -> str:
    """What the fits are made from: the content of every feature set they read."""
    return inputs_key([fs.content_key for fs, _ in sources], mapping.content_key)


def inputs_key(fitted_on: list[str | None], mapped_on: str | None) -> str:
    return settings_key({"fitted_on": fitted_on, "mapped_on": mapped_on})


def recorded_fit_inputs(cfg: RunConfig, own: FeatureSet) -> str:
    """`fit_inputs` as the label and report stages check the fits: this run's own features as they
    are now, the other sets as the fits recorded them (`fitted_on`, `mapped_on`). The fits stand
    for those sets, which are not read again: a large set may have moved on (or away) since; the
    fit stage compares them again (and refits) when it runs."""
    header = read_json(Layout(cfg.output_dir).fits / fit_names(cfg)[0] / "meta.json") or {}
    meta = header.get("meta") if isinstance(header, dict) else None
    meta = meta if isinstance(meta, dict) else {}
    fitted = meta.get("fitted_on") or []
    keys = [
        own.content_key if s.path is None else (fitted[i].get("content_key") if i < len(fitted) else None)
        for i, s in enumerate(cfg.fit.features)
    ]
    mapped = own.content_key if cfg.fit.mapping_from is None else (meta.get("mapped_on") or {}).get("content_key")
    return inputs_key(keys, mapped)


def extracted_model(markers: dict[str, dict]) -> str:
    """The model description extract recorded (the first shard with an extracted image)."""
    models = [m["model"] for m in markers.values() if m.get("model")]
    return models[0] if models else "(no image was extracted)"


BACKBONE_COMPARISON = "_backbone_comparison"  # the fit summary's entry for model.compare_backbone

FITS_MARKER = "_done.json"  # the fit stage's one marker: its plan, its inputs and every file it wrote


def save_fits(layout: Layout, plan: Plan, inputs: str, fits: dict[str, FitArtifact], summary: dict) -> None:
    """The fits, their summary, and last the fit stage's one marker (its plan, inputs and every file)."""
    check_plan(layout.fits, plan, inputs)
    for name, fit in fits.items():
        fit.save(layout.fits / name)
    write_json_atomic(summary, layout.fits / "fit_summary.json")
    files = [p for n in fits for p in sorted((layout.fits / n).iterdir())] + [layout.fits / "fit_summary.json"]
    write_json_atomic(
        {"plan_key": plan.key, "inputs": inputs, "outputs": output_records(layout.root, files)},
        layout.fits / FITS_MARKER,
    )


def fits_marker_problems(fits_dir: Path, plan: Plan, inputs: str) -> list[str]:
    """Why the fits in `fits_dir` are not this plan's fits of these features, unchanged; [] when they are."""
    path = fits_dir / FITS_MARKER
    if not path.is_file():
        return [f"{path} is missing (the fit stage has not finished)"]
    try:
        marker = json.loads(path.read_text())
    except ValueError:
        return [f"{path} is damaged"]
    if marker.get("inputs") != inputs:
        return ["they were made from other features than extract's now"]
    return marker_problems(fits_dir.parent, marker, plan.key)


def load_existing_fits(fits_dir: Path, names: list[str], plan: Plan, inputs: str) -> dict[str, FitArtifact] | None:
    problems = fits_marker_problems(fits_dir, plan, inputs)
    if problems:
        if (fits_dir / FITS_MARKER).is_file():
            log.warning("fit: not reusing the fits in %s: %s; fitting again", fits_dir, "; ".join(problems[:3]))
        return None
    return {n: FitArtifact.load(fits_dir / n) for n in names}


def require_fits(
    cfg: RunConfig, plan: Plan, inputs: str, needed_by: str, with_imported: bool = True
) -> tuple[dict[str, FitArtifact], dict]:
    """The fits of this plan made from these features, unchanged since, then (`with_imported`) the
    fits imported into the run (`import_fit`), each unchanged since, in `scored_fit_names` order, and
    the fit summary (an imported fit's entry says where it came from); else StageIncomplete saying
    what to run."""
    fits_dir = Layout(cfg.output_dir).fits
    refuse_conflicts([c] if (c := plan_conflict(fits_dir, plan)) else [])
    if problems := fits_marker_problems(fits_dir, plan, inputs):
        raise StageIncomplete(
            f"{needed_by} needs the fits in {fits_dir}, but {'; '.join(problems[:3])}: run "
            f"`python submit.py fit` with this config (or `run`), then {needed_by} again"
        )
    summary = json.loads((fits_dir / "fit_summary.json").read_text())
    imported = imported_fits(fits_dir) if with_imported else {}
    for name, record in imported.items():
        if problems := marker_problems(fits_dir.parent, record, plan.key):
            source = record["imported_from"]["file"]
            raise StageIncomplete(
                f"{needed_by} needs the fit {fits_dir / name} imported from {source}, but "
                f"{'; '.join(problems[:3])}: import that file under that name again (`python "
                f"submit.py import-fit {source} --run {cfg.output_dir} --name {name}`), which writes "
                "it anew"
            )
        summary[name] = {
            "k": record["k"],
            "mapping_kind": IMPORTED,
            "fitted_by": "imported",
            "patch_level": None,
            "imported_from": record["imported_from"],
        }
    return {n: FitArtifact.load(fits_dir / n) for n in scored_fit_names(cfg, imported)}, summary


IMPORTED = "imported"  # an imported fit's mapping kind: the mapping came with its centres

IMPORTED_FITS = "_imported.json"  # in fits/: per imported fit, its source and its files with sizes and checksums

FIT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")

# the fit stage's names for its fits, with any settings, in any case (folders of names that differ only
# in case are one folder on macOS and Windows)
OWN_NAMES = re.compile(r"k\d+|baseline_.*|backbone_.*", re.IGNORECASE)


def imported_fits(fits_dir: Path) -> dict[str, dict]:
    """The fits imported into a run (`import_fit`), by name, in the order they were imported."""
    path = Path(fits_dir) / IMPORTED_FITS
    if not path.is_file():
        return {}
    try:
        imported = dict(json.loads(path.read_text()))
        if all(FIT_NAME.fullmatch(name) and isinstance(record, dict) for name, record in imported.items()):
            return imported
    except (ValueError, TypeError):
        pass
    raise StageIncomplete(
        f"{path} is damaged: delete it and the fit folders it named, then import those fits again "
        "(`python submit.py import-fit`)"
    )


def scored_fit_names(cfg: RunConfig, imported: dict[str, dict]) -> list[str]:
    """The fits the label stage labels and the report scores: the main fit, the sweep, the imported
    fits, the baseline (last)."""
    names = fit_names(cfg)
    return [*names[:-1], *imported, names[-1]]


def fit_pixel_stride(cfg: RunConfig, name: str) -> int:
    """The pixel stride a fit's labels are scored at: `label.sweep_pixel_stride` for the sweep's extra
    fits (their labels are never written), every pixel for the main fit, the baseline and imported fits."""
    return cfg.label.sweep_pixel_stride if name in fit_names(cfg)[1:-1] else 1


def import_fit(
    cfg: RunConfig,
    plan: Plan,
    extract: Plan,
    model: str,
    fits: dict[str, FitArtifact],
    source: Path,
    name: str,
    keys: tuple[str, str],
) -> Path:
    """Write the centres and mapping of another tool's .npz (`core.clustering.imported`) as the fit
    `fits/<name>` of this run, whose fit stage is complete (`fits`: its own fits). The fit is this run's
    model's (its identity, as the run's own fits record it: the dimension is what can be checked) and
    of the fit stage's plan; `fits/_imported.json` records it with its source's SHA-256 and its files.
    The same file imported under the same name again does nothing, or writes the fit anew where its
    files changed since."""
    fits_dir = Layout(cfg.output_dir).fits
    imported = imported_fits(fits_dir)
    if not FIT_NAME.fullmatch(name) or OWN_NAMES.fullmatch(name):
        raise FitError(
            f"--name {name!r}: name the imported fit with letters, digits, '.', '_' or '-' (starting with a "
            "letter or digit, at most 64), other than the names the fit stage gives (k<k>, baseline_*, "
            "backbone_*), e.g. --name seed_k300"
        )
    main = fits[fit_names(cfg)[0]]
    centres = read_centre_file(source, main.feature_dim, keys)
    same = [
        n
        for n, r in imported.items()
        if n != name
        and (r["imported_from"]["sha256"], r["imported_from"]["keys"])
        == (centres.record["sha256"], centres.record["keys"])
    ]
    if same:
        raise FitError(
            f"{source} holds the same centres as the fit {fits_dir / same[0]}, imported from "
            f"{imported[same[0]]['imported_from']['file']}: use that fit"
        )
    if name in imported:
        if imported[name]["imported_from"] != centres.record:
            raise FitError(
                f"--name {name!r}: {fits_dir / name} exists already (imported from "
                f"{imported[name]['imported_from']['file']}): choose another --name"
            )
        if not marker_problems(fits_dir.parent, imported[name], plan.key):
            log.info("import-fit: %s was imported from %s already (same SHA-256 and keys): nothing to do", name, source)
            return fits_dir / name
        log.warning("import-fit: the files of %s changed since it was imported; writing it anew", fits_dir / name)
    elif name in fits or (fits_dir / name).exists():  # e.g. fit_summary.json, which the fit's folder would replace
        raise FitError(
            f"--name {name!r}: {fits_dir / name} exists already "
            f"({'a fit of this run' if name in fits else 'not a fit'}): choose another --name"
        )
    elif clash := [p.name for p in fits_dir.iterdir() if p.name.lower() == name.lower()]:
        raise FitError(
            f"--name {name!r}: {fits_dir / clash[0]} differs from it only in case, and the two would be one "
            "folder on a case-insensitive file system (macOS, Windows): choose another --name"
        )
    artifact = FitArtifact(
        centroids=centres.centroids,
        mapping=centres.mapping,
        mapping_kind=IMPORTED,
        meta={
            "name": name,
            "k": len(centres.mapping),
            "plan_key": plan.key,
            "model_identity": extract.settings["model"],
            "feature_kind": cfg.model.feature_kind,
            "feature_dim": main.feature_dim,
            "model": model,
            "protocol": cfg.protocol,
            "imported_from": centres.record,
        },
    )
    artifact.save(fits_dir / name)
    imported[name] = {
        "plan_key": plan.key,
        "k": artifact.k,
        "imported_from": centres.record,
        "outputs": output_records(fits_dir.parent, sorted((fits_dir / name).iterdir())),
    }
    write_json_atomic(imported, fits_dir / IMPORTED_FITS)
    return fits_dir / name
