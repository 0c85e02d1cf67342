"""A real `ray start --head` on loopback and a real `ray job submit` of the tiny demo job.

The head gets its own ports and temp dir, so it neither collides with nor is joined by another Ray
cluster on this machine. It runs with `--block` in its own process group, and the teardown ends
exactly that group: `ray stop` is not used, as it would stop every Ray cluster on the machine.
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from tests.tiny_runs import own_ray_cluster

OWN_RAY_CLUSTER = True  # starts a cluster of its own settings: runs after the shared-cluster modules

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
RAY = str(BIN / "ray")
NUM_IMAGES = 12


def _free_ports(n: int) -> list[int]:
    socks = []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}  # nothing inherited points elsewhere
    env.update(PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}", RAY_AUTH_MODE="token", PYTHONUNBUFFERED="1", **extra)
    return env


def _cli(*args, timeout=120) -> subprocess.CompletedProcess:
    return subprocess.run([RAY, *args], cwd=REPO, env=_env(), capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def head():
    """(dashboard address, temp dir) of a head node started for this module and always stopped."""
    own_ray_cluster()  # the tests' shared in-process cluster would hold memory beside this head
    temp_dir = Path(tempfile.mkdtemp(prefix="rayjob", dir="/tmp"))  # short: Ray's socket paths must stay < 108 chars
    gcs, dash, client, agent_listen, agent_grpc, env_agent, metrics, node_mgr, obj_mgr = _free_ports(9)
    log = open(temp_dir / "head.log", "w")
    proc = subprocess.Popen(
        [
            RAY,
            "start",
            "--head",
            "--block",
            "--node-ip-address=127.0.0.1",
            "--dashboard-host=127.0.0.1",
            f"--port={gcs}",
            f"--dashboard-port={dash}",
            f"--ray-client-server-port={client}",
            f"--dashboard-agent-listen-port={agent_listen}",
            f"--dashboard-agent-grpc-port={agent_grpc}",
            f"--runtime-env-agent-port={env_agent}",
            f"--metrics-export-port={metrics}",
            f"--node-manager-port={node_mgr}",
            f"--object-manager-port={obj_mgr}",
            "--num-cpus=2",
            "--disable-usage-stats",
            f"--temp-dir={temp_dir}",
        ],
        cwd=temp_dir,
        env=_env(),
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    address = f"http://127.0.0.1:{dash}"
    try:
        deadline = time.monotonic() + 90
        while True:
            if proc.poll() is not None:
                pytest.fail(
                    f"ray start --head exited with {proc.returncode}:\n{(temp_dir / 'head.log').read_text()[-3000:]}"
                )
            if _cli("job", "list", "--address", address, timeout=30).returncode == 0:
                break
            if time.monotonic() > deadline:
                pytest.fail(
                    f"the head's job API at {address} did not come up:\n{(temp_dir / 'head.log').read_text()[-3000:]}"
                )
            time.sleep(1)
        yield address, temp_dir, gcs
    finally:
        _stop_group(proc)
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)


def _stop_group(proc: subprocess.Popen) -> None:
    """SIGTERM to the head's process group (the processes this fixture started), SIGKILL to what is left."""
    for sig, wait in ((signal.SIGTERM, 5), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            continue
        deadline = time.monotonic() + wait  # the group outlives its leader for a moment
        while time.monotonic() < deadline:
            try:
                os.killpg(proc.pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.2)


def _listening_hosts(port: int) -> set[str]:
    """Local addresses of the TCP sockets listening on `port` (from /proc/net/tcp, tcp6)."""
    hosts = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        if not os.path.exists(table):
            continue
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            addr, hex_port = local.split(":")
            if state == "0A" and int(hex_port, 16) == port:  # 0A = LISTEN
                hosts.add(socket.inet_ntoa(bytes.fromhex(addr)[::-1]) if len(addr) == 8 else addr)
    return hosts


def test_the_dashboard_listens_on_loopback_only(head):
    address, _, _ = head
    port = int(address.rsplit(":", 1)[1])
    assert _listening_hosts(port) == {"127.0.0.1"}


def _tiny_config(tmp_path: Path) -> Path:
    config = {
        "run_name": "job-submit",
        "output_dir": str(tmp_path / "out"),
        "seed": 0,
        "dataset": {"kind": "cityscapes", "root": str(tmp_path / "data"), "split": "val", "images_per_shard": 6},
        "demo_set": {"num_images": NUM_IMAGES, "height": 128, "width": 256, "seed": 0},
        "model": {"vit": {"patch_size": 14, "embed_dim": 32, "depth": 1, "num_heads": 2}, "feature_kind": "backbone"},
        "inference": {"short_side": 112, "crop": 112, "stride": 56, "batch_size": 8},
        "extract": {
            "read": {"num_cpus": 0.25},
            "model": {"num_actors": 1, "cpus_per_actor": 0.5},
            "write": {"num_cpus": 0.25},
        },
        "label": {"num_overlays": 0, "read": {"num_cpus": 0.25}, "workers": {"num_actors": 1, "cpus_per_actor": 0.5}},
        "fit": {"k": 16, "k_sweep": [8], "n_iter": 5, "max_patches_per_image": 32},
        "ray": {"local_num_cpus": 2},
    }
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_ray_job_submit_runs_the_demo_job_on_the_cluster(head, tmp_path):
    address, temp_dir, gcs_port = head
    config = _tiny_config(tmp_path)
    job_id = f"overclust-test-{os.getpid()}"
    submitted = _cli(
        "job",
        "submit",
        "--address",
        address,
        "--submission-id",
        job_id,
        "--working-dir",
        ".",
        "--",
        "python",
        "submit.py",
        "run",
        "--config",
        str(config),
        "--set",
        "fit.n_iter=4",
        timeout=400,
    )
    logs = submitted.stdout + submitted.stderr
    status = _cli("job", "status", "--address", address, job_id)
    assert f"Job '{job_id}' succeeded" in status.stdout, f"job did not succeed:\n{status.stdout}\n{logs[-6000:]}"
    assert submitted.returncode == 0

    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["dataset"]["num_images"] == NUM_IMAGES and report["dataset"]["num_failed"] == 0
    assert set(report["fits"]) == {"k16", "k8", "baseline_k19"}
    assert 0.0 < report["fits"]["k16"]["pixel_level"]["same_set"]["miou"] < 1.0
    assert yaml.safe_load((tmp_path / "out" / "config.yaml").read_text())["fit"]["n_iter"] == 4  # --set reached the job

    # The driver joined this cluster (RAY_ADDRESS from `ray job submit`) instead of starting its own.
    assert "joining the cluster at" in logs and "starting a local cluster" not in logs
    assert f":{gcs_port}" in logs.split("joining the cluster at", 1)[1].splitlines()[0]
    sessions = list(temp_dir.glob("session_2*"))
    assert len(sessions) == 1, f"a second Ray session was started: {sessions}"

    # The uploaded working dir is the code only: .gitignore keeps .venv, data and outputs out.
    (package,) = [p for p in temp_dir.glob("session_2*/runtime_resources/working_dir_files/*") if p.is_dir()]
    assert (package / "submit.py").is_file() and (package / "ray_jobs" / "pipeline.py").is_file()
    for ignored in (".venv", "data", "outputs", ".pytest_cache"):
        assert not (package / ignored).exists(), f"{ignored} was uploaded with the working dir"
    size = sum(p.stat().st_size for p in package.rglob("*") if p.is_file())
    assert size < 10 * 2**20, f"the working dir upload is {size / 2**20:.1f} MiB"
