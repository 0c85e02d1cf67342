"""Security: no arbitrary unpickling of user files, safe YAML, outputs confined to the output
directory, and a local cluster that neither exposes its dashboard nor joins someone else's cluster."""

import ast
import json
from pathlib import Path

import numpy as np
import pytest

from configs.schema import parse_config
from core.panoptic import panoptic_from_train_ids
from ray_jobs import session
from storage.cityscapes_outputs import write_image_predictions
from storage.datasets import ImageRecord, list_cityscapes
from storage.images import InputError, safe_path
from storage.synth import generate_demo_dataset
from tests.tiny_runs import tiny_config

REPO = Path(__file__).resolve().parent.parent
SOURCE_DIRS = ("actors", "bench", "configs", "core", "ray_jobs", "storage")


def _source_files() -> list[Path]:
    files = [REPO / "submit.py", *(p for d in SOURCE_DIRS for p in sorted((REPO / d).rglob("*.py")))]
    assert len(files) > 20
    return files


def _calls(name: str) -> list[tuple[Path, ast.Call]]:
    """Every call of `<module>.<attr>(...)` for name = 'module.attr' in the source tree."""
    module, attr = name.split(".")
    found = []
    for path in _source_files():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr == attr
                and isinstance(node.func.value, ast.Name)
                and node.func.value.id == module
            ):
                found.append((path, node))
    return found


def _keyword(call: ast.Call, name: str):
    for kw in call.keywords:
        if kw.arg == name:
            return kw.value.value if isinstance(kw.value, ast.Constant) else "<not a constant>"
    return "<absent>"


def test_every_torch_load_passes_weights_only_true():
    calls = _calls("torch.load")
    assert calls, "no torch.load call found: is the scan looking in the right place?"
    bad = [f"{p.relative_to(REPO)}:{c.lineno}" for p, c in calls if _keyword(c, "weights_only") is not True]
    assert bad == [], f"torch.load without weights_only=True at {bad}"


def test_every_np_load_refuses_pickles_explicitly():
    calls = _calls("np.load") + _calls("numpy.load")
    assert calls
    bad = [f"{p.relative_to(REPO)}:{c.lineno}" for p, c in calls if _keyword(c, "allow_pickle") is not False]
    assert bad == [], f"np.load without allow_pickle=False at {bad}"


def test_yaml_only_through_safe_load_and_no_pickle_modules():
    unsafe_yaml = [
        f"{p.relative_to(REPO)}:{c.lineno}"
        for fn in ("load", "load_all", "full_load", "unsafe_load", "unsafe_load_all")
        for p, c in _calls(f"yaml.{fn}")
    ]
    assert unsafe_yaml == [], f"yaml loaded without safe_load at {unsafe_yaml}"
    assert _calls("yaml.safe_load"), "the configs are read with yaml.safe_load"
    pickling = []
    for path in _source_files():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""]
                if isinstance(node, ast.ImportFrom)
                else []
            )
            pickling += [
                f"{path.relative_to(REPO)}:{node.lineno} {n}"
                for n in names
                if n.split(".")[0] in ("pickle", "cloudpickle", "dill", "joblib", "shelve", "marshal")
            ]
            if isinstance(node, ast.Name) and node.id in ("eval", "exec"):
                pickling.append(f"{path.relative_to(REPO)}:{node.lineno} {node.id}")
    assert pickling == [], f"modules that unpickle or execute data: {pickling}"


@pytest.mark.parametrize(
    "image_id, group",
    [
        ("../../escaped", "frankfurt"),
        ("frankfurt_000000_000019", "../../escaped"),
        ("/tmp/escaped", "frankfurt"),
        ("sub/../../escaped", "frankfurt"),
    ],
)
def test_names_from_data_cannot_write_outside_the_output_dir(tmp_path, image_id, group):
    labels = tmp_path / "out" / "labels"
    train_ids = np.zeros((4, 8), np.uint8)
    panoptic = panoptic_from_train_ids(train_ids, None, min_area=1, stuff_min_area=1, connectivity=8)
    with pytest.raises(InputError, match="unsafe name"):
        write_image_predictions(labels, group, image_id, train_ids, panoptic)
    with pytest.raises(InputError):
        safe_path(labels, "trainIds", group, f"{image_id}_trainIds.png")
    outside = [p for p in tmp_path.rglob("*") if p.is_file()] + list(Path("/tmp").glob("escaped*"))
    assert outside == []


def _label_actor(cfg, tmp_path):
    from actors.label import LabelImages

    rng = np.random.default_rng(0)
    fits = []
    for name, k in (("k16", 16), ("k8", 8), ("baseline_k19", 19)):
        c = rng.normal(size=(k, 32)).astype(np.float32)
        fits.append(
            {
                "name": name,
                "centroids": c / np.linalg.norm(c, axis=1, keepdims=True),
                "mapping": np.arange(k) % 19,
                "stride": 1,
            }
        )
    actor = LabelImages(cfg=cfg, fits=fits, labels_dir=str(tmp_path / "out" / "labels"), overlay_ids=[])
    actor.setup()
    return actor, fits


