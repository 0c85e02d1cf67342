"""The shape every stage actor shares: a Ray Data actor handed batches of shard rows."""

from abc import ABC, abstractmethod
from pathlib import Path

import numpy as np

from storage.shards import marker_path


class ShardActor(ABC):
    """Subclasses set `stage_dir` in `__init__` (after building their model once) and implement
    `process_shard(shard, shard_row)`, which writes the shard's outputs and, last, its marker."""

    stage_dir: Path

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        shards = list(batch["shard"])
        for shard, records in zip(shards, batch["records"]):
            # A restarted actor may be handed a shard again: its marker makes the retry a no-op.
            if not marker_path(self.stage_dir, shard).exists():
                self.process_shard(shard, {"shard": shard, "records": records})
        return {"shard": shards}

    @abstractmethod
    def process_shard(self, shard: str, shard_row: dict) -> None:
        """Write the shard's outputs, then its completion marker."""
