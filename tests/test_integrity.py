"""Fault injection: every stage checks what it consumes. Each numbered test is one case of issue 13
(partial, stale or mismatched inputs; bad images; bad settings); the README's reliability table
lists them with what the tool does.

Most tests damage a copy of the session's finished tiny run (`tiny_run`, tests/conftest.py) and run a stage on it.
"""

import json
import re
import shutil
import socket
import subprocess
import sys
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

import submit
from configs.schema import ConfigError, parse_config
from ray_jobs.apply import ApplyError, run_apply
from ray_jobs.fit import gather_sample
from ray_jobs.pipeline import Pipeline
from ray_jobs.session import ClusterTooSmall
from storage.datasets import list_image_folder
from storage.features import patch_schema, patch_table
from storage.images import InputError, read_ground_truth, safe_path
from storage.run.atomic import write_parquet_atomic
from storage.run.feature_sets import FeatureShards
from storage.run.markers import read_done
from storage.synth import generate_demo_dataset
from tests.tiny_runs import copy_run, report_metrics, tiny_config, write_extracted


def cli(cfg, capsys, *args: str) -> tuple[int, str]:
    """`submit.py <args> --config <cfg as YAML>` in this process -> (exit code, stderr)."""
    path = Path(cfg.output_dir).parent / "config.yaml"
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    capsys.readouterr()
    code = submit.main(
        [*args, "--config", str(path)] if args[0] != "apply" else [*args[:1], "--config", str(path), *args[1:]]
    )
    return code, capsys.readouterr().err


def assert_user_error(code: int, err: str, *phrases: str) -> None:
    assert code == 2, err
    assert err.startswith("error: ") and "Traceback" not in err, err
    for phrase in phrases:
        assert phrase in err, (phrase, err)


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    """Every file's size and mtime, but the lock's (each job writes its name there)."""
    return {
        str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != ".lock"
    }


def flip_a_byte(path: Path) -> None:
    """Same size, other content."""
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


# 1. Stages run alone read only complete upstream work.


def test_1_stages_run_alone_refuse_partial_upstream_and_run_repairs(tiny_run, tmp_path, capsys):
    cfg = copy_run(tiny_run, tmp_path)
    (cfg.output_dir / "features" / "_done" / "shard-00002.json").unlink()  # extract killed before its last shard
    code, err = cli(cfg, capsys, "fit")
    assert_user_error(
        code,
        err,
        "the fit stage needs the whole extract stage",
        "1 of 3 shards are not done (shard-00002)",
        "python submit.py extract",
    )
    code, err = cli(cfg, capsys, "label")
    assert_user_error(code, err, "the label stage needs the whole extract stage")
    Pipeline(cfg).run()  # redoes the shard (same bytes: the fits are reused), then labels and reports
    assert report_metrics(cfg.output_dir) == report_metrics(tiny_run.output_dir)


def test_1_report_after_a_killed_label_refuses(tiny_run, tmp_path, capsys):
    cfg = copy_run(tiny_run, tmp_path)
    (cfg.output_dir / "scores" / "_done" / "shard-00001.json").unlink()
    code, err = cli(cfg, capsys, "report")
    assert_user_error(
        code, err, "the report stage needs the whole label stage", "(shard-00001)", "python submit.py label"
    )


def test_1_a_stage_alone_on_an_empty_folder_starts_and_writes_nothing(demo_root, tmp_path, capsys):
    """Refused before Ray starts (this test is not marked `ray`: a cluster started here fails it) and
    before the lock file or config.yaml are written: the folder is not even made."""
    cfg = tiny_config(demo_root, tmp_path / "out")
    for stage, upstream in (("label", "extract"), ("report", "extract")):
        code, err = cli(cfg, capsys, stage)
        assert_user_error(code, err, f"the {stage} stage needs the {upstream} stage's results", "there are none")
    assert not cfg.output_dir.exists()


# 2. Markers record what their shard wrote; readers verify it.


