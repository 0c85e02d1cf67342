"""Bad input, end to end: each problem gives a message that names the file and the fix; per-image
problems go to failed_items.json while the rest of the run completes; problems of the whole run
stop it with a typed error (submit.py: exit code 2, the message, no traceback).

Unit tests of the readers and the config are in test_storage.py, test_config.py,
test_checkpoints.py and test_clustering.py; these are the pipeline-level cases.
"""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from actors.extract import finish_features, image_windows, write_features
from actors.window_features import WindowFeatures
from core.models import CheckpointError, ModelSpec, ViTSpec, build_feature_model
from ray_jobs.fit import run_fit
from ray_jobs.pipeline import Pipeline
from storage.datasets import DatasetError, list_cityscapes, list_image_folder
from storage.features import patch_schema, patch_table
from storage.run.fits import FitError
from storage.run.markers import read_done
from storage.run.shards import plan_shards
from tests.tiny_runs import NUM_IMAGES, extract_stage_plan, feature_ids, one_colour_png, tiny_config, write_extracted

REPO = Path(__file__).resolve().parent.parent
TINY_VIT = ViTSpec(patch_size=14, embed_dim=32, depth=1, num_heads=2)


def _save_png(path: Path, array: np.ndarray) -> None:
    Image.fromarray(array).save(path)


