"""The fit stage on hand-made feature shards, its passes over the shards as Ray tasks on one local Ray."""

import json

import numpy as np
import pytest
import torch

from configs.schema import ConfigError, parse_config
from core.clustering.fit_artifact import FitArtifact
from core.clustering.sampling import BoundedSample, image_fold, patch_priorities, per_image_lowest
from ray_jobs.fit import baseline_centroids, count_cluster_classes, gather_sample, run_fit
from storage.features import features_from_table, patch_schema, patch_table
from storage.run.feature_sets import FeatureSetError, FeatureShards
from storage.run.fits import FitError
from storage.run.markers import read_done
from tests.tiny_runs import write_extracted

pytestmark = pytest.mark.usefixtures("ray_cluster")

D = 8


def write_shards(cfg, num_images=6, seed=0):
    """Two well-separated feature blobs per class (3 classes) on a 4x4 patch grid per image, as a
    finished extract stage -> run_fit's arguments."""
    return write_extracted(cfg, labelled_tables(num_images, seed))


def labelled_tables(num_images=6, seed=0):
    """`write_shards`' two shards of patch rows."""
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
    return tables


def config(out, **fit):
    return parse_config(
        {
            "output_dir": str(out),
            "seed": 0,
            "fit": {"k": 6, "k_sweep": [3], "n_iter": 10, "max_patches_per_image": 16, "heldout_folds": 3, **fit},
        },
        "test",
    )


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
    cfg = parse_config(
        {
            "model": {"feature_kind": "head", "cluster_probe_checkpoint": str(tmp_path / "cluster_tr.pth")},
            "fit": {"baseline": "cluster_probe"},
        },
        "test",
    )
    centroids, raw = baseline_centroids(cfg, np.zeros((0, 90), np.float32))
    assert raw is None  # only the paper's k-means has raw centres
    assert centroids.shape == (27, 90)
    assert np.allclose(np.linalg.norm(centroids, axis=1), 1.0, atol=1e-5)
    assert np.allclose(centroids[0], (probe[0] / probe[0].norm()).numpy(), atol=1e-6)


def test_paper_protocol_fits_every_labelled_patch_in_dataset_order_and_maps_by_euclidean_predict(tmp_path):
    from sklearn.cluster import MiniBatchKMeans

    cfg = parse_config(
        {
            "output_dir": str(tmp_path),
            "protocol": "paper",
            "inference": {"short_side": 112, "crop": 112, "stride": 56},
            "fit": {"k": 6, "k_sweep": [3], "max_patches_per_image": 2, "heldout_folds": 3},
        },
        "test",
    )
    rng = np.random.default_rng(5)
    tables, ordered = [], []
    for shard in range(2):
        ids, feats, labels = [], [], []
        for i in range(3):
            feat = rng.normal(size=(D, 4, 4)).astype(np.float32)
            label = rng.integers(0, 3, size=(4, 4)).astype(np.uint8)
            label[0] = 255  # unlabelled patches: not part of the paper's fit
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
    np.testing.assert_allclose(
        fits["k6"].centroids,
        kmeans.cluster_centers_ / np.linalg.norm(kmeans.cluster_centers_, axis=1, keepdims=True),
        atol=1e-6,
    )
    counts = np.zeros((6, 19), np.int64)
    np.add.at(counts, (kmeans.predict(x), y), 1)
    populated = counts.sum(axis=1) > 0
    assert np.array_equal(fits["k6"].mapping[populated], counts.argmax(axis=1)[populated])
    assert fits["k6"].meta["n_samples"] == len(x) == 6 * 12 and "MiniBatchKMeans" in fits["k6"].meta["engine"]


def test_paper_protocol_without_ground_truth_says_so(tmp_path):
    cfg = parse_config(
        {
            "output_dir": str(tmp_path),
            "protocol": "paper",
            "inference": {"short_side": 112, "crop": 112, "stride": 56},
            "fit": {"k": 6, "k_sweep": [3]},
        },
        "test",
    )
    table = patch_table(
        ["x"],
        [np.random.default_rng(0).normal(size=(D, 4, 4))],
        [np.full((4, 4), 255, np.uint8)],
        patch_schema(D, "float32"),
        [(56, 56)],
    )
    with pytest.raises(FeatureSetError, match="have no ground truth"):
        run_fit(cfg, *write_extracted(cfg, [table]))


