from pathlib import Path

import pytest

from configs.schema import ConfigError, load_config, parse_config

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


@pytest.mark.parametrize("name", ["demo.yaml", "cityscapes_cause_k300.yaml"])
def test_shipped_configs_validate(name):
    cfg = load_config(CONFIGS / name)
    assert cfg.fit.k in cfg.all_k


def test_cityscapes_config_describes_the_seed_setting():
    cfg = load_config(CONFIGS / "cityscapes_cause_k300.yaml")
    assert (cfg.fit.k, cfg.model.feature_kind, cfg.inference.crop, cfg.inference.stride) == (300, "head", 322, 161)
    assert cfg.model.vit.embed_dim == 768 and cfg.model.vit.depth == 12


def test_unknown_key_is_named():
    with pytest.raises(ConfigError, match=r"fit\.kk: unknown key"):
        parse_config({"fit": {"kk": 3}})


def test_bad_value_is_named_with_the_value():
    with pytest.raises(ConfigError, match=r"fit\.k:.*got -1"):
        parse_config({"fit": {"k": -1}})


def test_head_needs_322_crops():
    with pytest.raises(ConfigError, match="needs 322"):
        parse_config({"model": {"feature_kind": "head"}, "inference": {"crop": 224, "stride": 112, "short_side": 224}})


def test_overrides_apply_and_validate(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("fit: {k: 50}\n")
    assert load_config(path, ["fit.k=80", "dataset.split=train"]).fit.k == 80
    with pytest.raises(ConfigError, match="key.sub=value"):
        load_config(path, ["fit.k"])


def test_yaml_is_loaded_safely(tmp_path):
    path = tmp_path / "evil.yaml"
    path.write_text("run_name: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(path)


def test_missing_config_file_says_where_examples_are(tmp_path):
    with pytest.raises(ConfigError, match="configs/demo.yaml"):
        load_config(tmp_path / "nope.yaml")


def test_cluster_probe_baseline_needs_head_features(tmp_path):
    with pytest.raises(ConfigError, match="feature_kind=head"):
        parse_config(
            {"fit": {"baseline": "cluster_probe"}, "model": {"cluster_probe_checkpoint": str(tmp_path / "c.pth")}},
            "test",
        )


def test_the_demo_config_applies_on_its_own_two_cpus():
    """apply runs the model and the labelling pools at once: their actors and one read task must
    fit the demo's local_num_cpus, as `session.check_schedulable` asks."""
    from ray_jobs.apply import with_apply_pools

    demo = load_config(Path(__file__).resolve().parent.parent / "configs" / "demo.yaml", [])
    cfg = with_apply_pools(demo)
    pools = (
        cfg.extract.model.num_actors * cfg.extract.model.cpus_per_actor
        + cfg.label.workers.num_actors * cfg.label.workers.cpus_per_actor
    )
    assert pools + cfg.extract.read.num_cpus <= cfg.ray.local_num_cpus
    assert demo.extract.model.num_actors == 2 and cfg.extract.model.num_actors == 1  # extract alone keeps two


def test_the_demo_config_labels_and_scores_on_its_own_two_cpus():
    """The labelling pool holds its CPUs for the stage; one read task and one score task must still fit."""
    from ray_jobs.pipeline import stage_steps

    demo = load_config(Path(__file__).resolve().parent.parent / "configs" / "demo.yaml", [])
    steps = stage_steps(demo, "label")
    assert set(steps) == {"label.read", "label.workers", "label.score"}
    pool = demo.label.workers.num_actors * demo.label.workers.cpus_per_actor
    assert pool + max(demo.label.read.num_cpus, demo.label.score.num_cpus) <= demo.ray.local_num_cpus


CITYSCAPES_WINDOWS = {"short_side": 322, "crop": 322, "stride": 161}


@pytest.mark.parametrize(
    "protocol, scales",
    [
        ("official", [1.0]),
        ("official", [0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0]),
        ("paper", [0.75, 1.0, 1.25, 1.5, 1.75, 2.0]),
        ("cause", [1.0]),
    ],
)
def test_the_default_image_limits_pass_cityscapes_frames_at_scales_up_to_2_and_large_photos(protocol, scales):
    from configs.geometry import image_limits, image_window_count

    cfg = parse_config({"protocol": protocol, "inference": {**CITYSCAPES_WINDOWS, "scales": scales}})
    limits = image_limits(cfg)
    for hw in [(1024, 2048), (8000, 8000), (6000, 9000), (64, 128)]:
        assert limits.problem(*hw) is None, hw
    assert image_window_count(cfg, (1024, 2048)) <= 74  # cf. inference.max_windows_per_image=512
    assert "image too large: 14000x14000 px" in limits.problem(14000, 14000)
    assert "dataset.max_aspect_ratio=16" in limits.problem(1, 100_000)
    assert "inference.short_side" in limits.problem(10, 20)  # fewer pixels than its 23x46 patch grid


def test_an_image_cut_into_too_many_windows_names_the_key_that_raises_the_limit():
    from configs.geometry import image_limits

    cfg = parse_config({"inference": {**CITYSCAPES_WINDOWS, "scales": [1.0, 2.0], "max_windows_per_image": 20}})
    limits = image_limits(cfg)
    assert limits.problem(1024, 1500) is None  # 3 + 14 windows
    assert limits.problem(1024, 2048) == (
        "a 1024x2048 px image is cut into 24 windows at inference.scales=[1.0, 2.0], more than "
        "inference.max_windows_per_image=20; downscale or crop it, or raise inference.max_windows_per_image (each "
        "window is one model pass and its features)"
    )


@pytest.mark.parametrize(
    "settings, message",
    [
        (
            {"inference": {**CITYSCAPES_WINDOWS, "scales": [1.0, 40.0]}},
            r"inference.scales=\[1.0, 40.0\] cut even a square image into 6242 windows, more than "
            r"inference.max_windows_per_image=512, so every image would fail: lower the scales",
        ),
        (
            {"inference": {**CITYSCAPES_WINDOWS, "max_windows_per_image": 2}, "protocol": "cause"},
            r"cut even a square image into 3 windows, more than inference.max_windows_per_image=2",
        ),  # CAUSE's crop counts
        (
            {"dataset": {"max_image_pixels": 528}},
            r"dataset.max_image_pixels=528 is fewer than the smallest usable image \(23x23 px: one pixel per patch",
        ),
    ],
)
def test_limits_that_every_image_would_exceed_are_refused_before_any_is_read(tmp_path, settings, message):
    """By every command that reads images (here `run` and `apply`), before it lists the dataset or loads the fit."""
    from ray_jobs.apply import run_apply
    from ray_jobs.pipeline import Pipeline

    cfg = parse_config({"output_dir": str(tmp_path / "out"), "dataset": {"root": str(tmp_path / "absent")}, **settings})
    with pytest.raises(ConfigError, match=message):
        Pipeline(cfg)
    with pytest.raises(ConfigError, match=message):
        run_apply(cfg, tmp_path / "no_fit")


@pytest.mark.parametrize("scales", [[float("nan")], [float("inf")], [1.0, -0.5], [0.0]])
def test_scales_must_be_finite_and_positive(scales):
    with pytest.raises(ConfigError, match=r"inference.scales.\d"):
        parse_config({"inference": {"scales": scales}})