@pytest.fixture
def hostile_rows(tmp_path):
    """Label rows (as the feature reader makes them) of a shard whose second image id, from data,
    tries to leave the output dir."""
    root = tmp_path / "data"
    generate_demo_dataset(root, split="val", num_images=2, height=128, width=256, seed=0)
    good, victim = list_cityscapes(root, "val")
    hostile = ImageRecord(**{**victim.to_dict(), "image_id": "../../../escaped"})
    cfg = tiny_config(root, tmp_path / "out")
    grid = np.random.default_rng(1).normal(size=(32, 8, 16)).astype(np.float16)  # 128x256 -> 112x224 -> 8x16 patches
    rows = [
        {
            "shard": "shard-00000",
            "image_id": r.image_id,
            "path": r.image_path,
            "error": "",
            "setup_error": "",
            "group": r.group,
            "label_ids_path": r.label_ids_path,
            "instance_ids_path": r.instance_ids_path,
            "height": 128,
            "width": 256,
            "grid_0": grid,
        }
        for r in (good, hostile)
    ]
    shard_row = {"shard": "shard-00000", "records": json.dumps([good.to_dict(), hostile.to_dict()])}
    return cfg, rows, shard_row


def _files_outside(tmp_path: Path) -> list[Path]:
    out, data = tmp_path / "out", tmp_path / "data"
    return [p for p in tmp_path.rglob("*") if p.is_file() and not p.is_relative_to(out) and not p.is_relative_to(data)]


def _label(cfg, tmp_path, rows):
    """The label step, then the score step, on each row (as the stage's Ray Data plan runs them)."""
    import torch

    from actors.score import score_image
    from configs.specs import evaluation_spec
    from core.labelling.image import label_fits

    threads = torch.get_num_threads()
    try:
        actor, fits = _label_actor(cfg, tmp_path)
        spec = evaluation_spec(cfg, label_fits(fits))
        return [
            score_image(
                actor(row), spec, str(tmp_path / "out" / "scores"), "test-plan", str(tmp_path / "out" / "labels"), "val"
            )
            for row in rows
        ], fits
    finally:
        torch.set_num_threads(threads)


def test_a_hostile_image_id_writes_nothing_outside(tmp_path, hostile_rows):
    cfg, rows, _ = hostile_rows
    (good, bad), _ = _label(cfg, tmp_path, rows)
    assert good["error"] == "" and "unsafe name '../../../escaped_labelIds.png'" in bad["error"]
    assert _files_outside(tmp_path) == []
    assert not list(tmp_path.parent.rglob("escaped*"))


def test_a_hostile_image_id_is_a_failed_item_and_the_shard_completes(tmp_path, hostile_rows):
    from actors.score import finish_scores
    from storage.run.markers import read_done

    cfg, rows, shard_row = hostile_rows
    (good, bad), fits = _label(cfg, tmp_path, rows)
    failed = [{"image_id": bad["image_id"], "path": bad["path"], "stage": "label", "error": bad["error"]}]
    finish_scores(
        str(tmp_path / "out" / "scores"),
        shard_row,
        [good["image_id"]],
        failed,
        "test-plan",
        cfg.fit.heldout_folds,
        str(tmp_path / "out" / "labels"),
        cfg.dataset.split,
        True,
    )
    (done,) = read_done(tmp_path / "out" / "scores").values()
    assert done["num_images"] == 1 and [f["image_id"] for f in done["failed"]] == ["../../../escaped"]
    assert "unsafe name" in done["failed"][0]["error"]
    assert not (tmp_path / "out" / "scores" / "_parts" / "shard-00000").exists()  # the parts went into the npz
    assert _files_outside(tmp_path) == []


