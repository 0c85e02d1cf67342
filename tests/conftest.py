"""Fixtures shared by the integration tests: the tiny demo set and one local Ray cluster per module."""

import pytest
import ray

from ray_jobs.session import init_ray
from storage.synth import generate_demo_dataset
from tests.tiny_runs import NUM_IMAGES, tiny_config


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    generate_demo_dataset(root, split="val", num_images=NUM_IMAGES, height=128, width=256, seed=0)
    return root


@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory):
    init_ray(tiny_config("unused", tmp_path_factory.mktemp("unused")))
    yield
    ray.shutdown()