def write_unlabelled(out, num_images=10, seed=1):
    """The same six blobs, no ground truth (labels 255): a finished extract stage in `out`."""
    cfg = config(out, heldout_folds=1)
    return cfg, write_extracted(cfg, [unlabelled_table(num_images, seed)])


def unlabelled_table(num_images=10, seed=1):
    """`write_unlabelled`'s one shard of patch rows."""
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(6, D)) * 5  # write_shards' centres (same generator, drawn first)
    rng = np.random.default_rng(seed)
    ids, feats = [f"frame{i:03d}" for i in range(num_images)], []
    for _ in ids:
        feats.append((centres[rng.integers(0, 6, size=(4, 4))] + rng.normal(size=(4, 4, D)) * 0.1).transpose(2, 0, 1))
    return patch_table(
        ids, feats, [np.full((4, 4), 255, np.uint8)] * len(ids), patch_schema(D, "float32"), [(56, 56)] * len(ids)
    )


def test_fit_on_an_unlabelled_set_map_on_the_labelled_run(tmp_path):
    unlabelled, _ = write_unlabelled(tmp_path / "frames")
    cfg = config(tmp_path / "run", features=[{"path": str(tmp_path / "frames")}])
    fits = run_fit(cfg, *write_shards(cfg))
    meta = fits["k6"].meta
    (fitted,) = meta["fitted_on"]
    assert fitted["features"] == str(tmp_path / "frames") and fitted["stage"] == "extract"
    assert fitted["sampled_rows"] == meta["n_samples"] == 10 * 16 and fitted["num_patches"] == 160
    assert meta["mapped_on"]["features"] == "this run" and meta["mapped_on"]["labelled_patches"] == 6 * 16
    summary = json.loads((tmp_path / "run" / "fits" / "fit_summary.json").read_text())
    assert (
        summary["k6"]["patch_level"]["same_set"]["pixel_accuracy"] == 1.0
    )  # the unlabelled blobs are the labelled ones


def test_both_sets_by_weight_and_cap(tmp_path):
    write_unlabelled(tmp_path / "frames")
    cfg = config(tmp_path / "run", max_samples=60, features=[{}, {"path": str(tmp_path / "frames"), "weight": 2.0}])
    fits = run_fit(cfg, *write_shards(cfg))
    assert [f["sampled_rows"] for f in fits["k6"].meta["fitted_on"]] == [20, 40]  # 60 rows, 1 : 2
    capped = config(
        tmp_path / "capped",
        max_samples=60,
        features=[{}, {"path": str(tmp_path / "frames"), "weight": 2.0, "max_samples": 25}],
    )
    fits = run_fit(capped, *write_shards(capped))
    assert [f["sampled_rows"] for f in fits["k6"].meta["fitted_on"]] == [20, 25]


def test_fit_on_the_unlabelled_run_map_on_a_labelled_one(tmp_path):
    labelled = config(tmp_path / "run")
    write_shards(labelled)
    _, args = write_unlabelled(tmp_path / "frames")
    with pytest.raises(
        FeatureSetError, match="have no ground truth, so no cluster can be mapped to a class. Map on a labelled"
    ):
        run_fit(config(tmp_path / "frames", heldout_folds=1), *args)  # refused from the markers' counts, before k-means
    assert not (tmp_path / "frames" / "fits").exists()
    for marker in (tmp_path / "frames" / "features" / "_done").glob("*.json"):  # a set extracted before the count
        marker.write_text(
            json.dumps({k: v for k, v in json.loads(marker.read_text()).items() if k != "labelled_patches"})
        )
    with pytest.raises(FitError, match="have no ground truth. Map on a labelled run's features"):
        run_fit(config(tmp_path / "frames", heldout_folds=1), *args)  # found when the clusters are counted
    cfg = config(tmp_path / "frames", heldout_folds=1, mapping_from=str(tmp_path / "run"))
    fits = run_fit(cfg, *args)
    assert fits["k6"].meta["mapped_on"]["features"] == str(tmp_path / "run")
    assert fits["k6"].meta["fitted_on"][0]["features"] == "this run"
    assert sorted(set(fits["k6"].mapping.tolist())) == [0, 1, 2]


