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
        parse_config({"fit": {"baseline": "cluster_probe"}, "model": {"cluster_probe_checkpoint": str(tmp_path / "c.pth")}}, "test")


def test_the_demo_config_applies_on_its_own_two_cpus():
    """apply runs the model and the labelling pools at once: their actors and one read task must
    fit the demo's local_num_cpus, as `session.check_schedulable` asks."""
    from ray_jobs.apply import with_apply_pools
    demo = load_config(Path(__file__).resolve().parent.parent / "configs" / "demo.yaml", [])
    cfg = with_apply_pools(demo)
    pools = cfg.extract.model.num_actors * cfg.extract.model.cpus_per_actor + cfg.label.workers.num_actors * cfg.label.workers.cpus_per_actor
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