def _break(root: Path) -> dict[str, tuple[Path, str]]:
    """Damage 10 of the 12 images / ground truths in a different way each, and make one image opaque
    RGBA (accepted). image id -> (the file the message must name, a phrase it must contain)."""
    records = list_cityscapes(root, "val")
    r = {i: rec for i, rec in enumerate(records)}
    rgb = lambda i: np.asarray(Image.open(r[i].image_path).convert("RGB"))  # noqa: E731
    expect = {}

    Path(r[0].image_path).write_bytes(b"this is not a PNG file")
    expect[r[0].image_id] = (r[0].image_path, "the file is corrupt or truncated: re-copy it or remove it")
    data = Path(r[1].image_path).read_bytes()
    Path(r[1].image_path).write_bytes(data[: len(data) // 3])
    expect[r[1].image_id] = (r[1].image_path, "the file is corrupt or truncated: re-copy it or remove it")
    _save_png(Path(r[2].image_path), rgb(2).mean(axis=2).astype(np.uint8))
    expect[r[2].image_id] = (r[2].image_path, "grayscale image (mode L); the model needs RGB colour images: convert it")
    alpha = np.full(rgb(3).shape[:2], 255, np.uint8)
    alpha[:10, :10] = 0
    _save_png(Path(r[3].image_path), np.dstack([rgb(3), alpha]))
    expect[r[3].image_id] = (r[3].image_path, "RGBA image with transparent pixels; flatten it onto a background")
    _save_png(Path(r[4].image_path), np.dstack([rgb(4), np.full(rgb(4).shape[:2], 255, np.uint8)]))  # opaque: fine
    Path(r[5].label_ids_path).unlink()
    expect[r[5].image_id] = (
        r[5].label_ids_path,
        "ground truth is missing; add it, or run on unlabelled data with dataset.kind=folder",
    )
    _save_png(Path(r[6].label_ids_path), np.full((64, 128), 7, np.uint8))
    expect[r[6].image_id] = (
        r[6].label_ids_path,
        "ground truth is 64x128 but its image is 128x256; they must be the same size",
    )
    label_ids = np.asarray(Image.open(r[7].label_ids_path)).copy()
    label_ids[5, 5] = 40
    _save_png(Path(r[7].label_ids_path), label_ids)
    expect[r[7].image_id] = (r[7].label_ids_path, "unknown labelId 40 (Cityscapes labelIds are 0..33)")
    Path(r[8].instance_ids_path).unlink()  # only the label stage needs it: extracted, then failed
    expect[r[8].image_id] = (r[8].instance_ids_path, "instance ground truth is missing; panoptic scores need")
    Path(r[9].image_path).write_bytes(one_colour_png(14000, 14000))  # a decompression bomb: 196 Mpx in 24 kB
    expect[r[9].image_id] = (
        r[9].image_path,
        "image too large: 14000x14000 px = 196,000,000 pixels, more than "
        "dataset.max_image_pixels=100,000,000; downscale it, or raise",
    )
    Path(r[10].image_path).write_bytes(one_colour_png(100_000, 1))  # 107 bytes, 200,000 windows at short side 112
    expect[r[10].image_id] = (
        r[10].image_path,
        "extreme aspect ratio: 1x100000 px is 100,000.0:1, more than dataset.max_aspect_ratio=16; crop it into pieces",
    )
    return expect


def test_several_bad_files_in_one_dataset(ray_cluster, demo_root, tmp_path, capsys):
    root = tmp_path / "data"
    shutil.copytree(demo_root, root)
    expect = _break(root)
    records = list_cityscapes(root, "val")
    cfg = tiny_config(root, tmp_path / "out", images_per_shard=6)
    Pipeline(cfg).run(("extract",))  # `submit.py extract` alone: its failed items listed, and a summary
    manifest = cfg.output_dir / "failed_items.json"
    assert f"extract: 3 images done, 9 failed (failed-items manifest: {manifest})" in capsys.readouterr().out
    extract_failed = json.loads(manifest.read_text())
    assert {f["image_id"] for f in extract_failed} == set(expect) - {records[8].image_id}
    assert {f["stage"] for f in extract_failed} == {"extract"} and "internal error" not in manifest.read_text()
    Pipeline(cfg).run()

    report = json.loads((cfg.output_dir / "report.json").read_text())
    assert report["dataset"]["num_failed"] == len(expect) == 10
    assert report["dataset"]["num_images"] == NUM_IMAGES - len(expect) == 2  # scored: 11 and the opaque RGBA
    failed = json.loads((cfg.output_dir / "failed_items.json").read_text())
    assert failed == report["failed_items"]
    assert {f["image_id"] for f in failed} == set(expect)
    for f in failed:
        path, phrase = expect[f["image_id"]]
        assert str(path) in f["error"] and phrase in f["error"], f
        assert f["path"] == next(r.image_path for r in records if r.image_id == f["image_id"])
    # extract dropped the 9 it could not read (label never sees them); the one without instance
    # ids failed in label only
    stages = {i: {f["stage"] for f in failed if f["image_id"] == i} for i in expect}
    assert stages.pop(records[8].image_id) == {"label"}
    assert all(s == {"extract"} for s in stages.values())
    assert set(feature_ids(cfg.output_dir)) == {records[i].image_id for i in (4, 8, 11)}
    written = {
        p.name.removesuffix("_gtFine_labelIds.png").removesuffix("_labelIds.png")
        for p in cfg.output_dir.glob("labels/labelIds/*/*.png")
    }
    assert len(written) == 2


def _checkpoint_config(demo_root, out, path):
    return tiny_config(demo_root, out, images_per_shard=12, model={"backbone_checkpoint": str(path)})


def test_missing_checkpoint_stops_the_stage_with_its_own_error(ray_cluster, demo_root, tmp_path):
    absent = tmp_path / "dinov2.pth"
    with pytest.raises(CheckpointError) as err:
        Pipeline(_checkpoint_config(demo_root, tmp_path / "out", absent)).run(("extract",))
    message = str(err.value)
    assert f"{absent} does not exist" in message and "set model.backbone_checkpoint" in message
    assert read_done(tmp_path / "out" / "features") == {}


def test_mismatched_checkpoint_lists_what_differs(ray_cluster, demo_root, tmp_path):
    path = tmp_path / "two_blocks.pth"
    torch.save(
        build_feature_model(
            ModelSpec(vit=ViTSpec(patch_size=14, embed_dim=32, depth=2, num_heads=2))
        ).backbone.state_dict(),
        path,
    )
    with pytest.raises(CheckpointError) as err:
        Pipeline(_checkpoint_config(demo_root, tmp_path / "out", path)).run(("extract",))
    message = str(err.value)
    assert f"{path} does not match the model" in message and "unexpected keys" in message and "blocks.1." in message
    assert "fix:" in message


@pytest.mark.ray  # the fit stage's tasks
def test_nan_features_drop_the_images_and_fit_says_why(demo_root, tmp_path):
    """A checkpoint full of NaN gives NaN features: every image is dropped with the reason, and the
    fit then refuses to run on no features (Ray-free: the actor class is called directly)."""
    state = build_feature_model(ModelSpec(vit=TINY_VIT)).backbone.state_dict()
    state = {k: torch.full_like(v, float("nan")) if v.is_floating_point() else v for k, v in state.items()}
    path = tmp_path / "nan.pth"
    torch.save(state, path)
    cfg = _checkpoint_config(demo_root, tmp_path / "out", path)
    records = list_cityscapes(demo_root, "val")[:3]
    (shard,) = plan_shards(records, 3)
    config, stage_dir = cfg, str(cfg.output_dir / "features")
    threads = torch.get_num_threads()
    try:  # the extract steps by hand, as the stream runs them
        rows = list(image_windows(shard, config))
        batch = {k: np.array([r[k] for r in rows]) for k in rows[0]}  # a Ray Data numpy batch of the rows
        model = WindowFeatures(config)
        model.setup()
        out = model(batch)
        statuses = [
            write_features({k: v[i] for k, v in out.items()}, config, stage_dir, "test-plan") for i in range(len(rows))
        ]
    finally:
        torch.set_num_threads(threads)
    assert all("NaN/inf features" in s["error"] for s in statuses)
    failed = [{"image_id": s["image_id"], "path": s["path"], "stage": "extract", "error": s["error"]} for s in statuses]
    fit, extract = extract_stage_plan(cfg, records)
    finish_features(stage_dir, shard, [], failed, extract.key, config)
    (done,) = read_done(cfg.output_dir / "features").values()
    assert done["num_images"] == 0 and len(done["failed"]) == 3
    for f, record in zip(sorted(done["failed"], key=lambda f: f["image_id"]), records):
        assert f["image_id"] == record.image_id and f["path"] == record.image_path
        assert "the model produced NaN/inf features; check the checkpoint" in f["error"]
    with pytest.raises(FitError, match=r"no patch features"):
        run_fit(cfg, fit, extract, [shard["shard"]], "fingerprint")


def _write_features(cfg, num_images: int, patches: int, nan_rows: int = 0) -> tuple:
    rng = np.random.default_rng(0)
    features = [rng.normal(size=(32, 1, patches)).astype(np.float32) for _ in range(num_images)]
    if nan_rows:
        features[0][:, 0, :nan_rows] = np.inf
    labels = [np.full((1, patches), 0, np.uint8) for _ in range(num_images)]
    table = patch_table(
        [f"img{i}" for i in range(num_images)], features, labels, patch_schema(32), [(14, 14 * patches)] * num_images
    )
    return write_extracted(cfg, [table])


@pytest.mark.ray  # the fit stage's tasks
def test_k_larger_than_the_sample_names_fit_k_and_the_sample_size(demo_root, tmp_path):
    cfg = tiny_config(demo_root, tmp_path / "out", fit={"k": 16, "k_sweep": [8], "max_patches_per_image": 64})
    args = _write_features(cfg, num_images=2, patches=5)
    with pytest.raises(FitError) as err:
        run_fit(cfg, *args)
    assert "k=16 is larger than the number of sampled patch features (n=10)" in str(err.value)
    assert "lower fit.k / fit.k_sweep or raise fit.max_patches_per_image" in str(err.value)


@pytest.mark.ray  # the fit stage's tasks
def test_nan_or_inf_rows_in_stored_features_stop_the_fit(demo_root, tmp_path):
    cfg = tiny_config(demo_root, tmp_path / "out", fit={"k": 2, "k_sweep": [2], "max_patches_per_image": 64})
    args = _write_features(cfg, num_images=3, patches=40, nan_rows=4)
    with pytest.raises(FitError) as err:
        run_fit(cfg, *args)
    assert str(cfg.output_dir / "features") in str(err.value)
    assert "4 of 120 patch feature rows contain NaN or inf" in str(err.value)


def test_empty_image_folder_is_a_dataset_error(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "notes.txt").write_text("no images here")
    with pytest.raises(DatasetError, match=r"holds no images \(.png, .jpg, .jpeg\)"):
        list_image_folder(tmp_path / "images")


def _submit(*args, cwd=REPO) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(REPO / "submit.py"), *args], cwd=cwd, capture_output=True, text=True, timeout=120
    )