def test_2_a_deleted_features_file_is_refused_downstream_and_redone_upstream(tiny_run, tmp_path, capsys):
    cfg = copy_run(tiny_run, tmp_path)
    gone = cfg.output_dir / "features" / "shard-00001.parquet"
    gone.unlink()
    code, err = cli(cfg, capsys, "fit")
    assert_user_error(code, err, f"{gone} is missing", "python submit.py extract", "redoes that shard")
    Pipeline(cfg).run()
    assert gone.is_file() and report_metrics(cfg.output_dir) == report_metrics(tiny_run.output_dir)


def test_2_a_deleted_scores_file_or_label_png_is_refused_by_report_and_redone_by_label(tiny_run, tmp_path, capsys):
    cfg = copy_run(tiny_run, tmp_path)
    npz = cfg.output_dir / "scores" / "shard-00000.npz"
    npz.unlink()
    png = sorted(cfg.output_dir.glob("labels/labelIds/*/*_labelIds.png"))[-1]  # in the last shard
    png.unlink()
    code, err = cli(cfg, capsys, "report")
    assert_user_error(code, err, f"{npz} is missing", "python submit.py label")
    Pipeline(cfg).run(("label", "report"))
    assert npz.is_file() and png.is_file()
    assert report_metrics(cfg.output_dir) == report_metrics(tiny_run.output_dir)


def test_2_truncated_or_altered_files_name_the_file(tiny_run, tmp_path, capsys):
    cfg = copy_run(tiny_run, tmp_path)
    parquet = cfg.output_dir / "features" / "shard-00000.parquet"
    parquet.write_bytes(parquet.read_bytes()[:300])
    code, err = cli(cfg, capsys, "fit")
    assert_user_error(code, err, f"{parquet} is 300 bytes", "when written", "python submit.py extract")

    cfg = copy_run(tiny_run, tmp_path / "b")
    npz = cfg.output_dir / "scores" / "shard-00002.npz"
    flip_a_byte(npz)
    code, err = cli(cfg, capsys, "report")
    assert_user_error(code, err, str(npz), "other content than when written", "python submit.py label")


def test_2_same_size_changes_are_redone_by_the_stage_that_wrote_them(tiny_run, tmp_path, capsys):
    cfg = copy_run(tiny_run, tmp_path)
    flip_a_byte(cfg.output_dir / "features" / "shard-00001.parquet")
    png = sorted(cfg.output_dir.glob("labels/labelIds/*/*_labelIds.png"))[0]
    original = png.read_bytes()
    flip_a_byte(png)
    Pipeline(cfg).run()  # extract redoes shard 1 (same bytes: the fits stand), label redoes the PNG's shard
    assert png.read_bytes() == original
    assert report_metrics(cfg.output_dir) == report_metrics(tiny_run.output_dir)


def test_2_altered_fits_are_refused_by_later_stages_and_refitted_by_run(tiny_run, tmp_path, capsys):
    cfg = copy_run(tiny_run, tmp_path)
    centroids = cfg.output_dir / "fits" / "k16" / "centroids.npy"
    np.save(centroids, np.load(centroids)[::-1].copy())  # still a valid fit, but not the one the labels came from
    code, err = cli(cfg, capsys, "report")
    assert_user_error(
        code, err, "the report stage needs the fits", "centroids.npy has other content", "python submit.py fit"
    )
    summary = cfg.output_dir / "fits" / "fit_summary.json"
    summary.write_text(summary.read_text().replace('"miou": 0.', '"miou": 0.9', 1))
    Pipeline(cfg).run()
    assert report_metrics(cfg.output_dir) == report_metrics(tiny_run.output_dir)


def test_2_markers_of_another_plan_are_not_adopted(tiny_run, tmp_path, capsys):
    cfg = copy_run(tiny_run, tmp_path)
    for folder in ("fits", "scores"):
        shutil.rmtree(cfg.output_dir / folder)
    (cfg.output_dir / "features" / "_plan.json").unlink()  # the plan gone, its markers left
    other = parse_config(
        {**cfg.model_dump(mode="json"), "model": {**cfg.model.model_dump(mode="json"), "init_seed": 1}}
    )
    done = Pipeline(other)
    done.run(("extract",))
    markers = read_done(cfg.output_dir / "features")
    assert {m["plan_key"] for m in markers.values()} == {done.plans["extract"].key}  # every shard redone


