"""`submit.py import-fit`: another tool's centres and cluster -> class mapping (the paper's
kmeans_centroids.npz) as a fit of a run, which label, report, atlas and apply use; bad files refused."""

import hashlib
import io
import json
import zipfile

import numpy as np
import pytest

import submit
from configs.schema import parse_config
from core.clustering.fit_artifact import FitArtifact
from core.clustering.imported import MAX_VALUES, CentreFileError, read_centre_file
from ray_jobs.apply import run_apply
from ray_jobs.pipeline import Pipeline
from storage.run.plans import StageIncomplete
from tests.tiny_runs import copy_run

D = 32  # the tiny run's feature dimension (a 32-d ViT's backbone tokens)


def paper_file(path, centroids, cluster_to_class):
    """What generate_overclustered_semantics.py writes: float64 centres divided by norm + 1e-8, uint8
    trainIds, `np.savez(centroids_path, centroids=centroids_norm, cluster_to_class=cluster_to_class)`."""
    centroids = np.asarray(centroids, np.float64)
    centroids_norm = centroids / (np.linalg.norm(centroids, axis=1, keepdims=True) + 1e-8)
    np.savez(path, centroids=centroids_norm, cluster_to_class=np.asarray(cluster_to_class).astype(np.uint8))
    return path


def random_centres(k=5, dim=D, seed=0):
    return np.random.default_rng(seed).normal(size=(k, dim))


