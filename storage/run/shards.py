"""A stage's work in shards of consecutive images (deterministic: records are sorted), and the dataset's
fingerprint that every stage's plan records.
"""

import hashlib
import json
from pathlib import Path

from storage.datasets import ImageRecord


def plan_shards(records: list[ImageRecord], images_per_shard: int) -> list[dict]:
    """Consecutive slices of the sorted records -> [{"shard": "shard-00000", "records": "<json>"}]."""
    return [
        {
            "shard": f"shard-{i // images_per_shard:05d}",
            "records": json.dumps([r.to_dict() for r in records[i : i + images_per_shard]]),
        }
        for i in range(0, len(records), images_per_shard)
    ]


def restrict_shards(shards: list[dict], keep_ids: set[str]) -> list[dict]:
    """The same shards (names and order) holding only the records whose id is in `keep_ids`."""
    return [
        {"shard": s["shard"], "records": json.dumps([r.to_dict() for r in shard_records(s) if r.image_id in keep_ids])}
        for s in shards
    ]


def shard_records(shard_row: dict) -> list[ImageRecord]:
    return [ImageRecord(**d) for d in json.loads(shard_row["records"])]


def dataset_fingerprint(records: list[ImageRecord], root: Path | str) -> str:
    """Identifies the image set: ids, files (relative to the dataset's root), and their sizes and
    modification times (`stamp`), so an image replaced under the same name is a different dataset,
    while the same folder spelt another way (relative, absolute, mounted elsewhere) is the same."""
    prefix = (str(root) if "://" in str(root) else str(Path(root))).rstrip("/") + "/"  # as the listing spells it

    def within(path: str | None) -> str | None:
        return path[len(prefix) :] if path is not None and path.startswith(prefix) else path

    digest = hashlib.sha256()
    for r in records:
        digest.update(
            f"{r.image_id}\t{within(r.image_path)}\t{within(r.label_ids_path)}\t{within(r.instance_ids_path)}"
            f"\t{r.stamp}\n".encode()
        )
    return digest.hexdigest()[:16]
