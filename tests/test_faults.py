"""Worker faults: the model actor is SIGKILLed in the middle of the extract stage and a labelling
actor in the middle of the label stage. Ray Data restarts the actor and runs its task again;
per-image parts under deterministic names, atomic renames and shard markers must leave every
image exactly once."""

import json
import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
from ray._private.state import actors as actor_table

from core.classes import IGNORE
from ray_jobs.pipeline import Pipeline
from storage.images import read_train_ids
from storage.synth import generate_demo_dataset
from tests.tiny_runs import NUM_IMAGES, PATCHES_PER_IMAGE, feature_ids, scored_ids, tiny_config


class ActorKiller(threading.Thread):
    """For each (stage dir, UDF class, first output of the UDF): wait until the UDF is under way (its
    first output is written), then SIGKILL the process of one live actor of that class in this test's
    own cluster."""

    def __init__(self, plan: list[tuple[Path, str]], timeout: float = 120):
        super().__init__(daemon=True)
        self.plan, self.timeout = plan, timeout
        self.kills: list[dict] = []
        self.error: str | None = None

    def run(self):
        try:
            for stage_dir, udf, first_output in self.plan:
                self._kill_one(stage_dir, udf, first_output)
        except Exception as err:  # reported by the test
            self.error = repr(err)

    def _kill_one(self, stage_dir: Path, udf: str, first_output: str):
        deadline = time.monotonic() + self.timeout
        done = stage_dir / "_done"
        while not any(stage_dir.parent.glob(first_output)):
            if time.monotonic() > deadline:
                raise TimeoutError(f"no {first_output} in {stage_dir.parent}")
            time.sleep(0.02)
        live = [
            a
            for a in actor_table().values()
            if a["State"] == "ALIVE" and a["ActorClassName"].endswith(f"({udf}))") and a["Pid"]
        ]
        if not live:
            raise RuntimeError(f"no live {udf} actor once the stage was under way")
        victim = live[0]
        markers_before = len(list(done.glob("shard-*.json")))
        os.kill(victim["Pid"], signal.SIGKILL)
        self.kills.append(
            {"udf": udf, "actor_id": victim["ActorID"], "pid": victim["Pid"], "markers_before": markers_before}
        )


def test_killed_actors_are_restarted_and_every_image_is_done_exactly_once(ray_cluster, tmp_path):
    root = tmp_path / "data"
    generate_demo_dataset(root, split="val", num_images=NUM_IMAGES, height=128, width=256, seed=0)
    # One image per shard and two actors: many small tasks, so the kill lands while work is left.
    cfg = tiny_config(
        root,
        tmp_path / "out",
        images_per_shard=1,
        num_actors=2,
        extract={"model": {"num_actors": 2, "cpus_per_actor": 0.5, "batch_images": 1}},
    )
    # extract: the first image's part; label: the first pseudo-label the labelling actors write (the
    # score step behind them writes the parts)
    killer = ActorKiller(
        [
            (cfg.output_dir / "features", "WindowFeatures", "features/_parts/*/*.npz"),
            (cfg.output_dir / "scores", "LabelImages", "labels/labelIds/*/*.png"),
        ]
    )
    killer.start()
    Pipeline(cfg).run()
    killer.join(timeout=10)

    assert killer.error is None, killer.error
    assert [k["udf"] for k in killer.kills] == ["WindowFeatures", "LabelImages"]
    for kill in killer.kills:
        assert kill["markers_before"] < NUM_IMAGES, f"{kill['udf']}: the stage had finished before the kill"
        after = actor_table()[kill["actor_id"]]
        assert after["NumRestarts"] >= 1, f"{kill['udf']} actor {kill['actor_id']} was not restarted"

    # extract: every image's patch rows once, nothing lost, nothing twice
    assert feature_ids(cfg.output_dir) == {i: PATCHES_PER_IMAGE for i in feature_ids(cfg.output_dir)}
    assert len(feature_ids(cfg.output_dir)) == NUM_IMAGES
    assert len(list((cfg.output_dir / "features").glob("shard-*.parquet"))) == NUM_IMAGES
    # label: scored once per image, one label map per image and kind
    ids = scored_ids(cfg.output_dir)
    assert len(ids) == NUM_IMAGES and set(ids) == set(feature_ids(cfg.output_dir))
    for kind in ("labelIds", "trainIds", "instanceIds"):
        written = sorted(p.name for p in cfg.output_dir.glob(f"labels/{kind}/*/*_{kind}.png"))
        assert len(written) == NUM_IMAGES, kind
    panoptic = json.loads((cfg.output_dir / "labels/panoptic/cityscapes_panoptic_val.json").read_text())
    assert sorted(a["image_id"] for a in panoptic["annotations"]) == sorted(ids)

    report = json.loads((cfg.output_dir / "report.json").read_text())
    assert report["dataset"]["num_images"] == NUM_IMAGES and report["dataset"]["num_failed"] == 0
    # the summed confusion counts each labelled ground-truth pixel once
    valid = sum(int((read_train_ids(p, (128, 256)) != IGNORE).sum()) for p in root.glob("gtFine/val/*/*_labelIds.png"))
    confusion = sum(
        np.load(p)["official/confusion/variant/plain"].sum() for p in (cfg.output_dir / "scores").glob("shard-*.npz")
    )
    assert confusion == valid
