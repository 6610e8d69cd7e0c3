"""Resource pools: the devices a set of worker groups runs on, reserved as Ray placement groups.

A pool holds `process_on_nodes[i]` device slots on node i (a GPU each, or one CPU each on CPU-only
runs), one placement-group bundle per slot, packed on its node. Worker groups that share a pool
place their rank-r process in bundle r, each taking `1 / max_colocate_count` of the slot — so the
actor/rollout/reference process and the critic process of one device sit side by side.

On a cluster of several nodes each node's placement group is aimed at a different node (the
driver's first), so `trainer.nnodes=2` really spans two nodes; `node_ids` records where each one
landed. Every reservation is checked against what the cluster has before anything is requested, and the
wait for the placement groups is bounded: a layout that cannot fit is an `InsufficientResources`
error at start, never a hang.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Dict, List

from deepretrieval.controller.ray_utils import InsufficientResources, cluster_devices

logger = logging.getLogger(__name__)


@dataclass
class ResourcePool:
    process_on_nodes: List[int]
    use_gpu: bool = False
    max_colocate_count: int = 1
    name_prefix: str = "deepretrieval"
    cpus_per_slot: float = 1.0
    pgs: List[Any] = field(default_factory=list)
    node_ids: List[str] = field(default_factory=list)

    @property
    def world_size(self) -> int:
        return sum(self.process_on_nodes)

    @property
    def device_name(self) -> str:
        return "GPU" if self.use_gpu else "CPU"

    def check_fits(self) -> None:
        """Raise InsufficientResources when the cluster cannot hold this pool (no waiting)."""
        have = sorted(cluster_devices(self.use_gpu), reverse=True)
        want = sorted(self.process_on_nodes, reverse=True)
        unit = self.cpus_per_slot if not self.use_gpu else 1.0
        what = "GPUs" if self.use_gpu else "CPUs"
        if len(have) < len(want):
            raise InsufficientResources(
                f"{len(want)} nodes requested (trainer.nnodes) but the Ray cluster has {len(have)} alive node(s)")
        for i, (w, h) in enumerate(zip(want, have)):
            if w * unit > h:
                raise InsufficientResources(
                    f"{w} {what} requested on a node (trainer.n_gpus_per_node={w}) but the largest free node "
                    f"#{i} has {h:g}; lower trainer.n_gpus_per_node"
                    + (" or use trainer.device=cpu" if self.use_gpu else " or raise trainer.ray_init.num_cpus"))

    def create(self, timeout_s: float) -> None:
        """Reserve the placement groups; waits at most `timeout_s` for them to be ready."""
        import ray
        from ray.util.placement_group import placement_group, remove_placement_group

        if self.pgs:
            return
        self.check_fits()
        bundle: Dict[str, float] = {"CPU": self.cpus_per_slot}
        if self.use_gpu:
            bundle["GPU"] = 1.0
        targets = target_nodes(self.process_on_nodes, self.use_gpu, self.cpus_per_slot)
        for node, count in enumerate(self.process_on_nodes):
            pg = placement_group([dict(bundle) for _ in range(count)], strategy="STRICT_PACK",
                                 name=f"{self.name_prefix}_pg{node}", _soft_target_node_id=targets[node])
            self.pgs.append(pg)
        ready = ray.wait([pg.ready() for pg in self.pgs], num_returns=len(self.pgs), timeout=timeout_s)[0]
        if len(ready) < len(self.pgs):
            for pg in self.pgs:
                remove_placement_group(pg)
            self.pgs = []
            raise InsufficientResources(
                f"could not reserve {self.world_size} {self.device_name} slot(s) within {timeout_s:.0f} s: "
                "the resources exist but are held by other Ray tasks or actors")
        self.node_ids = [_pg_node(pg) for pg in self.pgs]
        if len(self.pgs) > 1 and len(set(self.node_ids)) < len(self.pgs):
            logger.warning("placement groups share a node (%s): the cluster had no free node for each",
                           [n[:12] for n in self.node_ids])

    def slots(self) -> List[tuple]:
        """(placement group, bundle index) for each global rank, node by node."""
        if not self.pgs:
            raise RuntimeError("resource pool not created")
        return [(pg, i) for pg, count in zip(self.pgs, self.process_on_nodes) for i in range(count)]

    def remove(self) -> None:
        if not self.pgs:
            return
        from ray.util.placement_group import remove_placement_group

        for pg in self.pgs:
            try:
                remove_placement_group(pg)
            except Exception:  # Ray already shut down
                pass
        self.pgs = []
        self.node_ids = []


def _pg_node(pg: Any) -> str:
    from ray.util.placement_group import placement_group_table

    nodes = placement_group_table(pg).get("bundles_to_node_id", {})
    return str(next(iter(nodes.values()), ""))


def target_nodes(process_on_nodes: List[int], use_gpu: bool, cpus_per_slot: float = 1.0) -> List[Any]:
    """For each requested node, a distinct alive Ray node id that can hold it (the driver's own node
    first, then the others by capacity), or None where no distinct node is left (Ray then places
    the group wherever it fits). Used as a soft target: Ray falls back if the node fills up."""
    import ray

    key = "GPU" if use_gpu else "CPU"
    unit = 1.0 if use_gpu else cpus_per_slot
    try:
        here = ray.get_runtime_context().get_node_id()
    except Exception:
        here = None
    nodes = [(n["NodeID"], float(n.get("Resources", {}).get(key, 0.0))) for n in ray.nodes() if n.get("Alive")]
    nodes.sort(key=lambda n: (n[0] != here, -n[1]))
    free = list(nodes)
    out: List[Any] = []
    for count in process_on_nodes:
        pick = next((n for n in free if n[1] >= count * unit), None)
        if pick is not None:
            free.remove(pick)
        out.append(pick[0] if pick else None)
    return out
