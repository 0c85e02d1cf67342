"""A person's cluster -> class mapping (`mapping.json`, exported by the cluster atlas), checked
against the fit it was made for.

The file names the fit by `fingerprint` (a hash of its centroids: a refit, even with the same k,
has other clusters) and `k`, and gives every cluster's trainId (0-18) or 255 ("ignore": its pixels
stay unlabelled). `named` lists the clusters the person chose; the others keep the fit's mapping.
"""

import json
from collections import Counter
from pathlib import Path

import numpy as np

from core.classes import CLASS_NAMES, IGNORE, NUM_CLASSES
from core.clustering.fit_artifact import FitArtifact
from core.errors import UserError

FORMAT = "overclust-mapping/1"


class HumanMappingError(UserError, ValueError):
    """A mapping.json that does not fit the fit it is used with; the message says why and what to do."""


def mapping_document(fit: FitArtifact, mapping: np.ndarray, named: list[int]) -> dict:
    """The JSON document of a mapping for `fit` (what the atlas exports)."""
    return {
        "format": FORMAT,
        "fingerprint": fit.centroids_key(),
        "k": fit.k,
        "mapping": {str(c): int(t) for c, t in enumerate(mapping)},
        "named": sorted(int(c) for c in named),
        "classes": {str(i): name for i, name in enumerate(CLASS_NAMES)} | {str(IGNORE): "ignore"},
    }


def _unique_keys(pairs: list[tuple[str, object]]) -> dict:
    """A JSON object whose keys are all different: a cluster given twice is a mistake, not the last one."""
    twice = sorted(key for key, n in Counter(key for key, _ in pairs).items() if n > 1)
    if twice:
        raise ValueError(f"key {twice[0]!r} appears more than once in one object")
    return dict(pairs)


def load_human_mapping(path: Path, fit: FitArtifact, fit_dir: Path) -> np.ndarray:
    """(k,) int64 trainIds from `path`, refused unless it was made for this very fit."""
    path = Path(path)
    fix = f"export a mapping from the atlas of {fit_dir} (`python submit.py atlas --fit {fit_dir}`)"
    try:
        doc = json.loads(path.read_text(encoding="utf-8-sig"), object_pairs_hook=_unique_keys)
    except FileNotFoundError:
        raise HumanMappingError(f"mapping file {path} does not exist: {fix}") from None
    except (OSError, ValueError, RecursionError) as err:  # RecursionError: nested too deep to be a mapping
        raise HumanMappingError(
            f"mapping file {path} is not readable JSON ({type(err).__name__}: {err}): {fix}"
        ) from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT or not isinstance(doc.get("mapping"), dict):
        raise HumanMappingError(f"{path} is not a cluster mapping (format {FORMAT!r} with a 'mapping' object): {fix}")
    if doc.get("k") != fit.k or doc.get("fingerprint") != fit.centroids_key():
        raise HumanMappingError(
            f"{path} was made for another fit (fingerprint {doc.get('fingerprint')!r}, k={doc.get('k')}) "
            f"than {fit_dir} (fingerprint {fit.centroids_key()!r}, k={fit.k}): its cluster numbers "
            f"mean other clusters here; {fix}"
        )
    mapping = fit.mapping.copy()
    expected = {str(c) for c in range(fit.k)}
    if set(doc["mapping"]) != expected:
        missing, extra = sorted(expected - set(doc["mapping"]), key=int), sorted(set(doc["mapping"]) - expected)
        raise HumanMappingError(
            f"{path}: the mapping must give every cluster 0..{fit.k - 1} once; missing {missing[:5]}, "
            f"unknown {extra[:5]}: {fix}"
        )
    for cluster, train_id in doc["mapping"].items():
        if (
            not isinstance(train_id, int)
            or isinstance(train_id, bool)
            or not (0 <= train_id < NUM_CLASSES or train_id == IGNORE)
        ):
            raise HumanMappingError(
                f"{path}: cluster {cluster} -> {train_id!r}; a trainId 0-{NUM_CLASSES - 1} or {IGNORE} "
                "(ignore) is needed"
            )
        mapping[int(cluster)] = train_id
    return mapping