def test_local_cluster_binds_the_dashboard_to_loopback_and_starts_its_own(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    cfg = parse_config({"ray": {"local_num_cpus": 2}})
    kwargs = session.ray_init_kwargs(cfg)
    assert kwargs["dashboard_host"] == "127.0.0.1"
    assert kwargs["include_dashboard"] is False
    assert kwargs["address"] == "local"  # never joins a cluster recorded by some other `ray start`
    assert kwargs["_system_config"] == {"num_workers_soft_limit": 8}  # 4 idle workers kept per CPU

    calls = []
    monkeypatch.setattr(session.ray, "is_initialized", lambda: False)
    monkeypatch.setattr(session.ray, "init", lambda **kw: calls.append(kw))
    session.init_ray(cfg)
    assert calls == [kwargs]


def test_under_ray_job_submit_the_driver_joins_the_cluster(monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6380")
    kwargs = session.ray_init_kwargs(parse_config({"ray": {"local_num_cpus": 2}}))
    assert kwargs["address"] == "127.0.0.1:6380"
    assert not {"num_cpus", "dashboard_host", "include_dashboard", "runtime_env", "_system_config"} & set(kwargs)
    monkeypatch.delenv("RAY_ADDRESS")
    assert session.ray_init_kwargs(parse_config({"ray": {"address": "10.0.0.5:6379"}}))["address"] == "10.0.0.5:6379"


def _frames(root: Path) -> Path:
    from PIL import Image

    root.mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(root / "frame.png")
    return root


def test_an_output_dir_inside_the_dataset_or_holding_it_is_refused_however_it_is_spelt(tmp_path, monkeypatch):
    """Both dataset kinds; relative, '..', symlinked spellings of either folder."""
    from configs.schema import ConfigError

    data = _frames(tmp_path / "data")
    (tmp_path / "link").symlink_to(data)
    (tmp_path / "data_link").symlink_to(tmp_path)  # a link to the folder above the dataset
    monkeypatch.chdir(tmp_path)
    inside = [
        ("data/out", "data"),
        (data / "out", data),
        ("data", "data"),
        ("link/out", data),
        (tmp_path / "x/../data/o", "data"),
        ("out", "data_link/data/.."),
        ("data_link/data/sub/out", data),
    ]
    holding = [(tmp_path, data), (f"../{tmp_path.name}", "link"), ("..", data), ("data_link", "data")]
    for kind in ("folder", "cityscapes"):
        for output_dir, root in inside + holding:
            with pytest.raises(ConfigError) as err:
                parse_config({"output_dir": str(output_dir), "dataset": {"kind": kind, "root": str(root)}}, "test")
            message = str(err.value)
            assert f"output_dir={output_dir}" in message and f"dataset.root={root}" in message, message
            assert any(f" {relation} dataset.root" in message for relation in ("lies inside", "is", "holds"))
            assert "Put output_dir" in message
            assert "\n" not in message
    for output_dir, root in [
        ("out", "data"),
        ("data_out", "data"),
        (tmp_path / "data2", data),
        ("out", "s3://bucket/data/out"),
    ]:
        parse_config({"output_dir": str(output_dir), "dataset": {"kind": "folder", "root": str(root)}}, "test")
    assert not (data / "out").exists()


def test_an_output_dir_inside_a_feature_set_it_fits_on_or_holding_one_is_refused(tmp_path):
    from configs.schema import ConfigError

    for output_dir, source in [
        (tmp_path / "frames" / "sub", {"features": [{}, {"path": str(tmp_path / "frames")}]}),
        (tmp_path, {"features": [{"path": str(tmp_path / "frames")}]}),
        (tmp_path / "frames" / "features" / "x", {"mapping_from": str(tmp_path / "frames"), "heldout_folds": 1}),
    ]:
        with pytest.raises(ConfigError, match="what is written there .*This run's own features need no path"):
            parse_config({"output_dir": str(output_dir), "fit": source}, "test")
    beside = {"output_dir": str(tmp_path / "run"), "fit": {"features": [{}, {"path": str(tmp_path / "frames")}]}}
    parse_config(beside, "test")


def test_a_symlink_loop_as_output_dir_is_refused_with_its_name(tmp_path):
    from configs.schema import ConfigError

    (tmp_path / "a").symlink_to(tmp_path / "b")
    (tmp_path / "b").symlink_to(tmp_path / "a")
    with pytest.raises(ConfigError, match=r"output_dir=.*/a/out cannot be resolved .*symlink loop"):
        parse_config({"output_dir": str(tmp_path / "a" / "out"), "dataset": {"root": str(tmp_path / "data")}}, "test")


def test_a_copied_runs_config_does_not_send_the_work_to_the_original(tmp_path, capsys):
    """A run's config.yaml names the folder it was made in: read from a copy, the stages would write to
    the original. Refused, naming the fix, unless output_dir is given on the command line."""
    import submit
    from storage.run.placement import PlacementError, refuse_a_moved_runs_config

    original, copy = tmp_path / "original", tmp_path / "copy"
    for run in (original, copy):
        (run / "features").mkdir(parents=True)
        (run / "config.yaml").write_text(f"output_dir: {original}\n")
    refuse_a_moved_runs_config(original / "config.yaml", original, [])  # the run's own record: its own folder
    refuse_a_moved_runs_config(copy / "config.yaml", copy, [f"output_dir={copy}"])
    with pytest.raises(PlacementError, match=f"lies in {copy} .*add --set output_dir={copy}"):
        refuse_a_moved_runs_config(copy / "config.yaml", original, [])
    assert submit.main(["label", "--config", str(copy / "config.yaml")]) == 2
    assert capsys.readouterr().err.startswith(f"error: {copy / 'config.yaml'} is the record of the run made in")
    assert sorted(p.name for p in original.iterdir()) == ["config.yaml", "features"]  # nothing written there