# 3. report checks that what it reads was made with the settings it is given.


def test_3_report_with_other_settings_is_refused_and_changes_nothing(tiny_run, tmp_path, capsys):
    cfg = copy_run(tiny_run, tmp_path)
    before = snapshot(cfg.output_dir)
    code, err = cli(cfg, capsys, "report", "--set", "fit.k=12")
    assert_user_error(
        code, err, "fits holds fit results made with other settings: fit.k: 16 -> 12", "nothing was changed"
    )
    assert snapshot(cfg.output_dir) == before


# 4. apply compares the model's identity, not only the feature size.


def test_4_apply_refuses_a_fit_of_another_model_of_the_same_feature_size(tiny_run, tmp_path):
    other = parse_config(
        {
            **tiny_run.model_dump(mode="json"),
            "output_dir": str(tmp_path / "apply"),
            "dataset": {"kind": "folder", "root": str(tmp_path / "frames")},
            "model": {**tiny_run.model.model_dump(mode="json"), "init_seed": 1},
        }
    )
    with pytest.raises(ApplyError, match=r"another model: init_seed: 0 -> 1; use the config the fit was made with"):
        run_apply(other, tiny_run.output_dir / "fits" / "k16")
    flipped = parse_config(
        {
            **other.model_dump(mode="json"),
            "model": tiny_run.model.model_dump(mode="json"),
            "inference": {**tiny_run.inference.model_dump(mode="json"), "flip": False},
        }
    )
    with pytest.raises(ApplyError, match=r"inference.flip: true -> false"):
        run_apply(flipped, tiny_run.output_dir / "fits" / "k16")
    assert not (tmp_path / "apply").exists()


# 5. Image ids are unique however the file names collide.


def test_5_folder_ids_never_collide_and_are_safe_names(tmp_path):
    names = [
        "frame.png",
        "frame.jpg",
        "a b.png",
        "a_b.png",
        "sub/x.png",
        "sub__x.png",
        "_hidden.png",
        "-dash.png",
        "straße.png",
        "x..y.png",
        "plain.png",
    ]
    for name in names:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (4, 4)).save(tmp_path / name, format="PNG")
    records = list_image_folder(tmp_path)
    ids = [r.image_id for r in records]
    assert len(ids) == len(set(ids)) == len(names)
    assert sorted(r.image_path for r in records) == sorted(str(tmp_path / n) for n in names)
    for image_id in ids:
        safe_path(tmp_path, f"{image_id}_labelIds.png")  # every id is a safe file name
    assert "plain" in ids and "a_b" not in ids  # untouched when unique; suffixed where two files meet
    assert [r.image_id for r in list_image_folder(tmp_path)] == ids  # deterministic
    long_name = tmp_path / f"{'x' * 240}.png"
    Image.new("RGB", (4, 4)).save(long_name)
    assert max(len(r.image_id) for r in list_image_folder(tmp_path)) <= 130
    with pytest.raises(
        ConfigError, match="lies inside dataset.root"
    ):  # its outputs would be listed as images next time
        parse_config({"dataset": {"kind": "folder", "root": str(tmp_path)}, "output_dir": str(tmp_path / "out")})


# 6. One bad image never ends a stage.


def test_6_a_tiny_labelled_image_is_recorded_and_the_run_completes(ray_cluster, tmp_path):
    root = tmp_path / "data"
    generate_demo_dataset(root, split="val", num_images=4, height=128, width=256, seed=1)
    image = sorted(root.glob("leftImg8bit/val/*/*.png"))[1]
    Image.new("RGB", (1, 1)).save(image)
    gt = Path(str(image).replace("leftImg8bit/", "gtFine/").replace("_leftImg8bit.png", "_gtFine_labelIds.png"))
    Image.new("L", (1, 1), 7).save(gt)
    cfg = tiny_config(root, tmp_path / "out", images_per_shard=2, fit={"k": 8, "k_sweep": [4]})
    Pipeline(cfg).run()
    report = json.loads((cfg.output_dir / "report.json").read_text())
    assert report["dataset"]["num_images"] == 3 and report["dataset"]["num_failed"] == 1
    (failure,) = {f["image_id"]: f for f in report["failed_items"]}.values()
    assert str(image) == failure["path"] and "1x1 px" in failure["error"]


