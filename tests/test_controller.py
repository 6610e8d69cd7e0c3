"""Controller: dispatch arithmetic (no Ray), Ray worker groups with torch.distributed, clear errors."""

import sys

import numpy as np
import pytest
import torch

from deepretrieval.controller import (
    Dispatch,
    InsufficientResources,
    LocalWorkerGroup,
    ResourcePool,
    Worker,
    WorkerFailed,
    WorkerTimeout,
    register,
)
from deepretrieval.controller.dispatch import average_metrics, collect, dispatch_args
from deepretrieval.protocol import Batch


def make_batch(n):
    return Batch.from_dict({"x": torch.arange(n, dtype=torch.float32).unsqueeze(1)},
                           {"uid": np.array([f"p{i}" for i in range(n)], dtype=object)})


class EchoWorker(Worker):
    """Test worker: doubles x, optionally repeats rows, all-reduces a sum over ranks."""

    def __init__(self, scale: float = 2.0):
        super().__init__()
        self.scale = scale

    @register(Dispatch.DP_COMPUTE_PROTO)
    def double(self, batch: Batch, repeat: int = 1) -> Batch:
        out = batch.repeat(repeat) if repeat > 1 else batch
        x = out.batch["x"] * self.scale
        return Batch.from_dict({"y": x}, {"rank": np.array([self.rank] * len(out), dtype=object)})

    @register(Dispatch.DP_COMPUTE_PROTO)
    def local_sum(self, batch: Batch) -> dict:
        return {"n": float(len(batch)), "sum": float(batch.batch["x"].sum())}

    @register(Dispatch.RANK_ZERO)
    def allreduce(self, value: float) -> float:
        import torch.distributed as dist

        t = torch.tensor([value * (self.rank + 1)])
        if dist.is_initialized():
            dist.all_reduce(t)
        return float(t.item())

    @register(Dispatch.ONE_TO_ALL)
    def fail(self) -> None:
        raise ValueError(f"boom from rank {self.rank}")

    @register(Dispatch.ALL_TO_ALL)
    def sleep_then_allreduce(self, seconds: float) -> float:
        import time

        time.sleep(seconds)
        return self.allreduce(1.0)

    @register(Dispatch.ONE_TO_ALL)
    def sleep(self, seconds: float) -> None:
        import time

        time.sleep(seconds)


# --------------------------------------------------------------------------- dispatch (no Ray)

def test_dp_dispatch_pads_splits_and_unpads():
    batch = make_batch(5)
    per_args, per_kwargs, pad = dispatch_args(Dispatch.DP_COMPUTE_PROTO, 2, [batch], {"repeat": 3})
    assert pad == (1, 6)
    assert [len(a[0]) for a in per_args] == [3, 3]
    assert per_args[1][0].batch["x"].squeeze(1).tolist() == [3.0, 4.0, 0.0]  # padding copies row 0
    assert per_kwargs == [{"repeat": 3}, {"repeat": 3}]
    # each rank returns 3 rows per input row: the joined answer drops 1 padded row x 3 samples
    outs = [Batch.from_dict({"y": a[0].repeat(3).batch["x"]}) for a in per_args]
    joined = collect(Dispatch.DP_COMPUTE_PROTO, outs, pad)
    assert joined.batch["y"].squeeze(1).tolist() == [v for v in [0, 1, 2, 3, 4] for _ in range(3)]


def test_collect_tensors_metrics_and_rank_zero():
    outs = [torch.tensor([[1.0], [2.0]]), torch.tensor([[3.0], [9.0]])]
    assert collect(Dispatch.DP_COMPUTE_PROTO, outs, (1, 4)).squeeze(1).tolist() == [1.0, 2.0, 3.0]
    assert average_metrics([{"a": 1.0, "l": [1]}, {"a": 3.0, "l": [2]}]) == {"a": 2.0, "l": [1, 2]}
    peaks = average_metrics([{"perf/max_memory_rss_gb": 1.0, "x/min": 1.0}, {"perf/max_memory_rss_gb": 3.0, "x/min": 3.0}])
    assert peaks == {"perf/max_memory_rss_gb": 3.0, "x/min": 1.0}
    assert collect(Dispatch.RANK_ZERO, ["r0", "r1"]) == "r0"
    with pytest.raises(ValueError, match="length 2"):
        dispatch_args(Dispatch.ALL_TO_ALL, 2, [[1, 2, 3]], {})


def test_local_worker_group_in_process():
    group = LocalWorkerGroup(EchoWorker, kwargs={"scale": 3.0})
    out = group.double(make_batch(3), repeat=2)
    assert out.batch["y"].squeeze(1).tolist() == [0, 0, 3, 3, 6, 6]
    assert group.allreduce(2.0) == 2.0
    with pytest.raises(AttributeError, match="not registered"):
        group.call("__init__")
    with pytest.raises(ValueError, match="boom"):
        group.fail()


# --------------------------------------------------------------------------- Ray

