"""Determinism: the same config and seed give byte-identical features and centroids and identical
report metrics whatever the scheduling: one actor with 4 images per shard vs two actors with 5 per
shard. (tests/test_resume.py compares two runs of one config, one of them interrupted.)"""

import math

import numpy as np
import pyarrow.parquet as pq
import pytest

from ray_jobs.pipeline import Pipeline
from tests.tiny_runs import NUM_IMAGES, centroid_bytes, feature_ids, report_metrics, tiny_config


@pytest.fixture(scope="module")
def runs(ray_cluster, tiny_run, demo_root, tmp_path_factory):
    """The session's tiny run (one actor, 4 images per shard) and the same config on two actors, 5 per shard."""
    assert tiny_run.dataset.images_per_shard == 4 and tiny_run.extract.model.num_actors == 1
    two = tiny_config(
        demo_root, tmp_path_factory.mktemp("determinism") / "two_actors", images_per_shard=5, num_actors=2
    )
    Pipeline(two).run()
    return tiny_run.output_dir, two.output_dir


def _sorted_features(output_dir):
    return pq.read_table(output_dir / "features").sort_by(
        [("image_id", "ascending"), ("row", "ascending"), ("col", "ascending")]
    )


def _differences(a, b, path="", rel=0.0):
    """Paths where two JSON-like trees differ (floats within `rel` relative tolerance count as equal)."""
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for k in a.keys() | b.keys() for d in _differences(a.get(k), b.get(k), f"{path}.{k}", rel)]
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in _differences(x, y, f"{path}[{i}]", rel)]
    if isinstance(a, float) and isinstance(b, float) and math.isclose(a, b, rel_tol=rel, abs_tol=0.0):
        return []
    return [] if a == b else [f"{path}: {a!r} != {b!r}"]


def test_features_centroids_and_mappings_are_identical(runs):
    one, two = runs
    assert len(list((one / "features").glob("shard-*.parquet"))) == 3
    assert len(list((two / "features").glob("shard-*.parquet"))) == 3  # 5 + 5 + 2 images
    assert feature_ids(one) == feature_ids(two) and len(feature_ids(one)) == NUM_IMAGES
    assert _sorted_features(one).equals(_sorted_features(two))  # bit for bit
    hashes = centroid_bytes(one)
    assert set(hashes) == {"k16", "k8", "baseline_k19"}
    assert hashes == centroid_bytes(two)
    for name in hashes:
        assert np.array_equal(
            np.load(one / "fits" / name / "mapping.npy"), np.load(two / "fits" / name / "mapping.npy")
        )


def test_report_metrics_are_identical_up_to_float_summation_order(runs):
    """Every count-based metric (mIoU, accuracy, per-class IoU, PQ counts) is exactly equal; the
    panoptic IoU sums are float sums over the shards and may differ in the last bit."""
    one, two = runs
    assert _differences(report_metrics(one), report_metrics(two), rel=1e-12) == []
    a, b = report_metrics(one), report_metrics(two)
    assert a["fits"] == b["fits"]
    assert [v["semantic"] for v in a["variants"].values()] == [v["semantic"] for v in b["variants"].values()]


def test_report_metrics_are_bit_identical(runs):
    one, two = runs
    assert _differences(report_metrics(one), report_metrics(two)) == []
