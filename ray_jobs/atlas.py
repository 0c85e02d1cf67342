"""Atlas stage: the cluster atlas of a fit (`core.reporting.atlas`), from its run's features and images.

Two passes of Ray tasks. The first assigns every patch of every shard to the fit's clusters and
keeps, per cluster, the EXAMPLES members of lowest priority (`core.clustering.sampling.patch_priorities`:
seeded, independent of the shard layout) with their counts, tree-reduced. The second reads each
chosen member's image and cuts its thumbnail, a task per group of images. The driver lays the
thumbnails out in sprite sheets and writes the page. An image that cannot be read leaves its
thumbnails black and is listed in the atlas's `failed_items.json`; the rest is written.
"""

import io
import logging
import os
from pathlib import Path

import numpy as np
import ray
from PIL import Image
from tqdm import tqdm

from configs.geometry import image_limits
from configs.schema import RunConfig
from core.clustering.fit_artifact import FitArtifact
from core.clustering.kmeans import assign_clusters
from core.clustering.sampling import patch_priorities
from core.errors import UserError
from core.reporting.atlas import (
    EXAMPLES,
    SPRITE_CLUSTERS,
    cluster_cards,
    patch_box,
    render_html,
    sprite_sheet,
    thumbnail,
)
from ray_jobs.shard_tasks import map_reduce_shards
from storage.datasets import ImageRecord
from storage.features import features_from_table
from storage.images import ImageLimits, read_rgb
from storage.run.atomic import write_json_atomic, write_text_atomic
from storage.run.feature_sets import FeatureShards

log = logging.getLogger(__name__)

IMAGES_PER_TASK = 16


class AtlasError(UserError, ValueError):
    """The atlas cannot be made as asked; the message says what to change."""


def _lowest_per_cluster(members: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    order = np.lexsort((members["priority"], members["cluster"]))
    cluster = members["cluster"][order]
    starts = np.searchsorted(cluster, cluster, side="left")
    keep = order[np.arange(len(order)) - starts < EXAMPLES]
    return {key: value[keep] for key, value in members.items()}


def _shard_members(table, _index: int, centroids: np.ndarray, seed: int) -> dict:
    image_ids = table.column("image_id").to_numpy(zero_copy_only=False)
    rows, cols = table.column("row").to_numpy().astype(np.int64), table.column("col").to_numpy().astype(np.int64)
    image_area = table.column("height").to_numpy().astype(np.float64) * table.column("width").to_numpy()
    assigned = assign_clusters(features_from_table(table), centroids).astype(np.int64)
    priorities, image_index = patch_priorities(image_ids, seed)
    grid_h = np.zeros(image_index.max(initial=-1) + 1, np.int64)
    grid_w = np.zeros_like(grid_h)
    np.maximum.at(grid_h, image_index, rows + 1)
    np.maximum.at(grid_w, image_index, cols + 1)
    members = {
        "priority": priorities,
        "cluster": assigned,
        "image_id": image_ids.astype(object),
        "row": rows,
        "col": cols,
        "grid_h": grid_h[image_index],
        "grid_w": grid_w[image_index],
    }
    patch_area = image_area / (members["grid_h"] * members["grid_w"])  # the pixels of its image one patch stands for
    return {
        "patches": np.bincount(assigned, minlength=len(centroids)),
        "pixels": np.bincount(assigned, patch_area, minlength=len(centroids)),
        "members": _lowest_per_cluster(members),
    }


def _merge_members(a: dict, b: dict) -> dict:
    return {
        "patches": a["patches"] + b["patches"],
        "pixels": a["pixels"] + b["pixels"],
        "members": _lowest_per_cluster({k: np.concatenate([a["members"][k], b["members"][k]]) for k in a["members"]}),
    }


@ray.remote
def _image_thumbnails(
    jobs: list[tuple[str, str, list[tuple[int, int, int, int, int, int]]]], limits: ImageLimits
) -> tuple[list, list]:
    """(image_id, path, [(cluster, slot, row, col, grid_h, grid_w)]) per image -> the thumbnails
    [(cluster, slot, (T, T, 3) uint8)] and the images that could not be read."""
    thumbs, failed = [], []
    for image_id, path, wanted in jobs:
        try:
            image = read_rgb(path, limits)
        except UserError as err:
            failed.append({"stage": "atlas", "image_id": image_id, "error": str(err)})
            continue
        for cluster, slot, row, col, gh, gw in wanted:
            thumbs.append((cluster, slot, thumbnail(image, patch_box(row, col, (gh, gw), image.shape[:2]))))
    return thumbs, failed


def _write_jpeg_atomic(array: np.ndarray, path: Path) -> None:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="JPEG", quality=85)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_bytes(buffer.getvalue())
    os.replace(tmp, path)


