"""Joining a Ray cluster and sizing actor pools (shared by Ray scoring and annotation).

Ray is optional (``pip install 'mmprm-infer[ray]'``); everything here imports
it lazily and says how to install it when it is missing.
"""

from __future__ import annotations

import logging
import os
import socket
from dataclasses import dataclass
from typing import Any

__all__ = ["ACTOR_MAX_RESTARTS", "CONNECT_TIMEOUT_S", "RayConnectError", "require_ray", "connect", "check_reachable",
           "ActorPlan", "plan_actors", "data_context", "map_to_actors"]

logger = logging.getLogger(__name__)

# Ray Data restarts a dead actor forever by default: one whose model load kills it (out of memory)
# would hang the job; a few restarts cover a lost node, then the job fails with the cause.
ACTOR_MAX_RESTARTS = 3


def require_ray():
    try:
        import ray  # ray: optional (the ray extra)
    except ImportError:
        raise SystemExit("mmprm: --ray needs Ray; install it with: pip install 'mmprm-infer[ray]'") from None
    return ray


# Seconds to wait for a TCP connection to the cluster's address before Ray is asked to join it: ray.init
# retries an address where nothing listens for minutes, silently.
CONNECT_TIMEOUT_S = 10.0


class RayConnectError(RuntimeError):
    """No Ray cluster answers at the address given (--ray ADDRESS or $RAY_ADDRESS)."""


def check_reachable(address: str, timeout_s: float = CONNECT_TIMEOUT_S, what: str = "--ray") -> None:
    """RayConnectError, naming the address and the fix, unless a TCP connection to its host:port (``host:6379``,
    ``ray://host:10001``) opens within ``timeout_s``; an address of another form is left to Ray."""
    target = address[len("ray://"):] if address.startswith("ray://") else address
    host, sep, port = target.rpartition(":")
    if not sep or not port.isdigit() or "/" in target:
        return
    host = host.strip("[]") or "127.0.0.1"
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except OSError as exc:
        why = "no answer" if isinstance(exc, socket.timeout) else exc.strerror or str(exc)
        raise RayConnectError(f"{what} {address}: no Ray cluster answers at {host}:{port} ({why} within "
                              f"{timeout_s:g} s); start one there (`ray start --head`), or give the address it "
                              "printed (HOST:6379, or ray://HOST:10001)") from None


def connect(address: str | None = "auto", *, num_cpus: int | None = None) -> Any:
    """Join the cluster at ``address`` (``"auto"``: $RAY_ADDRESS or a cluster
    already running on this machine, else start a local one with ``num_cpus``).  An explicit address
    where nothing answers is a RayConnectError within CONNECT_TIMEOUT_S, not a wait of minutes."""
    ray = require_ray()
    if ray.is_initialized():
        return ray
    quiet = dict(logging_level=logging.WARNING, log_to_driver=True)
    if address not in (None, "", "auto"):
        check_reachable(address)
        ray.init(address=address, **quiet)
    elif os.environ.get("RAY_ADDRESS"):
        check_reachable(os.environ["RAY_ADDRESS"], what="$RAY_ADDRESS")
        ray.init(**quiet)
    else:
        try:
            ray.init(address="auto", **quiet)
        except (ConnectionError, RuntimeError):
            ray.init(num_cpus=num_cpus, include_dashboard=False, **quiet)
    resources = ray.cluster_resources()
    logger.info("Ray cluster: %s CPUs, %s GPUs, %d node(s)", resources.get("CPU", 0), resources.get("GPU", 0),
                len([n for n in ray.nodes() if n.get("Alive")]))
    return ray


@dataclass
class ActorPlan:
    actors: int
    num_cpus: float
    num_gpus: float
    device: str  # where each actor puts its model
    max_restarts: int = ACTOR_MAX_RESTARTS

    def remote_args(self) -> dict[str, float]:
        return {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus, "max_restarts": self.max_restarts}


def plan_actors(actors: int | None = None, actor_cpus: float = 1, actor_gpus: float = 1.0,
                device: str = "cpu", max_restarts: int = ACTOR_MAX_RESTARTS) -> ActorPlan:
    """One actor per ``actor_gpus`` GPUs when the cluster has GPUs (and the
    caller did not pin ``device="cpu"`` explicitly with ``actor_gpus=0``),
    else ``actor_cpus``-CPU actors filling the cluster's CPUs."""
    ray = require_ray()
    if actors is not None and actors < 1:
        raise ValueError(f"--ray-actors must be >= 1, got {actors}")
    if actor_cpus <= 0:
        raise ValueError(f"CPUs per actor must be > 0, got {actor_cpus}")
    resources = ray.cluster_resources()
    gpus, cpus = resources.get("GPU", 0.0), resources.get("CPU", 1.0)
    if gpus > 0 and actor_gpus > 0:
        n = actors or max(1, int(gpus // actor_gpus))
        return ActorPlan(n, 1, actor_gpus, "cuda" if device == "cpu" else device, max_restarts)
    n = actors or max(1, int(cpus // actor_cpus))
    return ActorPlan(n, actor_cpus, 0, device, max_restarts)


def data_context(ray, preserve_order: bool):
    """Ray Data settings for our jobs: our own progress bar instead of Ray Data's."""
    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = preserve_order
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    return ctx


def map_to_actors(ds, actor_cls, plan: ActorPlan, constructor_kwargs: dict):
    """``ds`` through a pool of ``plan.actors`` actors of ``actor_cls``, one row per call
    (Ray Data restarts an actor that dies and retries its row)."""
    from ray.data import ActorPoolStrategy  # ray: optional (the ray extra)

    return ds.map_batches(actor_cls, batch_size=1, compute=ActorPoolStrategy(size=plan.actors),
                          fn_constructor_kwargs=constructor_kwargs, **plan.remote_args())