def test_6_a_single_labelled_image_is_a_complete_run(ray_cluster, demo_root, tmp_path):
    cfg = tiny_config(demo_root, tmp_path / "out", dataset={"max_images": 1}, fit={"k": 4, "k_sweep": [2]})
    Pipeline(cfg).run()
    report = json.loads((cfg.output_dir / "report.json").read_text())
    assert report["dataset"]["num_images"] == 1
    assert "held_out" not in report["fits"]["k4"]["pixel_level"]  # undefined with one image: left out, not faked


# 7. A run changes nothing before it has decided to run; one job per output folder.


def test_7_a_refused_run_changes_nothing(tiny_run, tmp_path, capsys):
    cfg = copy_run(tiny_run, tmp_path)
    before = snapshot(cfg.output_dir)
    code, err = cli(cfg, capsys, "run", "--set", "inference.flip=false")
    assert_user_error(
        code, err, "features holds extract results made with other settings: model.inference.flip: true -> false"
    )
    assert snapshot(cfg.output_dir) == before


HOLD_THE_LOCK = """
import sys, time
from storage.run.lock import OutputLock
with OutputLock(sys.argv[1], "submit.py run (the first job)"):
    print("held", flush=True)
    time.sleep(120)
"""


def test_7_a_second_job_on_the_same_folder_is_refused_naming_the_first(tiny_run, tmp_path, capsys):
    cfg = copy_run(tiny_run, tmp_path)
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_THE_LOCK, str(cfg.output_dir)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(submit.__file__).parent,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        before = snapshot(cfg.output_dir)
        code, err = cli(cfg, capsys, "report")
        assert_user_error(code, err, f"is in use by pid {holder.pid} on host {socket.gethostname()}", "the first job")
        assert snapshot(cfg.output_dir) == before
    finally:
        holder.kill()  # killed: the kernel drops its lock, nothing stale is left
        holder.wait()
    code, err = cli(cfg, capsys, "report")
    assert code == 0, err


# 8. Scheduling that can never succeed fails fast.


@pytest.mark.parametrize(
    "model, phrase",
    [
        ({"cpus_per_actor": 8}, "one actor needs 8 CPUs and 0 GPUs, but no node has them"),
        ({"gpus_per_actor": 1}, "one actor needs 1 CPUs and 1 GPUs"),
        ({"num_actors": 4}, "4 actors x (1 CPUs, 0 GPUs) do not fit"),
    ],
)
def test_8_unschedulable_steps_fail_fast_with_the_numbers(ray_cluster, demo_root, tmp_path, model, phrase):
    cfg = tiny_config(demo_root, tmp_path / "out", extract={"model": model})
    with pytest.raises(ClusterTooSmall, match=rf"extract.model: {re.escape(phrase)}.*2 CPUs"):
        Pipeline(cfg).run()
    assert not (cfg.output_dir / "config.yaml").exists()  # refused before anything was written


# 9. Ground truth of the wrong kind is refused.


def test_9_wrong_ground_truth_is_refused(demo_root, tmp_path):
    label_path = sorted(demo_root.glob("gtFine/val/*/*_labelIds.png"))[0]
    instance_path = Path(str(label_path).replace("labelIds", "instanceIds"))
    read_ground_truth(label_path, instance_path, (128, 256))  # the real pair is fine
    eight_bit = tmp_path / "inst8.png"
    Image.fromarray((np.asarray(Image.open(instance_path)) % 256).astype(np.uint8)).save(eight_bit)
    with pytest.raises(InputError, match="instanceIds must be a 16-bit PNG"):
        read_ground_truth(label_path, eight_bit, (128, 256))
    other = tmp_path / "other_inst.png"
    ids = np.asarray(Image.open(instance_path)).astype(np.uint16)
    Image.fromarray(np.where(ids == ids.max(), 7, ids).astype(np.uint16)).save(other)  # an instance's pixels made road
    with pytest.raises(InputError, match="labelIds and instanceIds disagree"):
        read_ground_truth(label_path, other, (128, 256))


