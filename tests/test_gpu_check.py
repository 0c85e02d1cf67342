"""bench/gpu_check.sh, the GPU path's one-call check, at its --cpu-smoke size: the same steps on the CPU."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.ray  # its subprocess runs the stages on a local cluster of its own
def test_gpu_check_runs_extract_fit_and_apply_and_reports_each(tmp_path):
    out = tmp_path / "gpu_check.json"
    done = subprocess.run(
        [
            "bash",
            str(REPO / "bench" / "gpu_check.sh"),
            "--cpu-smoke",
            "--work",
            str(tmp_path / "work"),
            "--out",
            str(out),
        ],
        env={"PYTHON": sys.executable, "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    rows = {row["stage"]: row for row in report["results"]}
    assert report["cpu_smoke"] and report["images"] == 6
    for stage in ("extract", "fit", "apply"):
        assert rows[stage]["images_per_s"] > 0 and rows[stage]["cpu_seconds_per_image"] > 0
        assert rows[stage]["gpu_busy_fraction"] is None  # no GPU here: not measured, and said so
    assert rows["model alone"]["windows_per_image"] == 6 and rows["model alone"]["tflops"] > 0
    assert rows["assignment cuda vs cpu"] == {"stage": "assignment cuda vs cpu", "skipped": "no CUDA device"}
    assert len(list((tmp_path / "work" / "apply" / "labels").glob("trainIds/*/*.png"))) == 6
    # a used work folder is refused: a resumed run would skip the work it should time
    again = subprocess.run(
        ["bash", str(REPO / "bench" / "gpu_check.sh"), "--cpu-smoke", "--work", str(tmp_path / "work")],
        env={"PYTHON": sys.executable, "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
    )
    assert again.returncode == 2 and "is not empty" in again.stderr
