"""Connecting to Ray: a cluster when an address is given (ray job submit sets RAY_ADDRESS),
otherwise a local one with the dashboard bound to loopback."""

import os
from pathlib import Path

import ray
from ray.data import DataContext

from configs.schema import RunConfig


def init_ray(cfg: RunConfig) -> None:
    if not ray.is_initialized():
        address = cfg.ray.address or os.environ.get("RAY_ADDRESS")
        if address:
            ray.init(address=address, log_to_driver=True)
        else:
            # Local workers import this project's packages from the checkout, wherever the driver was started.
            repo_root = str(Path(__file__).resolve().parent.parent)
            ray.init(num_cpus=cfg.ray.local_num_cpus, dashboard_host="127.0.0.1", include_dashboard=False,
                     runtime_env={"env_vars": {"PYTHONPATH": repo_root}})
    ctx = DataContext.get_current()
    ctx.enable_progress_bars = True
    # Our actors catch per-image errors themselves; any block error left is a bug and must stop the job.
    ctx.max_errored_blocks = 0
