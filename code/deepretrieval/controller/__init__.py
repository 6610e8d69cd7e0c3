"""Single-controller orchestration: resource pools on Ray placement groups, worker groups (Ray or
in-process) and the dispatch of Batches over data-parallel workers."""

from deepretrieval.controller.dispatch import Dispatch, register
from deepretrieval.controller.ray_utils import (
    ControllerError,
    InsufficientResources,
    WorkerDied,
    WorkerFailed,
    WorkerTimeout,
    init_ray,
    shutdown_ray,
)
from deepretrieval.controller.resource_pool import ResourcePool
from deepretrieval.controller.worker_group import LocalWorkerGroup, RayWorkerGroup, Worker

__all__ = [
    "ControllerError", "Dispatch", "InsufficientResources", "LocalWorkerGroup", "RayWorkerGroup",
    "ResourcePool", "Worker", "WorkerDied", "WorkerFailed", "WorkerTimeout", "init_ray", "register",
    "shutdown_ray",
]
