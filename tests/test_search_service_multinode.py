"""The search service on a simulated 3-node cluster (a head and 2 extra raylets on 127.0.0.1,
tests/ray_cluster.py): one replica set per node, each node's client answered by its own node's
replicas (the serving actor's node id checked), and a node whose replicas are gone falls back to
another node's, with the same answers."""

import functools

import pytest

from deepretrieval.rewards.literature import RewardConfig, open_engine
from deepretrieval.search.service import SERVICE_NAMESPACE, SearchService, ServiceSettings, key_hash, replica_name
from ray_cluster import loopback_cluster

ray = pytest.importorskip("ray")

SETTINGS = ServiceSettings(replicas_per_node=1, timeout_s=120.0, num_cpus=0.25)
QUERIES = ["bone marrow[ti]", "cardio*", '"heart failure"', "diabetes AND insulin"]


@pytest.mark.slow  # 80 s on the shared 2-core machine at load 15 (three raylets start, one replica each), plus the index build
def test_each_node_uses_its_own_replicas_then_falls_back(pubmed_mini_index):
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from deepretrieval.controller.ray_utils import init_ray, shutdown_ray

    source = RewardConfig.from_config({"sources": {"pubmed_mini": {"engine": "local", "index_dir": str(pubmed_mini_index)}}}
                                      ).source("pubmed_mini")
    key = source.engine_key()
    expected = [open_engine(source).search(q, k=20).ids for q in QUERIES]
    with loopback_cluster(1, {"num_cpus": 1}, {"num_cpus": 1}) as cluster:
        nodes = [cluster.head_node.node_id] + [n.node_id for n in cluster.worker_nodes]
        started = init_ray(address=cluster.address, node_ip_address="127.0.0.1")
        service = SearchService(SETTINGS)
        try:
            infos = service.start(key, functools.partial(open_engine, source))
            assert sorted(i["node_id"] for i in infos) == sorted(nodes)  # one replica per node, on that node
            assert service.start(key, functools.partial(open_engine, source)) == infos  # idempotent: reused

            @ray.remote(num_cpus=0.25)
            def search_here(key, settings, queries):
                import ray as ray_

                from deepretrieval.search.service import ServiceSearchEngine

                client = ServiceSearchEngine(key, settings)
                results = client.search_requests([(q, 20, {}) for q in queries])
                where = {name: ray_.get(ray_.get_actor(name, namespace=SERVICE_NAMESPACE).info.remote(),
                                        timeout=60)["node_id"] for name in client.served}
                return ray_.get_runtime_context().get_node_id(), [r.ids for r in results], where, client.stats()

            def from_each_node():
                refs = [search_here.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False))
                        .remote(key, SETTINGS, QUERIES) for node in nodes]
                return ray.get(refs, timeout=300)

            for node, (here, ids, where, stats) in zip(nodes, from_each_node()):
                assert here == node and ids == expected
                assert where == {replica_name(key_hash(key), node, 0): node}  # its own node's replica
                assert "service_fallback_queries" not in stats

            lost = nodes[1]
            ray.kill(ray.get_actor(replica_name(key_hash(key), lost, 0), namespace=SERVICE_NAMESPACE), no_restart=True)
            for node, (here, ids, where, stats) in zip(nodes, from_each_node()):
                assert here == node and ids == expected
                if node == lost:  # served by the other nodes' replicas (the batch split over both), counted
                    assert set(where.values()) == set(nodes) - {lost}
                    assert stats["service_fallback_queries"] == len(QUERIES)
                else:
                    assert set(where.values()) == {node}
        finally:
            service.stop()
            shutdown_ray(started)
