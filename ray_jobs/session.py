"""Connecting to Ray: a cluster when an address is given (ray job submit sets RAY_ADDRESS),
otherwise a new local one with the dashboard bound to loopback."""

import logging
import os
from pathlib import Path

import ray
from ray.data import DataContext

from configs.schema import RunConfig

log = logging.getLogger(__name__)


def ray_init_kwargs(cfg: RunConfig) -> dict:
    """The arguments `init_ray` passes to `ray.init`.

    With `ray.address` or RAY_ADDRESS (set by `ray job submit` for the job's driver) it joins that
    cluster and starts nothing; the cluster's runtime_env (working_dir) reaches the workers.
    Otherwise it starts a new local cluster: address="local" so that a cluster some other
    `ray start` left recorded on this machine is never joined by accident, the dashboard (if one
    is ever enabled) bound to 127.0.0.1 only, and the checkout on the workers' PYTHONPATH.
    """
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS")
    if address:
        return {"address": address, "log_to_driver": True}
    repo_root = str(Path(__file__).resolve().parent.parent)
    return {"address": "local", "num_cpus": cfg.ray.local_num_cpus, "dashboard_host": "127.0.0.1",
            "include_dashboard": False, "runtime_env": {"env_vars": {"PYTHONPATH": repo_root}}}


def init_ray(cfg: RunConfig) -> None:
    if not ray.is_initialized():
        kwargs = ray_init_kwargs(cfg)
        log.info("ray.init: %s", "joining the cluster at " + kwargs["address"] if kwargs["address"] != "local"
                 else "starting a local cluster")
        ray.init(**kwargs)
    ctx = DataContext.get_current()
    ctx.enable_progress_bars = True
    # Ray Data reserves a share of the cluster for each operator. With the stages' three or four
    # steps of fractional CPUs that share caps each CPU step at one task on a small node, and the
    # extract stream ran at 9 images/s against 21 without it (bench_pipeline.py, 2 cores, 3 ms per
    # window); the object-store backpressure still bounds what is in flight between the steps.
    ctx.op_resource_reservation_enabled = False
    # Our actors catch per-image errors themselves; any block error left is a bug and must stop the job.
    ctx.max_errored_blocks = 0
