"""Resume: a run interrupted after extract, with a shard lost mid-extract and shards lost mid-label,
finishes with the same centroids (bytes) and report metrics as an uninterrupted run."""

import json

from ray_jobs.pipeline import Pipeline
from storage.run.markers import marker_path
from tests.tiny_runs import NUM_IMAGES, centroid_bytes, feature_ids, report_metrics, scored_ids, tiny_config


def _mtimes(stage_dir):
    return {p.name: p.stat().st_mtime_ns for p in (stage_dir / "_done").glob("shard-*.json")}


def _lose_shard(stage_dir, shard):
    """What a crash before the shard's marker leaves: no marker, no outputs, maybe a partial temp file."""
    marker_path(stage_dir, shard).unlink()
    outputs = [p for p in stage_dir.rglob(f"{shard}.*") if p.is_file()]
    assert outputs, f"no outputs of {shard} in {stage_dir}"
    for path in outputs:
        path.unlink()
    (stage_dir / f".{shard}.parquet.tmp-99999").write_bytes(b"PAR1 partial write")


def test_interrupted_run_resumes_to_the_same_result(ray_cluster, tiny_run, demo_root, tmp_path):
    reference = tiny_run  # uninterrupted, same config

    cfg = tiny_config(demo_root, tmp_path / "interrupted")
    features, scores = cfg.output_dir / "features", cfg.output_dir / "scores"
    Pipeline(cfg).run(("extract",))  # the job stops after extract
    assert not (cfg.output_dir / "fits").exists()
    _lose_shard(features, "shard-00001")
    kept = _mtimes(features)

    Pipeline(cfg).run(("extract", "fit", "label"))  # a new driver: redoes only the lost shard, then goes on
    redone = _mtimes(features)
    assert {k: v for k, v in redone.items() if k in kept} == kept and set(redone) - set(kept) == {"shard-00001.json"}
    assert len(feature_ids(cfg.output_dir)) == NUM_IMAGES

    # crash in the middle of label: shard 2's scores and marker lost, shard 0's marker lost after its outputs
    lost = ("shard-00000", "shard-00002")
    _lose_shard(scores, "shard-00002")
    marker_path(scores, "shard-00000").unlink()
    kept = _mtimes(scores)
    Pipeline(cfg).run()  # every stage again: extract and fit reuse what is there, label redoes two shards
    redone = _mtimes(scores)
    assert {k: v for k, v in redone.items() if k in kept} == kept
    assert set(redone) - set(kept) == {f"{s}.json" for s in lost}
    # what each stage did in this run, as timing.json and the report's wall-time line say it
    timing = json.loads((cfg.output_dir / "timing.json").read_text())
    assert (timing["extract"]["did_work"], timing["fit"]["did_work"]) == (False, False)
    assert (timing["label"]["did_work"], timing["label"]["shards_done"], timing["label"]["shards"]) == (True, 2, 3)
    wall = next(line for line in (cfg.output_dir / "report.md").read_text().splitlines() if "**Wall time**" in line)
    assert wall.startswith(
        "- **Wall time** (each stage's last run): extract skipped (done in an earlier run), "
        "fit skipped (done in an earlier run), label "
    )
    assert wall.endswith(" s (2 of 3 shards; the others done in an earlier run)")
    # entries not of that form (an older version's bare seconds, damaged ones) are left out, not shown as measured
    (cfg.output_dir / "timing.json").write_text(json.dumps({"extract": 3.5, "fit": 0.1}))
    assert Pipeline(cfg)._timing() == {}
    (cfg.output_dir / "timing.json").write_text(
        json.dumps({**timing, "fit": {"did_work": True}, "label": {"did_work": "yes", "seconds": 1}})
    )
    assert Pipeline(cfg)._timing() == {stage: t for stage, t in timing.items() if stage not in ("fit", "label")}

    assert sorted(scored_ids(cfg.output_dir)) == sorted(feature_ids(cfg.output_dir))  # each image scored once
    assert centroid_bytes(cfg.output_dir) == centroid_bytes(reference.output_dir)
    assert len(centroid_bytes(cfg.output_dir)) == 3
    assert report_metrics(cfg.output_dir) == report_metrics(reference.output_dir)
    assert report_metrics(cfg.output_dir)["dataset"]["num_images"] == NUM_IMAGES
