"""Applying a saved fit to unlabelled images in an object store (a moto S3 server on loopback)."""

import json
import os
import socket
from pathlib import Path

import boto3
import numpy as np
import pyarrow.parquet as pq
import pytest
import ray
from moto.server import ThreadedMotoServer

from configs.schema import parse_config
from core.clustering.fit_artifact import FitArtifact
from core.errors import UserError
from ray_jobs.apply import ApplyError, run_apply
from ray_jobs.session import init_ray
from storage.run.plans import model_identity
from storage.synth import generate_demo_dataset
from tests.tiny_runs import one_colour_png, own_ray_cluster

OWN_RAY_CLUSTER = True  # starts a cluster of its own settings: runs after the shared-cluster modules

NUM_GOOD = 5
AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "test",
    "AWS_SECRET_ACCESS_KEY": "test",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def apply_config(root: str, output_dir, embed_dim: int = 32):
    return parse_config(
        {
            "run_name": "apply",
            "output_dir": str(output_dir),
            "dataset": {"kind": "folder", "root": root, "images_per_shard": 2},
            "model": {
                "vit": {"patch_size": 14, "embed_dim": embed_dim, "depth": 1, "num_heads": 2},
                "feature_kind": "backbone",
            },
            "inference": {"short_side": 112, "crop": 112, "stride": 56},
            "extract": {
                "read": {"num_cpus": 0.25},
                "model": {"num_actors": 1, "cpus_per_actor": 0.5, "batch_images": 2},
                "write": {"num_cpus": 0.25},
            },
            "label": {"workers": {"num_actors": 2, "cpus_per_actor": 0.5}},
            "ray": {"local_num_cpus": 2},
        }
    )


@pytest.fixture(scope="module")
def s3_frames(tmp_path_factory):
    """A bucket with NUM_GOOD demo images, a truncated PNG, a decompression bomb and a 1 x 100000 px
    strip; credentials set for the Ray workers too."""
    saved = {k: os.environ.get(k) for k in AWS_ENV}
    os.environ.update(AWS_ENV)
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    local = tmp_path_factory.mktemp("frames")
    generate_demo_dataset(local, num_images=NUM_GOOD, height=128, width=256, seed=1)
    s3 = boto3.client("s3", endpoint_url=f"http://127.0.0.1:{port}", region_name="us-east-1")
    s3.create_bucket(Bucket="frames")
    images = sorted(local.glob("leftImg8bit/val/*/*.png"))
    for path in images:
        s3.upload_file(str(path), "frames", f"drive1/{path.name}")
    s3.put_object(Bucket="frames", Key="drive1/zz_truncated.png", Body=images[0].read_bytes()[:200])
    s3.put_object(Bucket="frames", Key="drive1/zz_bomb.png", Body=one_colour_png(14000, 14000))
    s3.put_object(Bucket="frames", Key="drive1/zz_strip.png", Body=one_colour_png(100_000, 1))
    s3.put_object(Bucket="frames", Key="drive1/notes.txt", Body=b"not an image")
    own_ray_cluster()  # its workers must start with the S3 settings above
    init_ray(apply_config("unused", tmp_path_factory.mktemp("unused")))
    yield f"s3://frames/drive1?endpoint_override=127.0.0.1:{port}&scheme=http&region=us-east-1"
    ray.shutdown()
    server.stop()
    for k, v in saved.items():
        os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)


@pytest.fixture()
def fit_dir(tmp_path):
    rng = np.random.default_rng(0)
    centroids = rng.normal(size=(12, 32)).astype(np.float32)
    centroids /= np.linalg.norm(centroids, axis=1, keepdims=True)
    FitArtifact(
        centroids=centroids,
        mapping=np.arange(12) % 19,
        mapping_kind="majority",
        meta={
            "name": "k12",
            "feature_kind": "backbone",
            "plan_key": "test",
            "model_identity": model_identity(apply_config("unused", tmp_path)),
        },
    ).save(tmp_path / "fits" / "k12")
    return tmp_path / "fits" / "k12"