def _assert_clean_exit_2(result: subprocess.CompletedProcess, *phrases: str) -> None:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr and "Traceback" not in result.stdout
    assert result.stderr.startswith("error: ") and result.stderr.count("error: ") == 1, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    for phrase in phrases:
        assert phrase in result.stderr, result.stderr


@pytest.mark.parametrize(
    "text, phrases",
    [
        ("fit: {kk: 3}\n", ["fit.kk: unknown key"]),
        ("fit: {k: -1}\n", ["fit.k: Input should be greater than or equal to 2 (got -1)"]),
        ("inference: {crop: 100, stride: 50}\n", ["inference.crop=100 must be a multiple of model.vit.patch_size=14"]),
        ("fit: [1, 2\n", ["is not valid YAML"]),
        ("- just a list\n", ["must be a mapping of keys to values"]),
    ],
)
def test_bad_config_exits_2_with_the_key_and_no_traceback(tmp_path, text, phrases):
    bad = tmp_path / "bad.yaml"
    bad.write_text(text)
    _assert_clean_exit_2(_submit("run", "--config", str(bad)), str(bad), *phrases)


def test_bad_override_and_missing_config_exit_2(tmp_path):
    good = tmp_path / "good.yaml"
    good.write_text("fit: {k: 20}\n")
    _assert_clean_exit_2(_submit("run", "--config", str(good), "--set", "fit.k=zero"), "fit.k", "'zero'")
    _assert_clean_exit_2(_submit("fit", "--config", str(tmp_path / "absent.yaml")), "config file not found")


