"""Worker groups: one worker process per device slot, called as one object.

`group.method(*args)` runs `method` on every worker, split and joined as the method's
`@register(Dispatch...)` says (see dispatch.py). Two implementations share that interface:

- `RayWorkerGroup`   one Ray actor per slot of a `ResourcePool`; torch.distributed is initialised in
                     the workers (gloo on CPU, NCCL on GPU) with rank 0's address; every call waits
                     at most `call_timeout_s`.
- `LocalWorkerGroup` the same worker class instantiated in this process (world size 1), for
                     debugging and for single-GPU machines without Ray.
"""

from __future__ import annotations

import datetime
import logging
import os
import socket
from typing import Any, Dict, List, Optional, Sequence

from deepretrieval.controller.dispatch import Dispatch, collect, dispatch_args, dispatch_mode_of, register
from deepretrieval.controller.ray_utils import WorkerDied, WorkerFailed, kill_actors, ray_get, wait_all
from deepretrieval.controller.resource_pool import ResourcePool

logger = logging.getLogger(__name__)

# after a rank raised: how long to wait for the others to show whether one of them died
DEATH_GRACE_S = 10.0


class Worker:
    """Base class of worker roles: knows its rank and sets up torch.distributed."""

    def __init__(self) -> None:
        self.rank = int(os.environ.get("RANK", 0))
        self.world_size = int(os.environ.get("WORLD_SIZE", 1))
        self.local_rank = int(os.environ.get("LOCAL_RANK", 0))
        self.device_type = os.environ.get("DR_DEVICE", "cpu")

    @property
    def device(self):
        import torch

        if self.device_type == "cuda":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    @register(Dispatch.ONE_TO_ALL)
    def init_distributed(self, timeout_s: float = 600.0) -> int:
        """Join the group's process group (no-op for a single worker); returns the rank."""
        import torch
        import torch.distributed as dist

        if self.device_type == "cuda":
            torch.cuda.set_device(self.local_rank if torch.cuda.device_count() > self.local_rank else 0)
        if self.world_size > 1 and not dist.is_initialized():
            backend = "nccl" if self.device_type == "cuda" else "gloo"
            if self.device_type == "cuda":
                backend = "cpu:gloo,cuda:nccl"  # gloo for CPU tensors (checkpoint metadata), NCCL for GPU
            dist.init_process_group(backend=backend, rank=self.rank, world_size=self.world_size,
                                    timeout=datetime.timedelta(seconds=timeout_s))
        return self.rank

    def ensure_process_group(self) -> None:
        """A single-process group, for code (FSDP2, DCP) that needs one even with one worker."""
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group(backend="gloo" if self.device_type != "cuda" else "cpu:gloo,cuda:nccl",
                                    store=dist.HashStore(), rank=0, world_size=1)

    @register(Dispatch.ONE_TO_ALL)
    def ping(self) -> Dict[str, Any]:
        return {"rank": self.rank, "world_size": self.world_size, "pid": os.getpid(), "device": self.device_type}


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return s.getsockname()[1]


class _WorkerHost:
    """The Ray actor holding one worker: sets the process environment, then builds the worker."""

    def __init__(self, worker_cls: type, env: Dict[str, str], args: Sequence[Any], kwargs: Dict[str, Any]):
        os.environ.update(env)
        import torch

        threads = int(env.get("DR_NUM_THREADS", "0"))
        if threads > 0:
            torch.set_num_threads(threads)
        self.worker = worker_cls(*args, **kwargs)

    @staticmethod
    def address() -> tuple:
        import ray

        return ray.util.get_node_ip_address(), free_port()

    @staticmethod
    def where() -> Dict[str, Any]:
        """This process: pid, Ray node id and node IP (for logs and fault reports)."""
        import ray

        return {"pid": os.getpid(), "node_id": ray.get_runtime_context().get_node_id(),
                "ip": ray.util.get_node_ip_address()}

    @staticmethod
    def set_master(addr: str, port: int) -> None:
        os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = addr, str(port)

    def call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return getattr(self.worker, method)(*args, **kwargs)