# 10. Every user error ends in one `error:` line with exit 2.


def test_10_user_errors_exit_2_without_a_traceback(tiny_run, tmp_path, capsys):
    cfg = copy_run(tiny_run, tmp_path)
    assert_user_error(*cli(cfg, capsys, "report", "--set", "fit.k=[1,"), "override 'fit.k=[1,'", "not valid YAML")
    assert_user_error(
        *cli(cfg, capsys, "report", "--set", "run_name=!!python/object/apply:os.system [echo]"), "not valid YAML"
    )
    fit = cfg.output_dir / "fits" / "k16"
    (fit / "meta.json").write_text("{")
    assert_user_error(*cli(cfg, capsys, "apply", "--fit", str(fit)), f"output_dir={cfg.output_dir} holds --fit={fit}")
    applied = f"output_dir={tmp_path / 'applied'}"  # beside the run, not in it
    assert_user_error(
        *cli(cfg, capsys, "apply", "--fit", str(fit), "--set", applied), f"{fit / 'meta.json'} is corrupt"
    )
    assert_user_error(*cli(cfg, capsys, "report"), f"{fit / 'meta.json'} is 1 bytes", "python submit.py fit")
    assert_user_error(submit.main(["run", "--config", sys.executable]), capsys.readouterr().err, "is not a text file")
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    assert_user_error(*cli(cfg, capsys, "run", "--set", f"output_dir={blocker / 'out'}"), str(blocker))
    report = cfg.output_dir / "report.json"
    report.write_text("{")
    assert_user_error(
        submit.main(["compare", str(cfg.output_dir), "--out", str(tmp_path / "c.md")]),
        capsys.readouterr().err,
        f"{report} is damaged",
    )


# 11. The fit's driver memory does not grow with the number of shards; files without a marker are never read.


def test_11_fit_sampling_memory_is_bounded_by_the_sample_not_the_shards(ray_cluster, tmp_path):
    rng = np.random.default_rng(0)

    def peak(num_shards: int) -> tuple[int, np.ndarray]:
        cfg = parse_config(
            {
                "output_dir": str(tmp_path / f"s{num_shards}"),
                "model": {"vit": {"embed_dim": 32, "num_heads": 2}},
                "fit": {"max_samples": 1000, "max_patches_per_image": 400},
            }
        )
        tables = [
            patch_table(
                [f"s{s}_i{i}" for i in range(2)],
                [rng.normal(size=(32, 10, 20)) for _ in range(2)],
                [np.zeros((10, 20), np.uint8)] * 2,
                patch_schema(32),
                [(140, 280)] * 2,
            )
            for s in range(num_shards)
        ]
        write_extracted(cfg, tables)
        stray = cfg.output_dir / "features" / "shard-99999.parquet"  # no marker: not part of the stage
        write_parquet_atomic(
            patch_table(
                ["stray"], [np.full((32, 10, 20), 9.0)], [np.zeros((10, 20), np.uint8)], patch_schema(32), [(140, 280)]
            ),
            stray,
        )
        shards = FeatureShards(cfg.output_dir / "features", read_done(cfg.output_dir / "features"))
        assert stray not in shards.paths
        tracemalloc.start()
        sample = gather_sample(shards, cfg)
        _, top = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        return top, sample

    few, sample_few = peak(4)
    many, sample_many = peak(200)
    assert len(sample_few) == 1000 and len(sample_many) == 1000 and not (sample_many == 9.0).all(axis=1).any()
    assert many < 1.5 * few, (few, many)  # was 200/4 x the rows held
