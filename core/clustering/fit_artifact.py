"""The fit stage's product: centroids + cluster->class mapping + metadata, as one folder.

Layout: centroids.npy (k, d) float32 unit rows, mapping.npy (k,) int64 (255 = no class) and
meta.json ({"format", "mapping_kind", "k", "feature_dim", "saved_at", "meta"}). k and feature_dim
are repeated in meta.json so that a load notices arrays that do not belong together.
"""

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from core.errors import UserError

FORMAT = 1
FILES = ("centroids.npy", "mapping.npy", "meta.json")


class FitArtifactError(UserError, ValueError):
    """A fit folder that cannot be loaded; the message names the file and the fix."""


def _problem(centroids: np.ndarray, mapping: np.ndarray) -> str | None:
    """What is wrong with this pair of arrays, or None."""
    if centroids.ndim != 2 or centroids.shape[0] == 0 or not np.issubdtype(centroids.dtype, np.floating):
        return f"centroids must be a non-empty 2-D float array (k, d), got {centroids.dtype} of shape {centroids.shape}"
    if not np.isfinite(centroids).all():
        return "centroids contain NaN or inf"
    if not np.allclose(np.linalg.norm(centroids, axis=1), 1.0, atol=1e-3):
        return "centroids are not L2-normalised rows"
    if mapping.shape != (centroids.shape[0],) or not np.issubdtype(mapping.dtype, np.integer):
        return (
            f"mapping must be {centroids.shape[0]} integers (one per centroid), got {mapping.dtype} of shape "
            f"{mapping.shape}"
        )
    if mapping.min() < 0 or mapping.max() > 255:
        return f"mapping values must be trainIds in [0, 255], got [{mapping.min()}, {mapping.max()}]"
    return None


@dataclass
class FitArtifact:
    centroids: np.ndarray  # (k, d) float32, L2-normalised
    mapping: np.ndarray  # (k,) int64 cluster -> trainId (255 = no class)
    mapping_kind: str  # "majority" | "hungarian"
    meta: dict  # JSON-safe: feature kind, model, dataset fingerprint, seed, engine, n_samples, ...
    # Further named arrays kept with the fit (e.g. per-fold mapping counts, the label-free mapping).
    extra_arrays: dict[str, np.ndarray] = field(default_factory=dict)

    def __post_init__(self):
        if problem := _problem(np.asarray(self.centroids), np.asarray(self.mapping)):
            raise ValueError(problem)
        if bad := [n for n in self.extra_arrays if not n.isidentifier() or f"{n}.npy" in FILES]:
            raise ValueError(f"extra array names must be identifiers other than centroids/mapping, got {bad}")
        self.centroids = np.ascontiguousarray(self.centroids, dtype=np.float32)
        self.mapping = np.asarray(self.mapping, dtype=np.int64)

    @property
    def k(self) -> int:
        return self.centroids.shape[0]

    @property
    def feature_dim(self) -> int:
        return self.centroids.shape[1]

    def centroids_key(self) -> str:
        """A short hash of the centroids alone: which clusters these are, whatever they are mapped to."""
        return hashlib.sha256(self.centroids.tobytes()).hexdigest()[:16]

    def content_key(self) -> str:
        """A short hash of the centroids and the mapping: what labels made with this fit depend on."""
        digest = hashlib.sha256(self.centroids.tobytes())
        digest.update(self.mapping.tobytes())
        return digest.hexdigest()[:16]

    def save(self, directory: Path) -> None:
        """Write the folder atomically: readers see the old artifact or the new one, never a mix.

        The files go into a temporary sibling folder first. A folder cannot be renamed over a
        non-empty one, so an existing artifact is first renamed aside, then deleted; between the
        two renames (microseconds) the folder is absent, and a reader gets a clear 'missing' error.
        """
        directory = Path(directory)
        directory.parent.mkdir(parents=True, exist_ok=True)
        header = {
            "format": FORMAT,
            "mapping_kind": self.mapping_kind,
            "k": self.k,
            "feature_dim": self.feature_dim,
            "saved_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "extra_arrays": sorted(self.extra_arrays),
            "meta": self.meta,
        }
        text = json.dumps(header, indent=2)  # before touching the disk: a non-JSON-safe meta fails here
        staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.tmp-", dir=directory.parent))
        old = staging.with_name(f"{staging.name}.old")
        try:
            np.save(staging / "centroids.npy", self.centroids)
            np.save(staging / "mapping.npy", self.mapping)
            for name, array in self.extra_arrays.items():
                np.save(staging / f"{name}.npy", np.asarray(array))
            (staging / "meta.json").write_text(text)
            if directory.exists():
                os.replace(directory, old)
            os.replace(staging, directory)
        except BaseException:
            if old.exists() and not directory.exists():
                os.replace(old, directory)  # put the previous artifact back
            shutil.rmtree(staging, ignore_errors=True)
            raise
        shutil.rmtree(old, ignore_errors=True)

    @classmethod
    def load(cls, directory: Path) -> "FitArtifact":
        directory = Path(directory)
        for name in FILES:
            if not (directory / name).is_file():
                raise FitArtifactError(f"fit artifact file {directory / name} is missing; re-run the fit stage")
        arrays = {}
        try:
            header = json.loads((directory / "meta.json").read_text())
            fmt, kind, k, dim, meta = (
                header["format"],
                header["mapping_kind"],
                header["k"],
                header["feature_dim"],
                header["meta"],
            )
            extra_names = list(header.get("extra_arrays", []))
        except (ValueError, KeyError, TypeError) as err:
            raise FitArtifactError(
                f"{directory / 'meta.json'} is corrupt ({err!r}); delete {directory} and re-run the fit stage"
            ) from err
        for name in ("centroids.npy", "mapping.npy", *(f"{n}.npy" for n in extra_names)):
            try:
                arrays[name] = np.load(directory / name, allow_pickle=False)
            except (OSError, ValueError, EOFError) as err:
                raise FitArtifactError(
                    f"{directory / name} is corrupt ({err}); delete {directory} and re-run the fit stage"
                ) from err
        if fmt != FORMAT:
            raise FitArtifactError(
                f"{directory / 'meta.json'}: artifact format {fmt}, this version reads {FORMAT}; re-run the fit stage"
            )
        try:
            artifact = cls(
                centroids=arrays["centroids.npy"],
                mapping=arrays["mapping.npy"],
                mapping_kind=kind,
                meta=meta,
                extra_arrays={n: arrays[f"{n}.npy"] for n in extra_names},
            )
        except ValueError as err:
            raise FitArtifactError(
                f"{directory} (centroids.npy, mapping.npy): {err}; delete it and re-run the fit stage"
            ) from err
        if (artifact.k, artifact.feature_dim) != (k, dim):
            raise FitArtifactError(
                f"{directory / 'centroids.npy'} has shape {artifact.centroids.shape} but meta.json says k={k}, "
                f"feature_dim={dim}; the files come from different fits: re-run the fit stage"
            )
        return artifact