def test_a_feature_set_that_is_not_usable_is_refused_with_the_fix(tmp_path):
    from storage.run.feature_sets import FeatureSetError

    write_unlabelled(tmp_path / "frames")
    cfg = config(tmp_path / "run", features=[{"path": str(tmp_path / "frames")}])
    args = write_shards(cfg)
    with pytest.raises(FeatureSetError, match="no extracted features there"):
        run_fit(config(tmp_path / "run", features=[{"path": str(tmp_path / "nowhere")}]), *args)
    for own in (tmp_path / "run", tmp_path / "run" / "features"):  # refused by the config: this run writes there
        with pytest.raises(ConfigError, match=r"fit.features\[0\].path=.*This run's own features need no path"):
            config(tmp_path / "run", features=[{"path": str(own)}])
    other = parse_config(
        {
            "output_dir": str(tmp_path / "other"),
            "model": {"init_seed": 7},
            "fit": {"k": 6, "k_sweep": [3], "heldout_folds": 1},
        },
        "test",
    )
    write_extracted(
        other,
        [
            patch_table(
                ["a"], [np.zeros((D, 4, 4))], [np.zeros((4, 4), np.uint8)], patch_schema(D, "float32"), [(56, 56)]
            )
        ],
    )
    with pytest.raises(FeatureSetError, match=r"made by another model than this run's: init_seed: 7 -> 0"):
        run_fit(config(tmp_path / "run", features=[{"path": str(tmp_path / "other")}]), *args)
    shard = tmp_path / "frames" / "features" / "shard-00000.parquet"
    shard.write_bytes(shard.read_bytes()[:-10])
    with pytest.raises(FeatureSetError, match=r"shard-00000.*bytes.*when written.*run the `python submit.py extract`"):
        run_fit(cfg, *args)
    (tmp_path / "frames" / "features" / "_complete.json").unlink()
    with pytest.raises(FeatureSetError, match="has not recorded that it finished"):
        run_fit(cfg, *args)


def test_the_config_refuses_a_mapping_set_with_heldout_folds():
    with pytest.raises(ValueError, match="set fit.heldout_folds=1"):
        parse_config({"fit": {"mapping_from": "outputs/labelled"}}, "test")
    with pytest.raises(ValueError, match="names a feature set twice"):
        parse_config({"fit": {"features": [{}, {"path": None, "weight": 2}]}}, "test")
    for weight in (float("inf"), 1e308):
        with pytest.raises(ValueError, match="weight"):
            parse_config({"fit": {"features": [{}, {"path": "outputs/frames", "weight": weight}]}}, "test")


def test_one_set_named_twice_a_histograms_folder_and_nan_features_are_refused(tmp_path):
    from storage.run.feature_sets import FeatureSetError

    write_unlabelled(tmp_path / "frames")
    frames = str(tmp_path / "frames")
    cfg = config(tmp_path / "run")
    args = write_shards(cfg)
    for spelling in (frames + "/", frames + "/features"):
        with pytest.raises(FeatureSetError, match="names the same features twice"):
            run_fit(config(tmp_path / "run", features=[{"path": frames}, {"path": spelling}]), *args)
    import shutil

    shutil.copytree(tmp_path / "frames", tmp_path / "copy")
    with pytest.raises(
        FeatureSetError, match=f"{tmp_path}/frames/features and {tmp_path}/copy/features have the same content"
    ):
        run_fit(config(tmp_path / "run", features=[{"path": frames}, {"path": str(tmp_path / "copy")}]), *args)
    (tmp_path / "copy" / "features").rename(tmp_path / "copy" / "histograms")  # e.g. an apply's histograms/
    with pytest.raises(FeatureSetError, match="not patch features.*kept under that name"):
        run_fit(config(tmp_path / "run", features=[{"path": str(tmp_path / "copy" / "histograms")}]), *args)
    bad = config(tmp_path / "nan")
    feats = np.ones((D, 4, 4))
    feats[:, 3, 3] = np.nan
    write_extracted(
        bad, [patch_table(["j"], [feats], [np.zeros((4, 4), np.uint8)], patch_schema(D, "float32"), [(56, 56)])]
    )
    shards = FeatureShards(bad.output_dir / "features", read_done(bad.output_dir / "features"))
    with pytest.raises(Exception, match=r"shard-00000.parquet: .*1 of 16 .*NaN or inf"):
        count_cluster_classes(shards, {"k2": np.eye(2, D, dtype=np.float32)}, {}, bad)