def run_atlas(
    cfg: RunConfig, fit_dir: Path, baseline_dir: Path, shards: FeatureShards, records: list[ImageRecord], out_dir: Path
) -> Path:
    """Write the atlas of the fit in `fit_dir` (its run's features `shards`, images `records`) to
    `out_dir`; returns the page's path."""
    fit, baseline = FitArtifact.load(fit_dir), FitArtifact.load(baseline_dir)
    found = map_reduce_shards(
        shards,
        ["image_id", "row", "col", "height", "width", "feature"],
        _shard_members,
        _merge_members,
        (fit.centroids, cfg.seed),
        desc="atlas: choosing examples",
    )
    if found is None:
        raise AtlasError(f"no feature shards to make the atlas of {fit_dir} from: run the extract stage first")
    members = found["members"]
    paths = {r.image_id: r.image_path for r in records}
    slot = np.zeros(len(members["cluster"]), np.int64)  # each member's place in its cluster's row
    for c in np.unique(members["cluster"]):
        at = np.flatnonzero(members["cluster"] == c)
        slot[at[np.argsort(members["priority"][at], kind="stable")]] = np.arange(len(at))
    by_image: dict[str, list] = {}
    for i, image_id in enumerate(members["image_id"]):
        by_image.setdefault(image_id, []).append(
            (
                int(members["cluster"][i]),
                int(slot[i]),
                *(int(members[k][i]) for k in ("row", "col", "grid_h", "grid_w")),
            )
        )
    missing = sorted(set(by_image) - set(paths))
    if missing:
        raise AtlasError(
            f"the features of {fit_dir}'s run name images its dataset does not list ({missing[:3]}): the "
            "dataset changed since extract; run the stages again"
        )
    jobs = [(image_id, paths[image_id], wanted) for image_id, wanted in sorted(by_image.items())]
    limits = image_limits(cfg)  # as extract read them
    refs = [
        _image_thumbnails.remote(jobs[i : i + IMAGES_PER_TASK], limits) for i in range(0, len(jobs), IMAGES_PER_TASK)
    ]
    grid, failed = {}, []
    for ref in tqdm(refs, desc="atlas: thumbnails", unit="task"):
        thumbs, bad = ray.get(ref)
        failed += bad
        grid.update({(cluster, s): thumb for cluster, s, thumb in thumbs})
    examples = np.bincount(members["cluster"], minlength=fit.k)
    rows = [[grid.get((c, s)) for s in range(examples[c])] for c in range(fit.k)]  # None: its image failed
    sprites = out_dir / "sprites"
    sprites.mkdir(parents=True, exist_ok=True)
    for sheet, first in enumerate(range(0, fit.k, SPRITE_CLUSTERS)):
        _write_jpeg_atomic(sprite_sheet(rows[first : first + SPRITE_CLUSTERS]), sprites / f"sprite-{sheet:03d}.jpg")
    cards = cluster_cards(fit, baseline, found["patches"], found["pixels"], examples.tolist())
    info = {
        "fit": Path(fit_dir).name,
        "run": str(cfg.output_dir),
        "examples": f"up to {EXAMPLES} member patches per cluster, drawn by a seeded hash (seed {cfg.seed})",
        "baseline": Path(baseline_dir).name,
    }
    write_json_atomic(failed, out_dir / "failed_items.json")
    write_json_atomic({"info": info, "cards": cards}, out_dir / "atlas.json")
    page = out_dir / "index.html"
    write_text_atomic(render_html(cards, fit, info), page)
    if failed:
        log.warning(
            "atlas: %d images could not be read (their thumbnails are black): see %s",
            len(failed),
            out_dir / "failed_items.json",
        )
    log.info("atlas of %s: %d clusters -> %s", fit_dir, fit.k, page)
    return page