def test_a_file_written_as_the_seed_writes_it_is_read_with_its_checksum(tmp_path):
    path = paper_file(tmp_path / "kmeans_centroids.npz", random_centres(), [0, 1, 2, 18, 0])
    read = read_centre_file(path, D)
    assert read.centroids.dtype == np.float32 and np.allclose(np.linalg.norm(read.centroids, axis=1), 1, atol=1e-6)
    assert read.mapping.tolist() == [0, 1, 2, 18, 0] and read.mapping.dtype == np.int64
    assert read.record["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert read.record["dtypes"] == {"centroids": "float64", "mapping": "uint8"} and not read.record["rescaled_to_unit"]
    # centres that are not unit rows (raw cluster_centers_) are L2-normalised, and the record says so
    np.savez(
        tmp_path / "raw.npz", centroids=random_centres() * 7, cluster_to_class=np.array([0, 1, 2, 255, 3], np.int32)
    )
    raw = read_centre_file(tmp_path / "raw.npz", D)
    assert raw.record["rescaled_to_unit"] and raw.record["row_norms"][0] > 2
    assert np.allclose(raw.centroids, read.centroids, atol=1e-6) and raw.mapping.tolist() == [0, 1, 2, 255, 3]
    np.savez(tmp_path / "other_keys.npz", centers=random_centres(), labels=np.zeros(5, np.int64))
    assert read_centre_file(tmp_path / "other_keys.npz", D, ("centers", "labels")).mapping.tolist() == [0] * 5


def bad_files(tmp_path):
    """(file, phrase of its one-line error) for every way a centre file can be wrong."""
    c, m = random_centres(), np.array([0, 1, 2, 3, 4], np.uint8)
    nan = c.copy()
    nan[3, 7] = np.nan
    zero = c.copy()
    zero[1] = 0
    cases = {
        "wrong_dim.npz": (
            dict(centroids=random_centres(dim=90), cluster_to_class=m),
            "the centres are 90-d and this run's features 32-d",
        ),
        "nan.npz": (dict(centroids=nan, cluster_to_class=m), "NaN or inf in 1 of its 5 centres (first: centre 3)"),
        "zero_row.npz": (dict(centroids=zero, cluster_to_class=m), "centres are all zeros (first: centre 1)"),
        "class_19.npz": (
            dict(centroids=c, cluster_to_class=np.array([0, 1, 19, 3, 4])),
            "cluster 2 -> 19: map each cluster",
        ),
        "negative.npz": (dict(centroids=c, cluster_to_class=np.array([0, -1, 2, 3, 4])), "cluster 1 -> -1"),
        "float_mapping.npz": (dict(centroids=c, cluster_to_class=m.astype(np.float32)), "must be 5 integer trainIds"),
        "short_mapping.npz": (dict(centroids=c, cluster_to_class=m[:4]), "must be 5 integer trainIds (one per centre)"),
        "all_void.npz": (dict(centroids=c, cluster_to_class=np.full(5, 255)), "every cluster to 255"),
        "int_centres.npz": (dict(centroids=c.astype(np.int64), cluster_to_class=m), "must be a 2-D float array"),
        "missing_key.npz": (
            dict(centres=c, cluster_to_class=m),
            "has no array 'centroids' (it has: centres, cluster_to_class): name the right one with --centroids-key",
        ),
        "pickled.npz": (dict(centroids=np.array([c], dtype=object), cluster_to_class=m), "only pickle can load"),
    }
    files = {}
    for name, (arrays, phrase) in cases.items():
        np.savez(tmp_path / name, **arrays)
        files[tmp_path / name] = phrase
    (tmp_path / "text.npz").write_text("centroids: [1, 2]\n")
    files[tmp_path / "text.npz"] = "is not an .npz archive"
    np.save(tmp_path / "one.npy", c)
    files[tmp_path / "one.npy"] = "holds one array (.npy), not an .npz"
    files[tmp_path / "missing.npz"] = "is not a file"
    huge = io.BytesIO()  # a header declaring 2^30 float64 values and holding none: refused before any is allocated
    np.lib.format.write_array_header_1_0(huge, {"descr": "<f8", "fortran_order": False, "shape": (1 << 15, 1 << 15)})
    with zipfile.ZipFile(tmp_path / "huge.npz", "w") as archive:
        archive.writestr("centroids.npy", huge.getvalue())
        archive.writestr("cluster_to_class.npy", huge.getvalue())
    files[tmp_path / "huge.npz"] = f"more than {MAX_VALUES} values"
    return files


def test_bad_centre_files_are_refused_naming_the_file_and_the_fix(tmp_path):
    for path, phrase in bad_files(tmp_path).items():
        with pytest.raises(CentreFileError) as caught:
            read_centre_file(path, D)
        message = str(caught.value)
        assert message.startswith(str(path)) and phrase in message and "\n" not in message, (path.name, message)


def import_cli(capsys, *args) -> tuple[int, str, str]:
    capsys.readouterr()
    code = submit.main(["import-fit", *map(str, args)])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_the_papers_centroids_label_and_score_as_the_fit_they_came_from(ray_cluster, tiny_run, tmp_path, capsys):
    """The run's own k16 written as the paper writes its kmeans_centroids.npz, imported as seed_k16: label
    and report score it exactly as k16, and every table row says where it came from; atlas and apply
    take it; the command refuses what would clash and repeats nothing."""
    cfg = copy_run(tiny_run, tmp_path)
    out = cfg.output_dir
    k16 = FitArtifact.load(out / "fits" / "k16")
    npz = paper_file(tmp_path / "kmeans_centroids.npz", k16.centroids, k16.mapping)
    sha = hashlib.sha256(npz.read_bytes()).hexdigest()
    code, printed, err = import_cli(capsys, npz, "--run", out, "--name", "seed_k16")
    assert code == 0, err
    assert f"seed_k16: imported {npz} (sha256 {sha}), k = 16, 32-d" in printed
    # the next command names this run's folder: a copied run's config.yaml records where it was made
    assert f"python submit.py label --config {out / 'config.yaml'} --set output_dir={out}" in printed
    fit = FitArtifact.load(out / "fits" / "seed_k16")
    assert fit.mapping_kind == "imported" and fit.meta["imported_from"]["sha256"] == sha
    assert fit.meta["model_identity"] == k16.meta["model_identity"]  # apply takes it for this model

    # the same import again does nothing; another file under that name, or a fit stage's name, is refused
    written = (out / "fits" / "seed_k16" / "meta.json").stat().st_mtime_ns
    assert import_cli(capsys, npz, "--run", out, "--name", "seed_k16")[0] == 0
    assert (out / "fits" / "seed_k16" / "meta.json").stat().st_mtime_ns == written
    other = paper_file(tmp_path / "other.npz", random_centres(16), np.zeros(16))
    for name, phrase in (
        ("seed_k16", "exists already (imported from"),
        ("../escape", "letters, digits"),
        ("k16", "other than the names the fit stage gives"),
        ("K16", "other than the names the fit stage gives"),  # one folder with k16 where case is ignored
        ("Seed_K16", "differs from it only in case"),
        ("fit_summary.json", "exists already (not a fit)"),
    ):
        code, _, err = import_cli(capsys, other, "--run", out, "--name", name)
        assert code == 2 and err.startswith("error: ") and phrase in err and "Traceback" not in err, err
    code, _, err = import_cli(capsys, npz, "--run", out, "--name", "seed_again")  # one file, two fits: the same twice
    assert code == 2 and f"holds the same centres as the fit {out / 'fits' / 'seed_k16'}" in err, err
    code, _, err = import_cli(capsys, npz, "--run", tmp_path, "--name", "x")
    assert code == 2 and "is not the output_dir of a run" in err

    # the label results no longer stand for the fits there: report alone refuses, label labels the new fit
    with pytest.raises(StageIncomplete, match="made from other features or fits"):
        Pipeline(cfg).run(("report",))
    Pipeline(cfg).run(("label", "report"))
    report = json.loads((out / "report.json").read_text())
    assert list(report["fits"]) == ["k16", "k8", "seed_k16", "baseline_k19"]
    imported, own = report["fits"]["seed_k16"], report["fits"]["k16"]
    assert imported["mapping_kind"] == "imported" and imported["patch_level"] is None
    assert imported["pixel_level"]["same_set"]["per_class_iou"] == own["pixel_level"]["same_set"]["per_class_iou"]
    assert imported["pixel_stride"] == 1 and imported["dead_centroids"] == own["dead_centroids"]
    text = (out / "report.md").read_text()
    cell = f"seed_k16, imported from `{npz}` (sha256 `{sha[:16]}`)"
    rows = [line for line in text.splitlines() if cell in line]
    assert len(rows) == 1 + 1 + 1, rows  # k sweep, per-class IoU, recovered
    assert sum(line.startswith(("| seed_k16", "| **seed_k16", "- seed_k16")) for line in text.splitlines()) == len(rows)
    assert f"| {cell} | imported | imported | 16 | not measured |" in text
    assert f"- **Imported fit seed_k16:** `{npz}` (sha256 `{sha}`)" in text
    assert "Imported fits are left out: they came with their own mapping" in text

    # the atlas and apply take it as they take the run's own fits
    page = Pipeline(cfg).atlas("seed_k16", tmp_path / "atlas_seed")
    assert page.is_file() and len(json.loads((page.parent / "atlas.json").read_text())["cards"]) == 16
    data = cfg.model_dump(mode="json")
    data["dataset"]["max_images"], data["output_dir"] = 2, str(tmp_path / "applied")
    summary = run_apply(parse_config(data), out / "fits" / "seed_k16")
    assert summary["num_images"] == 2 and summary["num_failed"] == 0 and summary["mapping_kind"] == "imported"

    # an imported fit changed on disk is refused by the stages that read it, naming it
    (out / "fits" / "seed_k16" / "mapping.npy").write_bytes(b"\x00")
    with pytest.raises(StageIncomplete, match=f"seed_k16 imported from .*mapping.npy is 1 bytes.*import-fit {npz} "):
        Pipeline(cfg).run(("report",))
    assert import_cli(capsys, npz, "--run", out, "--name", "seed_k16")[0] == 0  # as the message says: written anew
    assert np.array_equal(FitArtifact.load(out / "fits" / "seed_k16").mapping, k16.mapping)
    (out / "fits" / "_imported.json").write_text(json.dumps({"../../elsewhere": {}}))  # a damaged registry
    with pytest.raises(StageIncomplete, match="_imported.json is damaged"):
        Pipeline(cfg).run(("report",))


def test_import_fit_needs_a_finished_fit_stage_and_a_good_file(tiny_run, tmp_path, capsys):
    cfg = copy_run(tiny_run, tmp_path)
    for path, phrase in bad_files(tmp_path).items():
        code, _, err = import_cli(capsys, path, "--run", cfg.output_dir, "--name", "bad")
        assert code == 2 and err.startswith(f"error: {path}") and phrase in err and "Traceback" not in err, err
    assert not (cfg.output_dir / "fits" / "bad").exists() and not (cfg.output_dir / "fits" / "_imported.json").exists()
    (cfg.output_dir / "fits" / "_done.json").unlink()
    code, _, err = import_cli(
        capsys, paper_file(tmp_path / "ok.npz", random_centres(), np.zeros(5)), "--run", cfg.output_dir, "--name", "ok"
    )
    assert code == 2 and "import-fit needs the fits in" in err and "python submit.py fit" in err