@pytest.fixture(scope="module")
def ray_cluster():
    pytest.importorskip("ray")
    import ray.cloudpickle

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # test workers travel by value
    from deepretrieval.controller import init_ray, shutdown_ray

    started = init_ray(num_cpus=2)
    yield ray
    shutdown_ray(started)


def test_ray_group_dispatch_and_collectives(ray_cluster):
    from deepretrieval.controller import RayWorkerGroup

    pool = ResourcePool([2], use_gpu=False, name_prefix="t_dp")
    pool.create(timeout_s=60)
    group = RayWorkerGroup(pool, EchoWorker, kwargs={"scale": 2.0}, name_prefix="echo",
                           start_timeout_s=60, call_timeout_s=60)
    try:
        pings = group.ping()
        assert sorted(p["rank"] for p in pings) == [0, 1] and len({p["pid"] for p in pings}) == 2
        out = group.double(make_batch(5), repeat=2)
        assert out.batch["y"].squeeze(1).tolist() == [0, 0, 2, 2, 4, 4, 6, 6, 8, 8]
        assert list(out.non_tensor_batch["rank"]) == [0] * 6 + [1] * 4  # rows 0-2 on rank 0
        # gloo all-reduce across the two processes: 1.5*1 + 1.5*2
        assert group.allreduce(1.5) == pytest.approx(4.5)
        assert group.local_sum(make_batch(4)) == {"n": 2.0, "sum": 3.0}  # mean of (0+1, 2+3)
        with pytest.raises(WorkerFailed, match="boom from rank"):
            group.fail()
        group.call_timeout_s = 1
        with pytest.raises(WorkerTimeout, match="echo.sleep"):
            group.sleep(30)
        assert group.actors == []  # a timed-out group is torn down
    finally:
        group.shutdown()
        pool.remove()


def test_too_few_resources_is_a_clear_error(ray_cluster):
    with pytest.raises(InsufficientResources, match="2 GPUs requested"):
        ResourcePool([2], use_gpu=True).create(timeout_s=5)
    with pytest.raises(InsufficientResources, match="nodes requested"):
        ResourcePool([1, 1], use_gpu=False).create(timeout_s=5)
    with pytest.raises(InsufficientResources, match="8 CPUs requested"):
        ResourcePool([8], use_gpu=False).create(timeout_s=5)


def test_ctrl_c_during_a_call_tears_the_group_down(ray_cluster):
    import signal

    from deepretrieval.controller import RayWorkerGroup

    pool = ResourcePool([2], use_gpu=False, name_prefix="t_int")
    pool.create(timeout_s=60)
    group = RayWorkerGroup(pool, EchoWorker, name_prefix="echo", start_timeout_s=60, call_timeout_s=60)
    actors = list(group.actors)

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGALRM, interrupt)
    try:
        signal.alarm(2)
        with pytest.raises(KeyboardInterrupt):
            group.sleep(30)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
        pool.remove()
    assert group.actors == []
    for actor in actors:  # the worker processes are gone, not left sleeping
        with pytest.raises(ray_cluster.exceptions.RayActorError):
            ray_cluster.get(actor.call.remote("ping"), timeout=30)


def test_a_killed_worker_is_noticed_while_its_peer_waits_in_a_collective(ray_cluster):
    """Rank 0 enters an all-reduce at once, rank 1 sleeps first; rank 1 is SIGKILLed by pid. The
    call fails with WorkerDied naming rank 1, its pid and node within seconds (the call timeout is
    10 minutes), and the group (rank 0 blocked in the collective included) is torn down."""
    import os
    import signal
    import threading
    import time

    from deepretrieval.controller import RayWorkerGroup, WorkerDied

    pool = ResourcePool([2], use_gpu=False, name_prefix="t_kill")
    pool.create(timeout_s=60)
    group = RayWorkerGroup(pool, EchoWorker, name_prefix="echo", start_timeout_s=60, call_timeout_s=600)
    try:
        info = group.worker_info
        assert [w["rank"] for w in info] == [0, 1] and len({w["pid"] for w in info}) == 2
        assert all(w["node_id"] == pool.node_ids[0] for w in info)
        victim = info[1]["pid"]
        actors = list(group.actors)
        threading.Timer(2.0, os.kill, (victim, signal.SIGKILL)).start()
        start = time.monotonic()
        with pytest.raises(WorkerDied) as err:
            group.sleep_then_allreduce([0.0, 120.0])
        assert time.monotonic() - start < 60
        assert err.value.rank == 1 and err.value.pid == victim and err.value.node_id == info[1]["node_id"]
        assert f"rank 1 (pid {victim} on node {info[1]['node_id'][:12]}" in str(err.value)
        assert "echo.sleep_then_allreduce" in str(err.value)
        assert group.actors == []
        for actor in actors:  # rank 0 was not left blocked in the all-reduce
            with pytest.raises(ray_cluster.exceptions.RayActorError):
                ray_cluster.get(actor.call.remote("ping"), timeout=30)
        with pytest.raises(WorkerFailed, match="shut down after an earlier failure"):
            group.ping()
    finally:
        group.shutdown()
        pool.remove()
