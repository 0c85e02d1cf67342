"""Where each stage writes inside output_dir, and the keys that say what a result was made from."""

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel


@dataclass(frozen=True)
class Layout:
    root: Path

    @property
    def features(self) -> Path:  # shard-*.parquet patch rows
        return self.root / "features"

    @property
    def fits(self) -> Path:  # one FitArtifact folder per fit
        return self.root / "fits"

    @property
    def scores(self) -> Path:  # shard-*.npz confusion matrices and cluster wins
        return self.root / "scores"

    @property
    def labels(self) -> Path:  # pseudo-label PNGs, per city
        return self.root / "labels"

    @property
    def histograms(self) -> Path:  # apply stage: shard-*.parquet per-image cluster histograms
        return self.root / "histograms"

    @property
    def figures(self) -> Path:
        return self.root / "figures"


def settings_key(*parts) -> str:
    """A short hash of shard plans and config sections, stable across runs and machines."""

    def plain(p):
        return p.model_dump(mode="json") if isinstance(p, BaseModel) else p

    blob = json.dumps([plain(p) for p in parts], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]
