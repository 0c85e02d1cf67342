"""Connecting to Ray: a cluster when an address is given (ray job submit sets RAY_ADDRESS),
otherwise a new local one with the dashboard bound to loopback."""

import logging
import os
from pathlib import Path

import ray
from ray.data import DataContext

from configs.schema import RayConfig, RunConfig, TaskConfig, WorkersConfig
from core.errors import UserError

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
    num_cpus = cfg.ray.local_num_cpus or os.cpu_count() or 1
    return {
        "address": "local",
        "num_cpus": cfg.ray.local_num_cpus,
        "_system_config": {"num_workers_soft_limit": 4 * num_cpus},
        "dashboard_host": "127.0.0.1",
        "include_dashboard": False,
        "runtime_env": {"env_vars": {"PYTHONPATH": repo_root}},
    }


def init_ray(cfg: RunConfig) -> None:
    if not ray.is_initialized():
        kwargs = ray_init_kwargs(cfg)
        log.info(
            "ray.init: %s",
            "joining the cluster at " + kwargs["address"]
            if kwargs["address"] != "local"
            else "starting a local cluster",
        )
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


class ClusterTooSmall(UserError):
    """A step asks for resources no node of the cluster has: it would wait forever."""


def check_schedulable(steps: dict[str, TaskConfig | WorkersConfig], ray_cfg: RayConfig) -> None:
    """Every step must fit on some node, each pool whole on the cluster, and the pools together
    must leave room for one task of each CPU step (the pools hold their CPUs for the stage)."""
    if not ray_cfg.check_resources:
        return
    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    cpus = [n.get("CPU", 0.0) for n in nodes]
    gpus = [n.get("GPU", 0.0) for n in nodes]
    total_cpu, total_gpu = sum(cpus), sum(gpus)
    have = (
        f"this cluster has {len(nodes)} node(s), {total_cpu:g} CPUs and {total_gpu:g} GPUs, the largest node "
        f"{max(cpus, default=0):g} CPUs"
    )
    pool_cpus = 0.0
    for name, step in steps.items():
        if isinstance(step, WorkersConfig):
            need_cpu, need_gpu = step.cpus_per_actor, step.gpus_per_actor
            if not any(c >= need_cpu and g >= need_gpu for c, g in zip(cpus, gpus)):
                raise ClusterTooSmall(
                    f"{name}: one actor needs {need_cpu:g} CPUs and {need_gpu:g} GPUs, but no node has them "
                    f"({have}): lower {name}.cpus_per_actor / {name}.gpus_per_actor"
                )
            if step.num_actors * need_cpu > total_cpu or step.num_actors * need_gpu > total_gpu:
                raise ClusterTooSmall(
                    f"{name}: {step.num_actors} actors x ({need_cpu:g} CPUs, {need_gpu:g} GPUs) do not fit "
                    f"({have}): lower {name}.num_actors"
                )
            pool_cpus += step.num_actors * need_cpu
        elif step.num_cpus > max(cpus, default=0):
            raise ClusterTooSmall(
                f"{name}: a task needs {step.num_cpus:g} CPUs but the largest node has "
                f"{max(cpus, default=0):g}: lower {name}.num_cpus"
            )
    task_cpus = max((s.num_cpus for s in steps.values() if isinstance(s, TaskConfig)), default=0.0)
    if pool_cpus + task_cpus > total_cpu:
        raise ClusterTooSmall(
            f"{', '.join(n for n, s in steps.items() if isinstance(s, WorkersConfig))}: the actor pools take "
            f"{pool_cpus:g} CPUs, leaving less than the {task_cpus:g} a task of the CPU steps needs ({have}): "
            "lower num_actors or cpus_per_actor"
        )
