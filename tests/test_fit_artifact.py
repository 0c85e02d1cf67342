import numpy as np
import pytest

from core.clustering import fit_artifact
from core.clustering.fit_artifact import FitArtifact, FitArtifactError


def _artifact(k=3, dim=4, kind="majority", seed=0):
    c = np.random.default_rng(seed).standard_normal((k, dim)).astype(np.float32)
    mapping = np.arange(k) % 2
    mapping[-1] = 255
    return FitArtifact(c / np.linalg.norm(c, axis=1, keepdims=True), mapping, kind, {"name": f"k{k}", "seed": seed})


def test_round_trip(tmp_path):
    fit = _artifact()
    fit.save(tmp_path / "k3")
    loaded = FitArtifact.load(tmp_path / "k3")
    assert loaded.centroids.dtype == np.float32 and np.array_equal(loaded.centroids, fit.centroids)
    assert loaded.mapping.dtype == np.int64 and np.array_equal(loaded.mapping, [0, 1, 255])
    assert (loaded.mapping_kind, loaded.meta, loaded.k, loaded.feature_dim) == ("majority", fit.meta, 3, 4)


def test_overwrite_replaces_the_whole_folder_and_leaves_nothing_beside_it(tmp_path):
    _artifact(k=3).save(tmp_path / "fit")
    _artifact(k=5, dim=2, kind="hungarian", seed=1).save(tmp_path / "fit")
    loaded = FitArtifact.load(tmp_path / "fit")
    assert (loaded.k, loaded.feature_dim, loaded.mapping_kind) == (5, 2, "hungarian")
    assert [p.name for p in tmp_path.iterdir()] == ["fit"]


def test_failed_save_keeps_the_old_artifact(tmp_path):
    _artifact().save(tmp_path / "fit")
    bad = _artifact(k=4)
    bad.meta["seed"] = np.int64(1)  # not JSON-serialisable
    with pytest.raises(TypeError):
        bad.save(tmp_path / "fit")
    assert FitArtifact.load(tmp_path / "fit").k == 3
    assert [p.name for p in tmp_path.iterdir()] == ["fit"]


def test_missing_and_corrupt_files_are_named(tmp_path):
    _artifact().save(tmp_path / "fit")
    (tmp_path / "fit" / "centroids.npy").write_bytes(b"not an npy file")
    with pytest.raises(ValueError, match="centroids.npy is corrupt"):
        FitArtifact.load(tmp_path / "fit")
    (tmp_path / "fit" / "mapping.npy").unlink()
    with pytest.raises(FitArtifactError, match="mapping.npy is missing"):
        FitArtifact.load(tmp_path / "fit")
    _artifact().save(tmp_path / "fit")
    (tmp_path / "fit" / "meta.json").write_text("{")
    with pytest.raises(ValueError, match="meta.json is corrupt"):
        FitArtifact.load(tmp_path / "fit")


def test_inconsistent_files_are_rejected(tmp_path):
    _artifact(k=3).save(tmp_path / "fit")
    np.save(tmp_path / "fit" / "mapping.npy", np.zeros(4, np.int64))
    with pytest.raises(ValueError, match="mapping must be 3 integers"):
        FitArtifact.load(tmp_path / "fit")
    other = _artifact(k=2)  # a consistent pair from another fit, with the old meta.json
    np.save(tmp_path / "fit" / "centroids.npy", other.centroids)
    np.save(tmp_path / "fit" / "mapping.npy", other.mapping)
    with pytest.raises(ValueError, match="meta.json says k=3"):
        FitArtifact.load(tmp_path / "fit")
    np.save(tmp_path / "fit" / "centroids.npy", np.full((3, 4), np.nan, np.float32))
    np.save(tmp_path / "fit" / "mapping.npy", np.zeros(3, np.int64))
    with pytest.raises(ValueError, match="NaN or inf"):
        FitArtifact.load(tmp_path / "fit")


def test_construction_checks():
    fit = _artifact()
    with pytest.raises(ValueError, match="2-D"):
        FitArtifact(fit.centroids[0], fit.mapping[:1], "majority", {})
    with pytest.raises(ValueError, match="not L2-normalised"):
        FitArtifact(2 * fit.centroids, fit.mapping, "majority", {})
    with pytest.raises(ValueError, match=r"\[0, 255\]"):
        FitArtifact(fit.centroids, np.array([0, 1, 256]), "majority", {})


def test_failed_rename_puts_the_old_artifact_back(tmp_path, monkeypatch):
    _artifact(k=3).save(tmp_path / "fit")
    real_replace, calls = fit_artifact.os.replace, []

    def replace_failing_on_the_new_folder(src, dst):
        calls.append(src)
        if len(calls) == 2:  # 1: old folder aside, 2: new folder into place
            raise OSError("disk trouble")
        real_replace(src, dst)

    monkeypatch.setattr(fit_artifact.os, "replace", replace_failing_on_the_new_folder)
    with pytest.raises(OSError, match="disk trouble"):
        _artifact(k=5).save(tmp_path / "fit")
    monkeypatch.undo()
    assert FitArtifact.load(tmp_path / "fit").k == 3
    assert [p.name for p in tmp_path.iterdir()] == ["fit"]
