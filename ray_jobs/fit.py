"""Fit stage (driver): sample patch features, fit k-means for every k, map clusters to classes.

Memory in the driver is bounded by the sample (fit.max_samples rows) and by one Parquet shard at
a time: the cluster x class counts that drive the mapping are accumulated shard by shard over
all patches, not only the sample.
"""

import logging
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
from tqdm import tqdm

from configs.schema import RunConfig
from actors.model_setup import model_spec
from core.clustering import assign_clusters, check_features, fit_kmeans, l2_normalize
from core.fit_artifact import FitArtifact
from core.labels import CLASS_NAMES, IGNORE, NUM_CLASSES
from core.mapping import cluster_class_counts, hungarian_mapping, majority_mapping
from core.metrics import semantic_scores
from core.models import load_cluster_probe
from core.sampling import per_image_sample, subsample
from ray_jobs.layout import Layout, settings_key
from storage.shards import features_from_table, write_json_atomic

log = logging.getLogger(__name__)

class FitError(ValueError):
    """The features cannot be fitted as configured; the message says what to change."""


def baseline_name(cfg: RunConfig) -> str:
    return "baseline_probe27" if cfg.fit.baseline == "cluster_probe" else f"baseline_k{NUM_CLASSES}"


def fit_names(cfg: RunConfig) -> list[str]:
    """The main fit first (its labels are the ones written), then the sweep, then the baseline."""
    sweep = [f"k{k}" for k in cfg.all_k if k != cfg.fit.k]
    return [f"k{cfg.fit.k}", *sweep, baseline_name(cfg)]


def baseline_centroids(cfg: RunConfig, sample: np.ndarray) -> np.ndarray:
    """CAUSE's 27 cluster-probe centroids, or a k = 19 k-means fit where there is no probe."""
    if cfg.fit.baseline == "cluster_probe":
        return l2_normalize(load_cluster_probe(model_spec(cfg).cluster_probe_checkpoint))
    return fit_kmeans(sample, NUM_CLASSES, seed=cfg.seed, engine=cfg.fit.engine, n_iter=cfg.fit.n_iter)


def gather_sample(shard_files: list[Path], cfg: RunConfig) -> np.ndarray:
    """(n, D) float32: at most max_patches_per_image rows per image, at most max_samples overall."""
    parts = []
    for path in tqdm(shard_files, desc="fit: sampling patches", unit="shard"):
        table = pq.read_table(path, columns=["image_id", "feature"])
        rows = per_image_sample(table.column("image_id").to_numpy(zero_copy_only=False), cfg.fit.max_patches_per_image, cfg.seed)
        parts.append(features_from_table(table.take(rows)))
    sample = np.concatenate(parts) if parts else np.zeros((0, 0), np.float32)
    return sample[subsample(len(sample), cfg.fit.max_samples, cfg.seed)]


def count_cluster_classes(shard_files: list[Path], centroids: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """(k, C) labelled-patch counts per fit, over every patch of every shard."""
    counts = {name: np.zeros((len(c), NUM_CLASSES), np.int64) for name, c in centroids.items()}
    for path in tqdm(shard_files, desc="fit: mapping clusters", unit="shard"):
        table = pq.read_table(path, columns=["feature", "label"])
        labels = table.column("label").to_numpy()
        keep = labels != IGNORE
        x = features_from_table(table.filter(keep))
        for name, c in centroids.items():
            counts[name] += cluster_class_counts(assign_clusters(x, c), labels[keep], len(c), NUM_CLASSES)
    return counts


def patch_confusion(counts: np.ndarray, mapping: np.ndarray) -> np.ndarray:
    """(k, C) cluster x class counts + mapping -> (C, C+1) patch-level confusion (col C = unassigned)."""
    conf = np.zeros((NUM_CLASSES, NUM_CLASSES + 1), np.int64)
    cols = np.where(mapping == IGNORE, NUM_CLASSES, mapping)
    np.add.at(conf.T, cols, counts)
    return conf


def run_fit(cfg: RunConfig, dataset_fingerprint: str, model_description: str) -> dict[str, FitArtifact]:
    layout = Layout(cfg.output_dir)
    shard_files = sorted(layout.features.glob("shard-*.parquet"))
    key = settings_key(dataset_fingerprint, cfg.model, cfg.inference, cfg.fit, cfg.seed)
    names = fit_names(cfg)
    existing = _load_existing(layout.fits, names, key)
    if existing:
        log.info("fit: all %d fits exist for these settings; reusing them", len(existing))
        return existing

    sample = gather_sample(shard_files, cfg)
    centroids, seconds = {}, {}
    try:
        check_features(sample, f"patch features in {layout.features}")
        log.info("fit: %d sampled patch features of dimension %d", *sample.shape)
        for name in names:
            start = time.perf_counter()
            if name == names[-1]:
                centroids[name] = baseline_centroids(cfg, sample)
            else:
                centroids[name] = fit_kmeans(sample, int(name[1:]), seed=cfg.seed, engine=cfg.fit.engine, n_iter=cfg.fit.n_iter)
            seconds[name] = time.perf_counter() - start
            log.info("fit: %s in %.1f s", name, seconds[name])
    except ValueError as err:
        raise FitError(str(err)) from None
    counts = count_cluster_classes(shard_files, centroids)

    fits, summary = {}, {}
    for name in names:
        baseline = name == names[-1]
        mapping = hungarian_mapping(counts[name]) if baseline else majority_mapping(counts[name])
        fits[name] = FitArtifact(
            centroids=centroids[name], mapping=mapping, mapping_kind="hungarian" if baseline else "majority",
            meta={"name": name, "k": len(mapping), "settings_key": key, "feature_kind": cfg.model.feature_kind,
                  "feature_dim": int(sample.shape[1]), "model": model_description, "dataset_fingerprint": dataset_fingerprint,
                  "seed": cfg.seed, "engine": cfg.fit.engine, "n_samples": int(sample.shape[0]),
                  "fit_seconds": round(seconds[name], 3), "mapped_on": "same images (seed protocol)"},
        )
        summary[name] = {"k": len(mapping), "mapping_kind": fits[name].mapping_kind,
                         "patch_level": semantic_scores(patch_confusion(counts[name], mapping), CLASS_NAMES),
                         "clusters_without_labelled_patches": int((counts[name].sum(axis=1) == 0).sum()),
                         "fit_seconds": round(seconds[name], 3)}
    for name, fit in fits.items():
        fit.save(layout.fits / name)
    write_json_atomic(summary, layout.fits / "fit_summary.json")
    return fits


def _load_existing(fits_dir: Path, names: list[str], key: str) -> dict[str, FitArtifact] | None:
    if not all((fits_dir / n / "meta.json").exists() for n in names) or not (fits_dir / "fit_summary.json").exists():
        return None
    fits = {n: FitArtifact.load(fits_dir / n) for n in names}
    return fits if all(f.meta.get("settings_key") == key for f in fits.values()) else None