class _GroupBase:
    worker_cls: type
    world_size: int

    def _run(self, method: str, per_args: List[List[Any]], per_kwargs: List[Dict[str, Any]]) -> List[Any]:
        raise NotImplementedError  # implemented by RayWorkerGroup and LocalWorkerGroup

    def call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        mode = dispatch_mode_of(self.worker_cls, method)
        per_args, per_kwargs, pad_info = dispatch_args(mode, self.world_size, args, kwargs)
        outputs = self._run(method, per_args, per_kwargs)
        return collect(mode, outputs, pad_info)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_") or name in ("worker_cls", "world_size"):
            raise AttributeError(name)
        dispatch_mode_of(self.worker_cls, name)  # raises for unregistered names
        return lambda *args, **kwargs: self.call(name, *args, **kwargs)


class RayWorkerGroup(_GroupBase):
    """`resource_pool.world_size` Ray actors running `worker_cls(*args, **kwargs)`."""

    def __init__(
        self,
        resource_pool: ResourcePool,
        worker_cls: type,
        args: Sequence[Any] = (),
        kwargs: Optional[Dict[str, Any]] = None,
        name_prefix: str = "worker",
        start_timeout_s: float = 300.0,
        call_timeout_s: float = 3600.0,
        env: Optional[Dict[str, str]] = None,
        num_threads: int = 0,
    ):
        import ray
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        self.worker_cls = worker_cls
        self.world_size = resource_pool.world_size
        self.name_prefix = name_prefix
        self.call_timeout_s = call_timeout_s
        self.start_timeout_s = start_timeout_s
        self.actors: List[Any] = []
        # per rank: {"rank", "pid", "node_id", "ip"} of its process, known once the workers started
        self.worker_info: List[Dict[str, Any]] = []
        share = 1.0 / resource_pool.max_colocate_count
        host_cls = ray.remote(_WorkerHost)
        device = "cuda" if resource_pool.use_gpu else "cpu"
        master: Optional[tuple] = None
        try:
            slots = resource_pool.slots()
            local_ranks: Dict[int, int] = {}
            for rank, (pg, bundle) in enumerate(slots):
                node_key = id(pg)
                local_rank = local_ranks.get(node_key, 0)
                local_ranks[node_key] = local_rank + 1
                options: Dict[str, Any] = dict(
                    num_cpus=share * resource_pool.cpus_per_slot,
                    scheduling_strategy=PlacementGroupSchedulingStrategy(
                        placement_group=pg, placement_group_bundle_index=bundle),
                    name=None,
                    max_concurrency=1,
                )
                if resource_pool.use_gpu:
                    options["num_gpus"] = share
                worker_env = {
                    "RANK": str(rank), "WORLD_SIZE": str(self.world_size),
                    # Ray shows each GPU actor only its own device, so the local index is 0
                    "LOCAL_RANK": "0" if resource_pool.use_gpu else str(local_rank),
                    "DR_DEVICE": device, "DR_NUM_THREADS": str(num_threads),
                }
                if master is not None:
                    worker_env["MASTER_ADDR"], worker_env["MASTER_PORT"] = master[0], str(master[1])
                worker_env.update(env or {})
                actor = host_cls.options(**options).remote(worker_cls, worker_env, list(args), dict(kwargs or {}))
                self.actors.append(actor)
                if rank == 0:
                    # rank 0 picks the rendezvous address on its own node; others are told it
                    master = ray_get(actor.address.remote(), start_timeout_s, f"starting {name_prefix} rank 0")
                    ray_get(actor.set_master.remote(*master), start_timeout_s, f"starting {name_prefix}")
            ray_get([a.call.remote("ping") for a in self.actors], start_timeout_s, f"starting {name_prefix} workers")
            where = ray_get([a.where.remote() for a in self.actors], start_timeout_s, f"starting {name_prefix} workers")
            self.worker_info = [dict(w, rank=r) for r, w in enumerate(where)]
            for w in self.worker_info:
                logger.info("%s rank %d: pid %d on node %s (%s)", name_prefix, w["rank"], w["pid"], w["node_id"][:12],
                            w["ip"])
            # the process group's own timeout bounds every later collective, so it gets the call
            # timeout; the rendezvous itself is bounded by the driver's start timeout (_run)
            self.call("init_distributed", timeout_s=max(start_timeout_s, call_timeout_s))
        except BaseException:
            self.shutdown()
            raise

    def describe(self, rank: int) -> str:
        """`rank 1 (pid 4242 on node 3f9a..., 10.0.0.2)`, as far as known."""
        if rank < len(self.worker_info):
            w = self.worker_info[rank]
            return f"rank {rank} (pid {w['pid']} on node {w['node_id'][:12]}, {w['ip']})"
        return f"rank {rank}"

    def _run(self, method: str, per_args: List[List[Any]], per_kwargs: List[Dict[str, Any]]) -> List[Any]:
        timeout = self.start_timeout_s if method == "init_distributed" else self.call_timeout_s
        if not self.actors:
            raise WorkerFailed(f"{self.name_prefix}.{method}: the worker group was shut down after an earlier failure")
        what = f"{self.name_prefix}.{method}"
        refs = [a.call.remote(method, *per_args[r], **per_kwargs[r]) for r, a in enumerate(self.actors)]
        try:
            return wait_all(refs, timeout, what)
        except WorkerFailed as exc:
            rank = getattr(exc, "index", None)
            if not isinstance(exc, WorkerDied):
                # a rank raised; when a peer died, the survivors' collectives fail first ("connection
                # reset by peer"), so look for a dead rank before blaming the exception
                rank = self._dead_rank(refs, DEATH_GRACE_S)
                if rank is None:
                    raise  # the worker raised: its process lives on
            # a dead process: its peers may be blocked in a collective waiting for it, so the
            # whole group goes; the error names the rank, pid and node
            info = self.worker_info[rank] if rank is not None and rank < len(self.worker_info) else {}
            self.shutdown()
            who = self.describe(rank) if rank is not None else "a worker"
            raise WorkerDied(f"{what}: {who} died", rank=rank, pid=info.get("pid"),
                             node_id=info.get("node_id")) from None
        except BaseException:
            # a timeout or Ctrl-C leaves the other ranks inside a collective: they cannot be reused
            self.shutdown()
            raise

    @staticmethod
    def _dead_rank(refs: List[Any], grace_s: float) -> Optional[int]:
        """The rank whose call ended because its process died, waiting at most `grace_s` for the
        calls still running to end; None when every ended call ended some other way."""
        import time

        import ray
        from ray.exceptions import RayActorError

        deadline = time.monotonic() + grace_s
        pending = list(range(len(refs)))
        while pending:
            remaining = deadline - time.monotonic()
            ready, _ = ray.wait([refs[i] for i in pending], num_returns=len(pending),
                                timeout=max(0.0, min(1.0, remaining)), fetch_local=False)
            for i in [i for i in pending if refs[i] in ready]:
                pending.remove(i)
                try:
                    ray.get(refs[i], timeout=5)
                except RayActorError:
                    return i
                except Exception:
                    pass
            if remaining <= 0:
                return None
        return None

    def shutdown(self) -> None:
        kill_actors(self.actors)
        self.actors = []


class LocalWorkerGroup(_GroupBase):
    """The worker in this process (rank 0 of 1) behind the worker-group interface."""

    def __init__(self, worker_cls: type, args: Sequence[Any] = (), kwargs: Optional[Dict[str, Any]] = None,
                 device: str = "cpu", name_prefix: str = "worker"):
        for key, value in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "DR_DEVICE": device}.items():
            os.environ[key] = value
        self.worker_cls = worker_cls
        self.world_size = 1
        self.name_prefix = name_prefix
        self.worker = worker_cls(*args, **dict(kwargs or {}))
        self.call("init_distributed")

    def _run(self, method: str, per_args: List[List[Any]], per_kwargs: List[Dict[str, Any]]) -> List[Any]:
        return [getattr(self.worker, method)(*per_args[0], **per_kwargs[0])]

    def shutdown(self) -> None:
        self.worker = None