def test_apply_labels_every_object_store_image_and_records_the_bad_one(s3_frames, fit_dir, tmp_path):
    cfg = apply_config(s3_frames, tmp_path / "out")
    summary = run_apply(cfg, fit_dir)
    assert summary["num_images"] == NUM_GOOD and summary["num_failed"] == 3
    hist = pq.read_table(cfg.output_dir / "histograms").to_pydict()
    assert len(hist["image_id"]) == NUM_GOOD and len(set(hist["image_id"])) == NUM_GOOD
    for pixels, h, w in zip(hist["cluster_pixels"], hist["height"], hist["width"]):
        assert len(pixels) == 12 and sum(pixels) == h * w == 128 * 256
    assert all(src.startswith("s3://frames/drive1/") for src in hist["source"])
    assert len(list(cfg.output_dir.glob("labels/labelIds/images/*_labelIds.png"))) == NUM_GOOD
    assert len(list(cfg.output_dir.glob("labels/panoptic/*/*_panoptic.png"))) == NUM_GOOD
    manifest = json.loads((cfg.output_dir / "failed_items.json").read_text())
    failed = {Path(f["path"].split("?")[0]).name: f for f in manifest}
    assert {f["stage"] for f in failed.values()} == {"apply"}  # read by apply's own steps
    assert "corrupt or truncated" in failed["zz_truncated.png"]["error"]
    assert (
        "image too large: 14000x14000 px = 196,000,000 pixels, more than dataset.max_image_pixels"
        in (failed["zz_bomb.png"]["error"])
    )
    assert "extreme aspect ratio: 1x100000 px" in failed["zz_strip.png"]["error"]

    markers = {p: p.stat().st_mtime_ns for p in cfg.output_dir.glob("histograms/_done/*.json")}
    assert run_apply(cfg, fit_dir)["num_images"] == NUM_GOOD  # a re-run skips every done shard
    assert {p: p.stat().st_mtime_ns for p in markers} == markers


def test_apply_writes_the_features_when_asked_and_they_equal_extract(s3_frames, fit_dir, tmp_path):
    """apply.write_features: one streaming pass labels the images and keeps their patch features, in
    the extract schema (labels 255: unlabelled), the same features extract would write."""
    from configs.geometry import image_limits, window_spec
    from configs.specs import model_spec
    from core.inference.dense import DenseFeatureExtractor
    from core.models import build_feature_model
    from storage.features import image_grids
    from storage.images import read_rgb

    cfg = parse_config(
        {**apply_config(s3_frames, tmp_path / "out").model_dump(mode="json"), "apply": {"write_features": True}}
    )
    summary = run_apply(cfg, fit_dir)
    table = pq.read_table(cfg.output_dir / "features")
    grids = image_grids(table)
    assert len(grids) == summary["num_images"] == NUM_GOOD and set(table.column("label").to_pylist()) == {255}
    hist = pq.read_table(cfg.output_dir / "histograms").to_pydict()
    image_id, source = hist["image_id"][0], hist["source"][0]
    dense = DenseFeatureExtractor(build_feature_model(model_spec(cfg)), window_spec(cfg))
    (expected,) = dense([read_rgb(source, image_limits(cfg))])
    features, hw = grids[image_id]
    assert hw == (128, 256)
    np.testing.assert_allclose(features, expected, atol=2e-3 * np.abs(expected).max())


def test_a_fit_of_other_features_is_refused_with_the_fix(s3_frames, fit_dir, tmp_path):
    with pytest.raises(ApplyError, match="another model: vit.embed_dim: 32 -> 64.*config the fit was made with"):
        run_apply(apply_config(s3_frames, tmp_path / "out", embed_dim=64), fit_dir)


def test_apply_refuses_an_output_dir_in_what_it_reads_the_fit_and_its_runs_dataset(fit_dir, tmp_path):
    """Refused before the fit is loaded or Ray is used (no cluster here): inside --fit, holding it,
    inside the dataset of the fit's run (its config.yaml records it), and the config's own dataset."""
    from configs.schema import ConfigError

    run_data = tmp_path / "run_data"
    (tmp_path / "config.yaml").write_text(f"dataset: {{kind: folder, root: {run_data}}}\n")  # the run around fits/k12
    run_dataset = f"{tmp_path / 'config.yaml'}'s dataset.root={run_data}"
    for output_dir, phrase in [
        (fit_dir / "out", f"lies inside --fit={fit_dir}"),
        (tmp_path, f"holds --fit={fit_dir}"),
        (run_data / "labelled", f"lies inside {run_dataset}"),
    ]:
        with pytest.raises(UserError) as err:
            run_apply(apply_config("s3://frames/drive1", output_dir), fit_dir)  # a URI holds no local folder
        assert f"output_dir={output_dir} {phrase}: what is written there " in str(err.value)
    assert not (fit_dir / "out").exists() and not run_data.exists()
    with pytest.raises(ConfigError, match="lies inside dataset.root"):
        apply_config(str(tmp_path / "frames"), tmp_path / "frames" / "labelled")
