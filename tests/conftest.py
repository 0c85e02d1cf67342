"""Fixtures shared by the integration tests: the tiny demo set, one local Ray cluster kept between
modules, and one finished tiny run that the tests which only read it share."""

import pytest
import ray

from ray_jobs.pipeline import Pipeline
from ray_jobs.session import init_ray
from storage.synth import generate_demo_dataset
from tests.tiny_runs import NUM_IMAGES, tiny_config


@pytest.fixture(scope="session")
def demo_root(tmp_path_factory):
    """Read only: a test that damages images copies them first."""
    root = tmp_path_factory.mktemp("demo")
    generate_demo_dataset(root, split="val", num_images=NUM_IMAGES, height=128, width=256, seed=0)
    return root


def _start_shared_cluster(tmp_path_factory) -> None:
    if not ray.is_initialized():
        init_ray(tiny_config("unused", tmp_path_factory.mktemp("unused")))


@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory):
    """One local Ray cluster for every module that asks for it, kept between modules: a cluster's
    first Ray Data pass spends seconds importing in its fresh workers. A module that needs a cluster
    of other settings shuts this one down first (`tests.tiny_runs.own_ray_cluster`); the next
    module here starts it again."""
    _start_shared_cluster(tmp_path_factory)
    yield


@pytest.fixture(scope="session")
def tiny_run(demo_root, tmp_path_factory):
    """The config of one finished run of `tiny_config` on `demo_root`, made once for the session.
    Read only: a test that damages or reruns a run works on a copy (`tests.tiny_runs.copy_run`)."""
    _start_shared_cluster(tmp_path_factory)
    cfg = tiny_config(demo_root, tmp_path_factory.mktemp("tiny_run") / "out")
    Pipeline(cfg).run()
    return cfg


RAY_FIXTURES = {"ray_cluster", "tiny_run"}


def needs_ray(item) -> bool:
    """A test that runs on a Ray cluster: it asks for the shared one (or the shared tiny run), its module
    starts one of its own (`OWN_RAY_CLUSTER`), or it is marked `ray` itself (it starts one in its body)."""
    module = getattr(item, "module", None)
    return (
        bool(RAY_FIXTURES & set(getattr(item, "fixturenames", ())))
        or getattr(module, "OWN_RAY_CLUSTER", False)
        or item.get_closest_marker("ray") is not None
    )


def pytest_collection_modifyitems(items):
    """Every test on a Ray cluster is marked `ray`, so `pytest -m "not ray"` runs the rest (the
    Ray-free core) in seconds. The modules that start a cluster of their own (`OWN_RAY_CLUSTER =
    True`) run after the others, so the shared cluster starts once a session."""
    for item in items:
        if needs_ray(item):
            item.add_marker(pytest.mark.ray)
    items.sort(key=lambda item: getattr(getattr(item, "module", None), "OWN_RAY_CLUSTER", False))


@pytest.fixture(autouse=True)
def _unmarked_tests_start_no_cluster(request):
    """A test not marked `ray` must not start a cluster: it would run in the unit-only command."""
    started_before = ray.is_initialized()
    yield
    if not needs_ray(request.node) and not started_before and ray.is_initialized():
        ray.shutdown()
        pytest.fail("this test started a Ray cluster: mark it @pytest.mark.ray (or ask for the ray_cluster fixture)")


@pytest.fixture(scope="session", autouse=True)
def _no_cluster_left_behind():
    yield
    ray.shutdown()