def relaid(tables, num_shards):
    """The same patch rows cut into `num_shards` shards at image boundaries."""
    import pyarrow as pa

    whole = pa.concat_tables(tables)
    ids = whole.column("image_id").to_numpy(zero_copy_only=False)
    images = list(dict.fromkeys(ids.tolist()))
    groups = np.array_split(np.arange(len(images)), num_shards)
    return [whole.filter(pa.array(np.isin(ids, [images[i] for i in g]))) for g in groups]


def test_the_ray_task_passes_equal_a_single_process_pass_for_any_shard_layout(tmp_path):
    """The sample (priority order) and the cluster x class counts made by Ray tasks over 1, 3 and 7
    shards are those of one in-process pass over the rows, fold by fold."""
    rng = np.random.default_rng(3)
    tables = [
        patch_table(
            [f"s{s}_i{i}" for i in range(3)],
            [rng.normal(size=(D, 4, 4)) for _ in range(3)],
            [rng.integers(0, 4, size=(4, 4)).astype(np.uint8) for _ in range(3)],
            patch_schema(D, "float32"),
            [(56, 56)] * 3,
        )
        for s in range(7)
    ]
    cfg = config(tmp_path / "ref", max_patches_per_image=5, max_samples=40)
    whole = relaid(tables, 1)[0]
    priorities, index = patch_priorities(whole.column("image_id").to_numpy(zero_copy_only=False), cfg.seed)
    rows = per_image_lowest(priorities, index, 5)
    reference = BoundedSample(40)
    reference.add(priorities[rows], features_from_table(whole.take(rows)))
    centroids = {"a": rng.normal(size=(5, D)).astype(np.float32), "b": rng.normal(size=(3, D)).astype(np.float32)}
    x, labels = features_from_table(whole), whole.column("label").to_numpy().astype(np.int64)
    fold = np.array([image_fold(i, 3, cfg.seed) for i in whole.column("image_id").to_pylist()])
    assigned = np.argmax(x @ (centroids["a"] / np.linalg.norm(centroids["a"], axis=1, keepdims=True)).T, axis=1)
    expected = np.zeros((3, 5, 19), np.int64)
    np.add.at(expected, (fold, assigned, labels), 1)
    for num_shards in (1, 3, 7):
        cfg = config(tmp_path / f"s{num_shards}", max_patches_per_image=5, max_samples=40)
        write_extracted(cfg, relaid(tables, num_shards))
        shards = FeatureShards(cfg.output_dir / "features", read_done(cfg.output_dir / "features"))
        assert np.array_equal(gather_sample(shards, cfg), reference.result())
        counted = count_cluster_classes(shards, centroids, {}, cfg, co_assign_to="b")
        assert np.array_equal(counted["counts"]["a"], expected)
        assert counted["co_assignment"]["a"].shape == (5, 3) and counted["co_assignment"]["a"].sum() == len(x)
        assert np.array_equal(counted["main_sizes"], np.bincount(assigned, minlength=5))


def test_a_shard_changed_on_disk_is_named_by_the_ray_task_pass(tmp_path):
    cfg = config(tmp_path)
    write_shards(cfg)
    shards = FeatureShards(cfg.output_dir / "features", read_done(cfg.output_dir / "features"))
    shards.paths[1].write_bytes(shards.paths[1].read_bytes()[:-10])
    with pytest.raises(Exception, match="shard-00001.parquet"):
        gather_sample(shards, cfg)


def test_lloyd_on_gpus_the_cluster_lacks_is_refused_before_it_waits(tmp_path):
    with pytest.raises(ValueError, match="fit.lloyd_assign=numpy runs on the CPU"):
        config(tmp_path, lloyd_iterations=1, lloyd_gpus_per_task=0.5)
    cfg = config(tmp_path, lloyd_iterations=1, lloyd_assign="torch", lloyd_gpus_per_task=0.5)
    with pytest.raises(FitError, match="no node of this Ray cluster has a GPU: set it to 0"):
        run_fit(cfg, *write_shards(cfg))


