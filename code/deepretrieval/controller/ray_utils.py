"""Starting, waiting on and stopping Ray — every wait bounded, every failure a readable error."""

from __future__ import annotations

import logging
import os
from typing import Any, Dict, List, Optional, Sequence

logger = logging.getLogger(__name__)


class ControllerError(RuntimeError):
    """Base class of orchestration errors."""


class InsufficientResources(ControllerError):
    """The cluster cannot hold the requested layout (raised at start, never a hang)."""


class WorkerTimeout(ControllerError):
    """A worker call or startup did not answer within its timeout."""


class WorkerFailed(ControllerError):
    """A worker raised or died; the message carries the worker's error."""


class WorkerDied(WorkerFailed):
    """A worker process is gone (killed, OOM, node lost): `rank`, `pid`, `node_id` say which one.
    The other ranks of its group may be blocked in a collective, so the group is unusable."""

    def __init__(self, message: str, rank: Optional[int] = None, pid: Optional[int] = None,
                 node_id: Optional[str] = None):
        super().__init__(message)
        self.rank, self.pid, self.node_id = rank, pid, node_id


# the address of a Ray instance this process starts itself (see init_ray)
LOCAL_NODE_IP = "127.0.0.1"

# environment the worker processes need regardless of the driver's shell
WORKER_ENV = {
    "TOKENIZERS_PARALLELISM": "false",
    "NCCL_DEBUG": os.environ.get("NCCL_DEBUG", "WARN"),
}


def init_ray(
    address: Optional[str] = None,
    num_cpus: Optional[int] = None,
    num_gpus: Optional[int] = None,
    env_vars: Optional[Dict[str, str]] = None,
    node_ip_address: Optional[str] = None,
) -> bool:
    """Start (or connect to) Ray unless it is already up; returns True when this call started it,
    so the caller knows to shut it down. Passes through the driver's offline / logging switches.

    `address` (trainer.ray_init.address), else the `RAY_ADDRESS` environment variable, names an
    existing cluster (`auto`, `host:port` or `ray://host:port`); the cluster's own resources apply
    then and `num_cpus` / `num_gpus` are ignored. Without either, a local Ray is started.
    `node_ip_address` (trainer.ray_init.node_ip_address) is this machine's address as the cluster
    sees it, for machines with several interfaces (Ray guesses otherwise)."""
    import ray

    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS") or None
    env = dict(WORKER_ENV)
    for key in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "WANDB_MODE", "HF_HOME", "PYTHONHASHSEED",
                "CUBLAS_WORKSPACE_CONFIG"):
        if key in os.environ:
            env[key] = os.environ[key]
    # workers import deepretrieval from the same place as the driver, installed or not
    package_parent = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    paths = [package_parent] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    env.update(env_vars or {})
    kwargs: Dict[str, Any] = dict(
        include_dashboard=False,
        ignore_reinit_error=True,
        runtime_env={"env_vars": env},
        logging_level=logging.WARNING,
        configure_logging=True,
    )
    if node_ip_address:
        kwargs["_node_ip_address"] = str(node_ip_address)
    if address:
        kwargs["address"] = address
        if num_cpus is not None or num_gpus is not None:
            logger.info("connecting to the Ray cluster at %s: its own resources apply (ray_init.num_cpus ignored)",
                        address)
    else:
        # A Ray instance started here is a one-machine cluster: keep its traffic on loopback. Bound to
        # the interface address (Ray's default) it can be unreachable in sandboxes and containers, and
        # the driver then waits on a GCS it cannot reach. Multi-node runs connect with `address`.
        kwargs["_node_ip_address"] = str(node_ip_address or LOCAL_NODE_IP)
        # "local": always a new instance, never a cluster that `ray start` left running on this machine
        # (ray.init would join it silently and then reject num_cpus)
        kwargs["address"] = "local"
        if num_cpus is not None:
            kwargs["num_cpus"] = int(num_cpus)
        if num_gpus is not None:
            kwargs["num_gpus"] = int(num_gpus)
    ray.init(**kwargs)
    return True


def shutdown_ray(started_here: bool) -> None:
    try:
        import ray
    except ImportError:
        return
    if started_here and ray.is_initialized():
        ray.shutdown()


def ray_get(refs: Any, timeout_s: float, what: str) -> Any:
    """`ray.get` with a deadline; timeouts and worker errors become ControllerErrors naming `what`."""
    import ray
    from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError

    try:
        return ray.get(refs, timeout=timeout_s)
    except GetTimeoutError:
        raise WorkerTimeout(f"{what}: no answer within {timeout_s:.0f} s (trainer.call_timeout_s / "
                            "trainer.ray_init.timeout_s)") from None
    except RayTaskError as exc:
        cause = exc.cause if getattr(exc, "cause", None) is not None else exc
        raise WorkerFailed(f"{what} failed in a worker: {type(cause).__name__}: {cause}") from cause
    except RayActorError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise WorkerDied(f"{what}: a worker process died ({first[:200]})") from None


def wait_all(refs: Sequence[Any], timeout_s: float, what: str) -> List[Any]:
    """The results of `refs` in order, failing as soon as any one of them fails (a dead worker is
    noticed while its peers are still blocked waiting for it in a collective, not after their
    timeout). Raises WorkerFailed with `.index` set to the failed ref's position, or WorkerTimeout."""
    import time

    import ray

    refs = list(refs)
    index = {ref: i for i, ref in enumerate(refs)}
    pending = list(refs)
    deadline = time.monotonic() + timeout_s
    while pending:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise WorkerTimeout(f"{what}: no answer within {timeout_s:.0f} s (trainer.call_timeout_s / "
                                "trainer.ray_init.timeout_s)")
        ready, pending = ray.wait(pending, num_returns=1, timeout=min(remaining, 5.0), fetch_local=False)
        for ref in ready:
            try:
                ray_get(ref, max(deadline - time.monotonic(), 1.0), what)
            except WorkerFailed as exc:
                exc.index = index[ref]  # type: ignore[attr-defined]
                raise
    return ray_get(refs, max(deadline - time.monotonic(), 1.0), what)


def kill_actors(actors: Sequence[Any]) -> None:
    import ray

    for actor in actors:
        try:
            ray.kill(actor, no_restart=True)
        except Exception:  # already dead
            pass


def cluster_devices(use_gpu: bool) -> List[float]:
    """Per alive node, the number of GPUs (use_gpu) or CPUs Ray may schedule."""
    import ray

    key = "GPU" if use_gpu else "CPU"
    return [float(n.get("Resources", {}).get(key, 0.0)) for n in ray.nodes() if n.get("Alive")]
