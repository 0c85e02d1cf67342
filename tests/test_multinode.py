"""A real multi-node Ray cluster on this machine (`ray.cluster_utils.Cluster`: a head and two worker
nodes, each a raylet with its own workers and object store). One worker node is stopped while
extract runs and the other while label runs: the job completes and every image is counted
exactly once (tasks and actors of a lost node run again on the others; their parts are rewritten
under the same names; the driver counts each image once)."""

import json
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import ray
from ray.cluster_utils import Cluster

from core.classes import IGNORE
from ray_jobs.pipeline import Pipeline
from storage.images import read_train_ids
from tests.tiny_runs import NUM_IMAGES, PATCHES_PER_IMAGE, feature_ids, own_ray_cluster, scored_ids, tiny_config

OWN_RAY_CLUSTER = True  # starts a cluster of its own settings: runs after the shared-cluster modules


@pytest.fixture(scope="module")
def three_nodes():
    own_ray_cluster()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    cluster.add_node(num_cpus=1)
    cluster.add_node(num_cpus=1)
    ray.init(address=cluster.address)
    cluster.wait_for_nodes()
    yield cluster
    ray.shutdown()
    cluster.shutdown()


class NodeStopper(threading.Thread):
    """For each stage dir: wait until the stage has finished its first shard, then stop a worker node."""

    def __init__(self, cluster: Cluster, stage_dirs: list[Path], timeout: float = 240):
        super().__init__(daemon=True)
        self.cluster, self.stage_dirs, self.timeout = cluster, stage_dirs, timeout
        self.stopped: list[dict] = []
        self.error: str | None = None

    def run(self):
        try:
            for stage_dir in self.stage_dirs:
                deadline = time.monotonic() + self.timeout
                while not any((stage_dir / "_done").glob("shard-*.json")):
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"no marker in {stage_dir}")
                    time.sleep(0.02)
                worker = next(n for n in self.cluster.list_all_nodes() if n is not self.cluster.head_node)
                markers = len(list((stage_dir / "_done").glob("shard-*.json")))
                self.cluster.remove_node(worker)
                self.stopped.append({"stage": stage_dir.name, "markers_before": markers})
        except Exception as err:  # reported by the test
            self.error = repr(err)


def test_stopping_a_node_in_extract_and_in_label_loses_and_repeats_nothing(three_nodes, demo_root, tmp_path):
    # One image per shard: many markers, so the node stops while most of the work is left. Every
    # step fits on one node once the other is gone: 2 x 0.4 CPU of actors + 0.1 per task.
    cfg = tiny_config(
        demo_root,
        tmp_path / "out",
        images_per_shard=1,
        extract={
            "read": {"num_cpus": 0.1},
            "model": {"num_actors": 2, "cpus_per_actor": 0.4, "batch_images": 1},
            "write": {"num_cpus": 0.1},
        },
        label={"read": {"num_cpus": 0.1}, "workers": {"num_actors": 2, "cpus_per_actor": 0.4}},
        ray={"address": three_nodes.address},
    )
    stopper = NodeStopper(three_nodes, [cfg.output_dir / "features", cfg.output_dir / "scores"])
    stopper.start()
    Pipeline(cfg).run()
    stopper.join(timeout=30)

    assert stopper.error is None, stopper.error
    assert [s["stage"] for s in stopper.stopped] == ["features", "scores"]
    assert all(s["markers_before"] < NUM_IMAGES for s in stopper.stopped), stopper.stopped  # stopped mid-stage

    assert feature_ids(cfg.output_dir) == {i: PATCHES_PER_IMAGE for i in feature_ids(cfg.output_dir)}
    assert len(feature_ids(cfg.output_dir)) == NUM_IMAGES
    ids = scored_ids(cfg.output_dir)
    assert len(ids) == NUM_IMAGES and set(ids) == set(feature_ids(cfg.output_dir))
    for kind in ("labelIds", "trainIds", "instanceIds"):
        assert len(list(cfg.output_dir.glob(f"labels/{kind}/*/*_{kind}.png"))) == NUM_IMAGES, kind
    report = json.loads((cfg.output_dir / "report.json").read_text())
    assert report["dataset"]["num_images"] == NUM_IMAGES and report["dataset"]["num_failed"] == 0
    valid = sum(
        int((read_train_ids(p, (128, 256)) != IGNORE).sum()) for p in demo_root.glob("gtFine/val/*/*_labelIds.png")
    )
    confusion = sum(
        np.load(p)["official/confusion/variant/plain"].sum() for p in (cfg.output_dir / "scores").glob("shard-*.npz")
    )
    assert confusion == valid  # every labelled pixel counted once
