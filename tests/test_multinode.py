"""Multi-node Ray on a simulated cluster (`ray.cluster_utils.Cluster`: a head and a second node, each
its own raylet with its own CPUs, on 127.0.0.1). The trainer connects to it through
`trainer.ray_init.address` and runs the CPU recipe with `trainer.nnodes=2 trainer.n_gpus_per_node=1`:
the ranks land on two different nodes, the checkpoint and HF export are complete, and the metrics
equal those of the same run packed on one node (`nnodes=1 n_gpus_per_node=2`, same seeds)."""

import pytest

from deepretrieval.trainer.checkpoint import MARKER, verify
from deepretrieval.trainer.main_ppo import main
from ray_cluster import loopback_cluster
from trainer_helpers import make_assets, overrides, read_metrics, stable

ray = pytest.importorskip("ray")


@pytest.fixture(scope="module")
def cluster():
    """Head (2 CPUs) + second node (2 CPUs), both on 127.0.0.1 (tests/ray_cluster.py)."""
    with loopback_cluster(2, {"num_cpus": 2, "resources": {"second_node": 1}}) as c:
        yield c


@pytest.fixture(scope="module")
def assets(tmp_path_factory, pubmed_mini_index):
    return make_assets(tmp_path_factory.mktemp("multinode"), pubmed_mini_index)


def _run(assets, out, address, monkeypatch, **extra):
    """main() on the cluster; returns the worker placement recorded just before the workers stop."""
    from deepretrieval.trainer.ppo_trainer import PPOTrainer

    seen = {}
    original = PPOTrainer.shutdown_workers

    def record(self):
        if self.actor_wg is not None:
            seen["workers"] = self.worker_info()
            seen["pg_nodes"] = list(self._pool.node_ids)
        original(self)

    monkeypatch.setattr(PPOTrainer, "shutdown_workers", record)
    args = overrides(assets, out, **{"trainer.ray_init.address": address, "trainer.ray_init.node_ip_address": "127.0.0.1",
                                     "trainer.total_training_steps": 2,
                                     "trainer.val_before_train": False, "trainer.test_freq": -1,
                                     "trainer.save_freq": 1, **extra})
    assert main(args) == 0
    assert not ray.is_initialized()  # the driver disconnected; the cluster lives on
    return seen


@pytest.mark.slow  # 65-112 s on the shared 2-core machine (two trainer runs on a 2-node cluster)
def test_two_nodes_match_one_node(cluster, assets, tmp_path, monkeypatch):
    head = cluster.head_node.node_id
    second = next(n.node_id for n in cluster.worker_nodes)
    multi = _run(assets, tmp_path / "multi", cluster.address, monkeypatch,
                 **{"trainer.nnodes": 2, "trainer.n_gpus_per_node": 1})
    # actor and critic rank 0 on the driver's (head) node, rank 1 on the second node
    by_rank = {(w["group"], w["rank"]): w["node_id"] for w in multi["workers"]}
    assert by_rank == {("actor_rollout_ref", 0): head, ("actor_rollout_ref", 1): second,
                       ("critic", 0): head, ("critic", 1): second}
    assert multi["pg_nodes"] == [head, second]

    single = _run(assets, tmp_path / "single", cluster.address, monkeypatch,
                  **{"trainer.nnodes": 1, "trainer.n_gpus_per_node": 2})
    assert {w["node_id"] for w in single["workers"]} == {head}

    for run in ("multi", "single"):
        for step in (1, 2):
            ckpt = tmp_path / run / f"global_step_{step}"
            verify(ckpt)  # completion marker present, every file's size and checksum match
            assert (ckpt / MARKER).is_file()
        hf = tmp_path / run / "global_step_2" / "actor" / "huggingface"
        assert (hf / "config.json").is_file() and (hf / "model.safetensors").is_file()
    steps_multi, _ = read_metrics(tmp_path / "multi")
    steps_single, _ = read_metrics(tmp_path / "single")
    assert sorted(steps_multi) == sorted(steps_single) == [1, 2]
    for step in (1, 2):
        a, b = stable(steps_multi[step]), stable(steps_single[step])
        assert set(a) == set(b)
        assert "actor/pg_loss" in a and "critic/vf_loss" in a
        for key in a:
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6), key
    # the trained weights agree as well
    from trainer_helpers import hf_weights
    import torch

    wa = hf_weights(tmp_path / "multi" / "global_step_2" / "actor" / "huggingface")
    wb = hf_weights(tmp_path / "single" / "global_step_2" / "actor" / "huggingface")
    assert all(torch.allclose(wa[k], wb[k], atol=1e-6) for k in wa)


@pytest.mark.slow  # 6 s once the cluster is up (it takes ~10 s to start)
def test_per_node_search_budget_on_two_nodes(cluster, tmp_path):
    """The documented multi-node rate-limit setup (docs/scaling.md): every machine that searches
    with one key gets its own limiter state (its own disk) and `rate_limit` = the key's budget / the
    number of such machines. Two Ray tasks pinned to the two nodes, each with its own limiter folder
    (as on two machines) and half of a 6/s budget, search the fake esearch: each node's requests
    are spaced by its share, so together they never exceed the budget."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from deepretrieval.controller.ray_utils import init_ray, shutdown_ray
    from deepretrieval.search.fakes import FakePubMedServer

    budget, per_node_requests = 6.0, 7
    nodes = [cluster.head_node.node_id] + [n.node_id for n in cluster.worker_nodes]
    started = init_ray(address=cluster.address, node_ip_address="127.0.0.1")
    try:
        @ray.remote(num_cpus=1)
        def search_from_node(url, rate, state_dir, tag, n):
            from deepretrieval.search.pubmed import PubMedSearchEngine

            engine = PubMedSearchEngine(base_url=url, cache=False, rate_limit=rate, ratelimit_dir=state_dir,
                                        max_retries=0)
            for i in range(n):
                engine.search(f"{tag} q{i}", k=5)
            return ray.get_runtime_context().get_node_id()

        with FakePubMedServer() as server:
            refs = [search_from_node.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False))
                    .remote(server.url, budget / len(nodes), str(tmp_path / f"limiter_{i}"), f"node{i}",
                            per_node_requests) for i, node in enumerate(nodes)]
            assert ray.get(refs, timeout=300) == nodes
            requests = list(server.requests)
    finally:
        shutdown_ray(started)
    assert len(requests) == per_node_requests * len(nodes)
    for i in range(len(nodes)):
        times = sorted(r.time for r in requests if r.params.get("term", "").startswith(f"node{i} "))
        assert len(times) == per_node_requests
        # n sends spaced by at least 1 / (budget / nodes): a lower bound, so load can only widen it
        assert times[-1] - times[0] >= (per_node_requests - 1) / (budget / len(nodes)) * 0.98, times