def test_content_keys_come_from_content_not_from_when_it_was_written(tmp_path):
    """Features written again with the same bytes (new markers, new modification times) are the same
    content: the fits stay current, and a re-extracted copy listed beside its original is refused
    naming both; other bytes make the fits stale, and they are refitted."""
    cfg = config(tmp_path / "run")
    run_fit(cfg, *write_shards(cfg))
    fits_marker = tmp_path / "run" / "fits" / "_done.json"
    written = fits_marker.read_bytes()
    before = read_done(tmp_path / "run" / "features")
    for path in (tmp_path / "run" / "features").glob("shard-*.parquet"):
        path.unlink()
    args = write_shards(cfg)  # extracted again: the same bytes, every marker rewritten with new mtimes
    after = read_done(tmp_path / "run" / "features")
    assert [m["outputs"] for m in after.values()] != [m["outputs"] for m in before.values()]
    run_fit(cfg, *args)
    assert fits_marker.read_bytes() == written  # reused, not refitted

    write_unlabelled(tmp_path / "frames")
    write_unlabelled(tmp_path / "again")  # the same frames extracted again into another output_dir
    both = config(tmp_path / "run", features=[{"path": str(tmp_path / "frames")}, {"path": str(tmp_path / "again")}])
    with pytest.raises(
        FeatureSetError,
        match=f"names the same features twice: {tmp_path}/frames/features and "
        f"{tmp_path}/again/features have the same content",
    ):
        run_fit(both, *args)
    # a set sharing one shard's patches with another (a partial copy) is refused naming both files
    write_extracted(config(tmp_path / "more", heldout_folds=1), [unlabelled_table(seed=5), labelled_tables()[1]])
    overlap = config(tmp_path / "run", features=[{"path": None}, {"path": str(tmp_path / "more")}])
    with pytest.raises(
        FeatureSetError,
        match=f"{tmp_path}/run/features/shard-00001.parquet and "
        f"{tmp_path}/more/features/shard-00001.parquet have the same content",
    ):
        run_fit(overlap, *args)

    for path in (tmp_path / "run" / "features").glob("shard-*.parquet"):
        path.unlink()
    run_fit(cfg, *write_shards(cfg, seed=1))  # the same images, other features
    assert fits_marker.read_bytes() != written  # refitted


@pytest.mark.parametrize("protocol, rule", [("official", "present"), ("paper", "all")])
def test_patch_level_miou_follows_the_protocols_rule(tmp_path, protocol, rule):
    """Under protocol=paper the patch-level mIoU is the paper's: all 19 classes, an absent one counting 0
    (its overclustering_cause.py); otherwise the classes present. The summary records the rule."""
    cfg = parse_config(
        {
            "output_dir": str(tmp_path),
            "seed": 0,
            "protocol": protocol,
            "fit": {"k": 6, "k_sweep": [3], "n_iter": 10, "max_patches_per_image": 16, "heldout_folds": 3},
        },
        "test",
    )
    run_fit(cfg, *write_shards(cfg))
    summary = json.loads((tmp_path / "fits" / "fit_summary.json").read_text())
    assert sum(v is not None for v in summary["k6"]["patch_level"]["same_set"]["per_class_iou"].values()) == 3
    for name in ("k6", "k3", "baseline_k19"):  # (the baseline maps a cluster to each of the 19: all present)
        for protocol_name, scores in summary[name]["patch_level"].items():
            present = [v for v in scores["per_class_iou"].values() if v is not None]
            assert scores["miou_rule"] == rule, (name, protocol_name)
            assert scores["miou"] == pytest.approx(sum(present) / (len(present) if rule == "present" else 19))


def test_compare_backbone_on_features_without_ground_truth_is_refused_with_the_fix(tmp_path):
    """The backbone comparison maps on this run's own patches; the run's fits may be mapped on another set."""
    import shutil

    from ray_jobs.fit import backbone_comparison
    from storage.features import backbone_path
    from storage.run.layout import Layout
    from storage.run.markers import mark_done, output_records

    cfg, _ = write_unlabelled(tmp_path)
    features = tmp_path / "features"
    marker = read_done(features)["shard-00000"]
    backbone = backbone_path(features, "shard-00000")
    backbone.parent.mkdir()
    shutil.copy(features / "shard-00000.parquet", backbone)  # the backbone's tokens: as unlabelled as the head's
    mark_done(
        features, "shard-00000", {**marker, "outputs": {**marker["outputs"], **output_records(tmp_path, [backbone])}}
    )
    with pytest.raises(FitError, match="has none \\(no ground truth\\): set model.compare_backbone=false"):
        backbone_comparison(cfg, Layout(tmp_path), read_done(features), {"patch_level": {}})
