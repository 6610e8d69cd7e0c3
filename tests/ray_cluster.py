"""A simulated multi-node Ray cluster on 127.0.0.1 for tests (`ray.cluster_utils.Cluster`)."""

import os
from contextlib import contextmanager


@contextmanager
def loopback_cluster(head_cpus, *extra_nodes):
    """A head with `head_cpus` CPUs plus one raylet per `extra_nodes` entry (keyword arguments of
    `Cluster.add_node`, e.g. {"num_cpus": 2}), all on 127.0.0.1; yields the Cluster, shuts it down.

    Ray resolves a loopback address to the machine's outward IP unless told this is a single-host
    cluster (its Windows/OSX switch), in this process (the constant) and in the raylets and workers
    it spawns (the environment variable)."""
    import ray
    from ray._private import ray_constants
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        ray.shutdown()
    saved = (ray_constants.ENABLE_RAY_CLUSTER, os.environ.get(ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR))
    ray_constants.ENABLE_RAY_CLUSTER = False
    os.environ[ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR] = "0"
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": head_cpus, "node_ip_address": "127.0.0.1",
                                                      "include_dashboard": False})
    try:
        for node in extra_nodes:
            c.add_node(node_ip_address="127.0.0.1", **node)
        c.wait_for_nodes(timeout=120)
        yield c
    finally:
        if ray.is_initialized():
            ray.shutdown()
        c.shutdown()
        ray_constants.ENABLE_RAY_CLUSTER = saved[0]
        if saved[1] is None:
            os.environ.pop(ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR, None)
        else:
            os.environ[ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR] = saved[1]