def test_empty_split_exits_2_naming_the_folder(tmp_path):
    (tmp_path / "data" / "leftImg8bit" / "val").mkdir(parents=True)
    config = tmp_path / "empty.yaml"
    config.write_text(
        yaml.safe_dump(
            {"output_dir": str(tmp_path / "out"), "dataset": {"root": str(tmp_path / "data"), "split": "val"}}
        )
    )
    _assert_clean_exit_2(
        _submit("run", "--config", str(config)),
        f"{tmp_path / 'data' / 'leftImg8bit' / 'val'} holds no *_leftImg8bit.png files: the split is empty",
    )
    _assert_clean_exit_2(
        _submit("run", "--config", str(config), "--set", "dataset.split=train"),
        "no Cityscapes split at",
        "set dataset.root",
    )


def test_missing_checkpoint_exits_2_without_a_traceback(demo_root, tmp_path):
    """End to end: the actors cannot build the model; the job ends with the checkpoint's message."""
    absent = tmp_path / "absent.pth"
    cfg = _checkpoint_config(demo_root, tmp_path / "out", absent)
    config = tmp_path / "ckpt.yaml"
    config.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    result = _submit("extract", "--config", str(config))
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr + result.stdout
    last = result.stderr.strip().splitlines()[-1]
    assert last == (
        f"error: DINOv2 backbone checkpoint not found: {absent} does not exist (or is not a file); "
        "set model.backbone_checkpoint to the file, or model.cause_root to a folder in the CAUSE layout "
        "(<cause_root>/checkpoint/dinov2_vit_base_14.pth)"
    )


def test_compare_refuses_to_write_into_a_run_it_reads(tmp_path, capsys):
    import submit

    for run in ("head", "backbone"):
        (tmp_path / run).mkdir()
        (tmp_path / run / "report.json").write_text("{}")
        (tmp_path / run / "config.yaml").write_text(f"dataset: {{root: {tmp_path / 'frames'}}}\n")
    for out in (tmp_path / "head" / "report.json", tmp_path / "head" / "compare.md", tmp_path / "link" / "compare.md"):
        (tmp_path / "link").unlink(missing_ok=True)
        (tmp_path / "link").symlink_to(tmp_path / "head")
        assert submit.main(["compare", str(tmp_path / "head"), str(tmp_path / "backbone"), "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: --out={out}") and f"lies inside a compared run={tmp_path / 'head'}" in err, err
        assert len(err.strip().splitlines()) == 1
    assert (tmp_path / "head" / "report.json").read_text() == "{}" and not (tmp_path / "head" / "compare.md").exists()
    out = tmp_path / "frames" / "compare.png"  # into the dataset the runs were made on
    assert submit.main(["compare", str(tmp_path / "head"), str(tmp_path / "backbone"), "--out", str(out)]) == 2
    recorded = f"{tmp_path / 'head' / 'config.yaml'}'s dataset.root={tmp_path / 'frames'}"
    assert f"lies inside {recorded}" in capsys.readouterr().err
    assert not out.exists()


def test_ctrl_c_on_a_stage_says_what_is_kept_and_exits_130(tmp_path, monkeypatch, capsys):
    import submit

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(submit, "run_stages", interrupted)
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"output_dir": str(tmp_path / "out")}))
    for command in ("run", "extract", "apply"):
        args = [command, "--config", str(config)] + (["--fit", str(tmp_path / "fit")] if command == "apply" else [])
        assert submit.main(args) == 130
        assert capsys.readouterr().err == (
            f"interrupted: finished shards and images are kept in {tmp_path / 'out'}; "
            "run the same command again to resume\n"
        )


def test_ctrl_c_ends_a_real_command_with_one_line_and_exit_130(tmp_path):
    import signal
    import time

    root = tmp_path / "data"
    command = [sys.executable, str(REPO / "submit.py"), "synth", "--root", str(root), "--num-images", "100000"]
    proc = subprocess.Popen(
        command,
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )  # as at a terminal
    try:
        deadline = time.monotonic() + 60
        while not list(root.glob("leftImg8bit/val/*/*.png")) and time.monotonic() < deadline:
            time.sleep(0.1)
        proc.send_signal(signal.SIGINT)  # what Ctrl-C sends
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    assert err == "interrupted: the demo set may be partly written; run the same command again to write it whole\n"
