"""The fit stage is driver code without Ray: tested on hand-made feature shards."""

import json

import numpy as np
import pytest
import torch

from configs.schema import parse_config
from core.fit_artifact import FitArtifact
from ray_jobs.fit import FitError, baseline_centroids, run_fit
from storage.shards import patch_schema, patch_table
from tests.tiny_runs import write_extracted

D = 8


def write_shards(cfg, num_images=6, seed=0):
    """Two well-separated feature blobs per class (3 classes) on a 4x4 patch grid per image, as a
    finished extract stage -> run_fit's arguments."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(6, D)) * 5
    tables = []
    for shard in range(2):
        ids, feats, labels = [], [], []
        for i in range(num_images // 2):
            which = rng.integers(0, 6, size=(4, 4))
            feats.append((centres[which] + rng.normal(size=(4, 4, D)) * 0.1).transpose(2, 0, 1))
            labels.append((which // 2).astype(np.uint8))
            ids.append(f"img{shard}_{i}")
        tables.append(patch_table(ids, feats, labels, patch_schema(D, "float32"), [(56, 56)] * len(ids)))
    return write_extracted(cfg, tables)


def config(out, **fit):
    return parse_config({"output_dir": str(out), "seed": 0,
                         "fit": {"k": 6, "k_sweep": [3], "n_iter": 10, "max_patches_per_image": 16, "heldout_folds": 3, **fit}},
                        "test")


def test_fit_saves_every_fit_with_its_mappings(tmp_path):
    args = write_shards(config(tmp_path))
    fits = run_fit(config(tmp_path), *args)
    assert list(fits) == ["k6", "k3", "baseline_k19"]
    k6 = FitArtifact.load(tmp_path / "fits" / "k6")
    assert k6.mapping_kind == "majority" and sorted(set(k6.mapping.tolist())) == [0, 1, 2]
    assert k6.extra_arrays["mapping_counts"].shape == (3, 6, 19)
    assert k6.extra_arrays["mapping_counts"].sum() == 6 * 16  # every labelled patch counted once
    assert k6.extra_arrays["label_free_mapping"].shape == (6,)
    assert k6.meta["dataset_fingerprint"] == args[3] and k6.meta["feature_kind"] == "backbone"
    summary = json.loads((tmp_path / "fits" / "fit_summary.json").read_text())
    assert summary["k6"]["patch_level"]["same_set"]["pixel_accuracy"] == 1.0  # separable blobs
    # a re-run with the same settings reuses the saved fits
    again = run_fit(config(tmp_path), *args)
    assert np.array_equal(again["k6"].centroids, fits["k6"].centroids)


def test_k_larger_than_the_sample_is_a_clear_error(tmp_path):
    cfg = config(tmp_path, k=200, k_sweep=[])
    args = write_shards(cfg)
    with pytest.raises(FitError, match=r"k=200 is larger than the number of sampled patch features \(n=96\)"):
        run_fit(cfg, *args)


def test_nan_features_are_a_clear_error(tmp_path):
    feats = np.random.default_rng(0).normal(size=(D, 4, 4))
    feats[0, 0, 3] = np.nan
    table = patch_table(["x"], [feats], [np.zeros((4, 4), np.uint8)], patch_schema(D, "float32"), [(56, 56)])
    with pytest.raises(FitError, match="NaN or inf"):
        run_fit(config(tmp_path), *write_extracted(config(tmp_path), [table]))


def test_cluster_probe_baseline_is_loaded_and_normalised(tmp_path):
    probe = torch.randn(27, 90)
    torch.save({"cluster_probe": probe, "codebook": torch.randn(4, 90)}, tmp_path / "cluster_tr.pth")
    cfg = parse_config({"model": {"feature_kind": "head", "cluster_probe_checkpoint": str(tmp_path / "cluster_tr.pth")},
                        "fit": {"baseline": "cluster_probe"}}, "test")
    centroids, raw = baseline_centroids(cfg, np.zeros((0, 90), np.float32))
    assert raw is None  # only the seed's k-means has raw centres
    assert centroids.shape == (27, 90)
    assert np.allclose(np.linalg.norm(centroids, axis=1), 1.0, atol=1e-5)
    assert np.allclose(centroids[0], (probe[0] / probe[0].norm()).numpy(), atol=1e-6)


def test_seed_protocol_fits_every_labelled_patch_in_dataset_order_and_maps_by_euclidean_predict(tmp_path):
    from sklearn.cluster import MiniBatchKMeans

    cfg = parse_config({"output_dir": str(tmp_path), "protocol": "seed", "inference": {"short_side": 112, "crop": 112, "stride": 56},
                        "fit": {"k": 6, "k_sweep": [3], "max_patches_per_image": 2, "heldout_folds": 3}}, "test")
    rng = np.random.default_rng(5)
    tables, ordered = [], []
    for shard in range(2):
        ids, feats, labels = [], [], []
        for i in range(3):
            feat = rng.normal(size=(D, 4, 4)).astype(np.float32)
            label = rng.integers(0, 3, size=(4, 4)).astype(np.uint8)
            label[0] = 255  # unlabelled patches: not part of the seed's fit
            ids.append(f"img{shard}_{i}")
            feats.append(feat)
            labels.append(label)
            ordered.append((feat.reshape(D, 16).T, label.ravel()))
        tables.append(patch_table(ids, feats, labels, patch_schema(D, "float32"), [(56, 56)] * len(ids)))
    fits = run_fit(cfg, *write_extracted(cfg, tables))
    # the reference, as generate_overclustered_semantics.py draws it: image by image, the labelled patches
    # permuted by one RandomState(42) stream (at most 2000 each), nan_to_num, float64, L2-normalised
    rng, xs, ys = np.random.RandomState(42), [], []
    for f, lab in ordered:
        pick = rng.choice(int((lab != 255).sum()), int((lab != 255).sum()), replace=False)
        xs.append(f[lab != 255][pick])
        ys.append(lab[lab != 255][pick])
    x, y = np.concatenate(xs).astype(np.float64), np.concatenate(ys)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    kmeans = MiniBatchKMeans(n_clusters=6, batch_size=10000, max_iter=300, n_init=3, random_state=42).fit(x)
    np.testing.assert_allclose(fits["k6"].centroids, kmeans.cluster_centers_ / np.linalg.norm(kmeans.cluster_centers_, axis=1, keepdims=True),
                               atol=1e-6)
    counts = np.zeros((6, 19), np.int64)
    np.add.at(counts, (kmeans.predict(x), y), 1)
    populated = counts.sum(axis=1) > 0
    assert np.array_equal(fits["k6"].mapping[populated], counts.argmax(axis=1)[populated])
    assert fits["k6"].meta["n_samples"] == len(x) == 6 * 12 and "MiniBatchKMeans" in fits["k6"].meta["engine"]


def test_seed_protocol_without_ground_truth_says_so(tmp_path):
    cfg = parse_config({"output_dir": str(tmp_path), "protocol": "seed", "inference": {"short_side": 112, "crop": 112, "stride": 56},
                        "fit": {"k": 6, "k_sweep": [3]}}, "test")
    table = patch_table(["x"], [np.random.default_rng(0).normal(size=(D, 4, 4))], [np.full((4, 4), 255, np.uint8)],
                        patch_schema(D, "float32"), [(56, 56)])
    with pytest.raises(FitError, match="no ground truth"):
        run_fit(cfg, *write_extracted(cfg, [table]))
