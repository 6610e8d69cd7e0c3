"""The search service (deepretrieval.search.service) on a real local Ray (127.0.0.1, 2 CPUs, started
once for the module): answers equal the in-process engine's on the vendored pubmed_mini index, a
batch is spread over the node's replicas, a killed replica is survived (its chunk re-sent), a set
with no replica left answers `search_unavailable` and recovers on the next call, a deadline is a
classified error, the reward scores the same through the service, and the config keys."""

import functools
import time

import pytest

ray = pytest.importorskip("ray")

from deepretrieval.rewards import literature  # noqa: E402
from deepretrieval.rewards.literature import RewardConfig, open_engine, prepare_sample, run_searches  # noqa: E402
from deepretrieval.rewards.manager import RewardManager  # noqa: E402
from deepretrieval.rewards.parsing import ERROR_NONE, ERROR_QUERY_SYNTAX, ERROR_SEARCH_UNAVAILABLE  # noqa: E402
from deepretrieval.search.base import QuerySyntaxError, SearchUnavailable  # noqa: E402
from deepretrieval.search.service import (  # noqa: E402
    SERVICE_NAMESPACE,
    SearchService,
    ServiceSearchEngine,
    ServiceSettings,
    key_hash,
    replica_name,
    settings_from_config,
)

SETTINGS = ServiceSettings(replicas_per_node=2, timeout_s=60.0, num_cpus=0.1)
# real queries: words, a field tag, truncation, a phrase, Boolean structure, a MeSH heading, no hit
QUERIES = ["bone marrow[ti]", "cardio*", '"heart failure"', "diabetes AND (insulin OR metformin) NOT mice",
           "Neoplasms[mh]", "zzqqxnotaword"]


def without_time(result):
    data = result.to_dict()
    data.pop("elapsed_s")
    return data


@pytest.fixture(scope="module")
def ray_up():
    from deepretrieval.controller.ray_utils import init_ray

    if ray.is_initialized():
        ray.shutdown()
    init_ray(num_cpus=2)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def source(pubmed_mini_index):
    return RewardConfig.from_config({"sources": {"pubmed_mini": {"engine": "local", "index_dir": str(pubmed_mini_index)}}}
                                    ).source("pubmed_mini")


@pytest.fixture(scope="module")
def in_process(source):
    return open_engine(source)


@pytest.fixture(scope="module")
def service(ray_up, source):
    """The replica set of the pubmed_mini source (2 replicas on the one node), as the reward keys it."""
    svc = SearchService(SETTINGS)
    infos = svc.start(source.engine_key(), functools.partial(open_engine, source))
    assert len(infos) == 2 and len({i["pid"] for i in infos}) == 2
    yield svc
    svc.stop()


def test_answers_equal_the_in_process_engine(service, source, in_process):
    client = service.client(source.engine_key(), functools.partial(open_engine, source))
    assert client.name == in_process.name == "local"
    # counted at k=100 only (the engine counts only when asked: total None otherwise)
    requests = [(q, k, {"count": True} if k == 100 else {}) for q in QUERIES for k in (0, 5, 100)] + [("cancer", 50, {"max_date": "1980/12/31"}),
                                                                      ("cancer", 50, {"min_date": "1990"})]
    served = client.search_requests(requests)
    assert len(served) == len(requests)
    for (query, k, filters), result in zip(requests, served):
        expected = in_process.search(query, k=k, **filters)
        assert without_time(result) == without_time(expected), query
    counted = [r.total for (_, k, _), r in zip(requests, served) if k == 100]
    assert any(t > 100 for t in counted) and any(t == 0 for t in counted)  # the queries are not all alike
    assert all(r.total is None for (_, k, _), r in zip(requests, served) if k != 100)
    assert [without_time(r) for r in client.batch_search(QUERIES, k=20)] == \
        [without_time(in_process.search(q, k=20)) for q in QUERIES]
    # classified errors cross the service as themselves, with their position
    with pytest.raises(QuerySyntaxError) as remote:
        client.search("diabetes AND (insulin", k=10)
    with pytest.raises(QuerySyntaxError) as local:
        in_process.search("diabetes AND (insulin", k=10)
    assert (remote.value.position, str(remote.value), remote.value.query) == \
        (local.value.position, str(local.value), local.value.query)
    assert without_time(client.batch_search(["((a"], k=5)[0]) == without_time(in_process.try_search("((a", k=5))
    # bad input raises the same ValueError in both
    with pytest.raises(ValueError) as remote_value:
        client.search("cancer", k=-1)
    with pytest.raises(ValueError) as local_value:
        in_process.search("cancer", k=-1)
    assert str(remote_value.value) == str(local_value.value)


def test_reward_scores_the_same_through_the_service(service, source, pubmed_mini_index):
    """RewardManager with use_search_service: the replicas the module started are reused (none
    created), every score equals the in-process reward's, and the service counters are reported."""
    config = {"sources": {"pubmed_mini": {"engine": "local", "index_dir": str(pubmed_mini_index)}}}
    texts = [f'<answer>{{"query": "{q}"}}</answer>' for q in ['\\"heart failure\\"', "cardio*", "bone marrow[ti]",
                                                               "((broken", "cardio*"]] + ["no answer block"]
    truths = [{"target": ["11006", "12345"]}] * len(texts)
    info = [{"think_in_prompt": True, "prompt_style": "no_reason"}] * len(texts)
    local = RewardManager(config=config).score_texts(texts, ["pubmed_mini"] * len(texts), truths, info)
    try:
        literature.use_search_service(SETTINGS)
        manager = RewardManager(config=config)
        remote = manager.score_texts(texts, ["pubmed_mini"] * len(texts), truths, info)
        assert literature._SERVICE._created == {}  # the running set was found and reused
        metrics = manager.metrics(remote, ["pubmed_mini"] * len(texts))
    finally:
        literature.use_search_service(None)
    strip = [{k: v for k, v in r.items() if k != "search_time_s"} for r in local]
    assert [{k: v for k, v in r.items() if k != "search_time_s"} for r in remote] == strip
    assert [r["error"] for r in remote] == ["none", "none", "none", ERROR_QUERY_SYNTAX, "none", "format"]
    assert remote[2]["recall"] == 0.5  # 11006 is the bone-marrow record; 12345 is not in the corpus
    assert metrics["reward/engine/pubmed_mini/service_requests"] == 4.0  # 4 distinct searches, one batch
    assert metrics["reward/engine/pubmed_mini/service_calls"] == 1.0


def test_a_batch_is_spread_over_the_replicas(service, source, in_process):
    client = ServiceSearchEngine(source.engine_key(), SETTINGS)  # found by name, as another process would
    results = client.search_requests([(q, 10, {}) for q in QUERIES + QUERIES[:4]])
    assert [without_time(r) for r in results] == [without_time(in_process.search(q, k=10)) for q in QUERIES + QUERIES[:4]]
    node = ray.get_runtime_context().get_node_id()
    names = {replica_name(key_hash(source.engine_key()), node, i) for i in range(2)}
    assert dict(client.served) == {name: 5 for name in names}  # 10 queries: 5 per replica
    results = client.search_requests([("cancer", 3, {})])  # one query: one replica
    assert sum(client.served.values()) == 11 and results[0].ok


def running_replicas():
    return sorted(a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["namespace"] == SERVICE_NAMESPACE)


def _wait_gone(name, timeout_s=30.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            ray.get_actor(name, namespace=SERVICE_NAMESPACE)
        except ValueError:
            return
        time.sleep(0.1)
    raise AssertionError(f"{name} still registered after {timeout_s} s")


def test_killed_replicas_are_survived_counted_and_restarted(ray_up, source, in_process):
    """Own replica set (another engine key): one replica killed -> its chunk goes to the other, and the
    set is topped up in the background (the killed replica is back, serving); both killed -> every search
    `search_unavailable` (the reward's class), then the next call starts the set again and answers."""
    key = "kill-test:" + source.engine_key()
    svc = SearchService(SETTINGS)
    try:
        client = svc.client(key, functools.partial(open_engine, source))
        node = ray.get_runtime_context().get_node_id()
        names = [replica_name(key_hash(key), node, i) for i in range(2)]
        assert client.search("cancer", k=1).ok  # the client holds both replicas' handles
        ray.kill(ray.get_actor(names[0], namespace=SERVICE_NAMESPACE), no_restart=True)
        _wait_gone(names[0])
        samples = [prepare_sample("pubmed_mini", f'<answer>{{"query": "{q}"}}</answer>', {"target": ["11006"]},
                                  {"prompt_style": "no_reason"}, RewardConfig.from_config(
                                      {"sources": {"pubmed_mini": dict(source.engine_options, engine="local")}}))
                   for q in ["cardio*", "bone marrow[ti]", "cancer", "diabetes"]]
        before = dict(client.served, **{n: client.served[n] for n in names})
        outcomes = run_searches(samples, client)
        assert [o.error for o in outcomes] == [ERROR_NONE] * 4
        assert [o.ids for o in outcomes] == [in_process.search(s.query, k=100).ids for s in samples]
        assert client.counters["replica_deaths"] == 1
        assert client.served[names[1]] - before[names[1]] == 4 and client.served[names[0]] == before[names[0]]
        # the death started a top-up: names[0] is a new process, and the next batch is spread over both again
        client._top_up_thread.join(timeout=120)
        assert client.counters["top_ups"] == 1 and sorted(r.name for r in client._replicas) == sorted(names)
        served = dict(client.served)
        assert [o.error for o in run_searches(samples, client)] == [ERROR_NONE] * 4
        assert client.served[names[0]] - served.get(names[0], 0) == 2 and client.served[names[1]] - served[names[1]] == 2

        for name in names:
            ray.kill(ray.get_actor(name, namespace=SERVICE_NAMESPACE), no_restart=True)
        for name in names:
            _wait_gone(name)
        outcomes = run_searches(samples, client)
        assert [o.error for o in outcomes] == [ERROR_SEARCH_UNAVAILABLE] * 4
        assert all(o.detail.startswith("search service: replica ") and "died" in o.detail for o in outcomes)
        assert client.counters["unavailable"] == 4
        with pytest.raises(SearchUnavailable):
            ServiceSearchEngine(key, SETTINGS).search("cancer")  # a client that cannot start replicas

        outcomes = run_searches(samples, client)  # the next call starts the set again
        assert [o.error for o in outcomes] == [ERROR_NONE] * 4
        assert client.counters["restarts"] == 1 and set(svc._created) == set(names)
        assert client.counters["top_ups"] == 1  # a set with no replica left is restarted by the call, not topped up
    finally:
        svc.stop()
    assert client._restart is None  # a stopped service's clients start nothing again
    for name in names:
        _wait_gone(name)


def test_a_top_up_that_leaves_the_set_short_backs_off(monkeypatch):
    """Without Ray: the set is short (1 of 2 nodes x 2 replicas); a top-up whose start fails is
    counted and not tried again before REFRESH_S, then after 2 x REFRESH_S; one that makes the set whole
    resets the back-off; a whole set starts none."""
    from deepretrieval.search import service as sv

    monkeypatch.setattr(sv, "alive_nodes", lambda num_cpus=0.0: ["n1", "n2"])
    clock = [1000.0]
    monkeypatch.setattr(sv.time, "monotonic", lambda: clock[0])
    starts, outcome = [], {"ok": False}

    def restart(timeout_s):
        starts.append(timeout_s)
        if not outcome["ok"]:
            raise sv.SearchUnavailable("no room")

    client = sv.ServiceSearchEngine("k", sv.ServiceSettings(replicas_per_node=2, timeout_s=5.0), name="local",
                                    restart=restart, node_id="n1")
    whole = [sv._Replica(f"r{i}", "n1" if i < 2 else "n2", None) for i in range(4)]
    monkeypatch.setattr(client, "refresh", lambda: whole if outcome["ok"] else whole[:1])

    def top_up(replicas):
        client._maybe_top_up(replicas)
        if client._top_up_thread is not None:
            client._top_up_thread.join(timeout=10)

    top_up(whole[:1])
    assert starts == [5.0] and client.counters["top_ups"] == 1 and client._top_up_next == 1000.0 + sv.REFRESH_S
    clock[0] += sv.REFRESH_S - 1
    top_up(whole[:1])
    assert len(starts) == 1  # backing off
    clock[0] += 1
    top_up(whole[:1])
    assert len(starts) == 2 and client._top_up_next == clock[0] + 2 * sv.REFRESH_S  # doubled
    clock[0] += 2 * sv.REFRESH_S
    outcome["ok"] = True
    top_up(whole[:1])
    assert len(starts) == 3 and client._top_up_failures == 0 and client.counters["top_ups"] == 3
    top_up(whole)  # whole: nothing to do
    top_up([])  # none left: the next call restarts the whole set, synchronously
    assert len(starts) == 3


def test_an_engine_that_cannot_open_raises_its_own_error(ray_up, tmp_path):
    """As in-process: a missing index is SearchUnavailable (the reward's search_unavailable), a
    bad option a TypeError (a configuration mistake); the replicas of the failed start are gone."""
    from deepretrieval.search.base import make_engine

    svc = SearchService(ServiceSettings(replicas_per_node=1, timeout_s=60.0, num_cpus=0.1))
    missing = functools.partial(make_engine, "local", index_dir=str(tmp_path / "no_index"))
    with pytest.raises(SearchUnavailable) as remote:
        svc.client("missing-index", missing)
    with pytest.raises(SearchUnavailable) as local:
        missing()
    assert str(remote.value) == str(local.value) and "no deepretrieval_index.json" in str(local.value)
    with pytest.raises(TypeError, match="unexpected keyword argument 'colour'"):
        svc.start("bad-option", functools.partial(make_engine, "pubmed", colour="red"))
    assert svc._created == {}
    node = ray.get_runtime_context().get_node_id()
    for key in ("missing-index", "bad-option"):
        _wait_gone(replica_name(key_hash(key), node, 0))


def test_a_failed_start_is_not_retried_at_every_call(ray_up, tmp_path, monkeypatch):
    """After a failed start the client fails at once (no new replicas, no new wait) until
    REFRESH_S has passed; then it tries again."""
    from deepretrieval.search import service as service_module
    from deepretrieval.search.base import make_engine

    svc = SearchService(ServiceSettings(replicas_per_node=1, timeout_s=60.0, num_cpus=0.1))
    missing = functools.partial(make_engine, "local", index_dir=str(tmp_path / "no_index"))
    starts = []
    real_start = svc.start
    monkeypatch.setattr(svc, "start", lambda *a, **kw: starts.append(1) or real_start(*a, **kw))
    with pytest.raises(SearchUnavailable, match="no deepretrieval_index.json"):
        svc.client("missing-again", missing)
    t0 = time.monotonic()
    with pytest.raises(SearchUnavailable, match="no deepretrieval_index.json.*start failed 0 s ago; tried again 60 s"):
        svc.client("missing-again", missing)
    assert time.monotonic() - t0 < 5 and len(starts) == 1 and svc._created == {}
    monkeypatch.setattr(service_module, "REFRESH_S", 0.0)
    with pytest.raises(SearchUnavailable, match="no deepretrieval_index.json"):
        svc.client("missing-again", missing)
    assert len(starts) == 2


def test_replicas_that_cannot_be_placed_are_dropped_not_fatal(ray_up, source, in_process):
    """Two replicas of 1.5 CPUs on a 2-CPU node: one is placed and serves, the other never starts
    and is dropped (killed) at the start's deadline instead of failing the whole service."""
    svc = SearchService(ServiceSettings(replicas_per_node=2, timeout_s=15.0, num_cpus=1.5))
    try:
        client = svc.client(source.engine_key() + "-big", functools.partial(open_engine, source))
        assert len(svc._created) == 1  # the one placed; the other killed
        assert without_time(client.search(QUERIES[0], k=10)) == without_time(in_process.search(QUERIES[0], k=10))
    finally:
        svc.stop()


def test_a_deadline_is_a_classified_error_not_a_stall(service, source):
    """The unanswered work is cancelled at the deadline: each replica's call is dropped (queued) or
    stops after the query it is running, instead of serving 20 queries nobody reads."""
    from ray.exceptions import TaskCancelledError

    client = ServiceSearchEngine(source.engine_key(), ServiceSettings(replicas_per_node=2, timeout_s=0.001))
    cancelled = []
    real_cancel = ray.cancel
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ray, "cancel", lambda ref, **kw: cancelled.append((ref, kw)) or real_cancel(ref, **kw))
        start = time.monotonic()
        results = client.search_requests([("cancer OR tumor* OR cell*", 5000, {})] * 40)
    assert time.monotonic() - start < 20  # generous: the deadline is 1 ms
    assert all(r.error["type"] == "search_unavailable" and "within 0.001 s" in r.error["message"] for r in results)
    assert client.counters["timeouts"] == 40
    assert len(cancelled) == 2 and all(kw == {"force": False} for _, kw in cancelled)
    for ref, _ in cancelled:
        try:
            assert len(ray.get(ref, timeout=60)) < 20  # stopped early
        except TaskCancelledError:  # dropped before it ran
            pass


def test_trainer_starts_and_stops_the_service(ray_up):
    from types import SimpleNamespace

    from omegaconf import OmegaConf

    from deepretrieval.trainer.ppo_trainer import PPOTrainer

    cfg = OmegaConf.create({"reward_model": {"search_service": {"enable": True, "replicas_per_node": 2,
                                                                "timeout_s": 60, "num_cpus": 0.1, "engines": ["local"]}},
                            "trainer": {"ray_init": {"address": None, "num_cpus": None, "node_ip_address": None}}})
    fake = SimpleNamespace(config=cfg, _ray_started=False, _search_service=False)
    PPOTrainer._start_search_service(fake)
    try:
        assert literature._SERVICE is not None and literature._SERVICE.settings == SETTINGS
        assert fake._ray_started is False  # Ray was up: not started (nor later stopped) by the trainer
        service = literature._SERVICE
        PPOTrainer._start_search_service(fake)  # idempotent (a worker restart calls it again)
        assert literature._SERVICE is service
    finally:
        literature.use_search_service(None)
    assert literature._SERVICE is None


def test_settings_and_config_keys():
    from deepretrieval.trainer.config import ConfigError, compose_config

    assert settings_from_config({"enable": False, "replicas_per_node": 4}) is None
    assert settings_from_config(None) is None
    assert settings_from_config({"enable": True, "replicas_per_node": 4, "timeout_s": 5, "num_cpus": 0.5,
                                 "engines": "local"}) == ServiceSettings(4, 5.0, 0.5, ("local",))
    required = ["data.train_files=train.parquet", "actor_rollout_ref.model.path=some/model", "trainer.n_gpus_per_node=1",
                "data.train_batch_size=4", "actor_rollout_ref.actor.ppo_mini_batch_size=4",
                "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=4", "critic.ppo_micro_batch_size_per_gpu=4"]
    cfg = compose_config(required)
    assert settings_from_config(cfg.reward_model.search_service) is None  # default off
    cfg = compose_config(required + ["reward_model.search_service.enable=true",
                                     "reward_model.search_service.replicas_per_node=3"])
    assert settings_from_config(cfg.reward_model.search_service) == ServiceSettings(3, 120.0, 1.0, ("local",))
    for override, phrase in [("replicas_per_node=0", "must be"), ("timeout_s=0", "positive number"),
                             ("num_cpus=-1", "non-negative"), ("engines=[local,bing]", "bing"),
                             ("enable=maybe", "true or false")]:
        with pytest.raises(ConfigError) as info:
            compose_config(required + [f"reward_model.search_service.{override}"])
        assert info.value.key == f"reward_model.search_service.{override.split('=')[0]}", override
        assert phrase in str(info.value)


@pytest.mark.slow  # 70-95 s at load 15-25: two one-step CPU trainer runs (tiny model, 21 scripted answers)
def test_a_training_step_scores_the_same_with_the_service(ray_up, tmp_path, pubmed_mini_index, monkeypatch):
    """One PPO step over the 21 pubmed_mini topics, each answered with a real query (the words of
    its review question): every metric equals the run without the service (timings aside), the
    service answered the step's searches in one batch, and the replicas the trainer started (none
    when the module's set is running: it is reused) are gone after the run."""
    from deepretrieval.models.tiny import load_tiny_tokenizer
    from deepretrieval.trainer.main_ppo import main
    from deepretrieval.workers.rollout import hf
    from trainer_helpers import make_assets, overrides, read_metrics, scripted_rollout, stable, words_query

    def answer(question):
        return [f'plan</think>\n<answer>{{"query": "{words_query(question)}"}}</answer>']

    monkeypatch.setattr(hf.HFRollout, "generate_sequences", scripted_rollout(load_tiny_tokenizer(), answer))
    assets = make_assets(tmp_path / "assets", pubmed_mini_index)
    extra = {"trainer.use_ray": False, "trainer.n_gpus_per_node": 1, "trainer.total_training_steps": 1,
             "trainer.val_before_train": False, "trainer.save_freq": 0, "trainer.save_hf_model": False,
             "data.train_batch_size": 21, "data.max_response_length": 160, "actor_rollout_ref.rollout.n": 1,
             "actor_rollout_ref.actor.ppo_mini_batch_size": 21,
             "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu": 7, "critic.ppo_micro_batch_size_per_gpu": 7}
    service = {"reward_model.search_service.enable": True, "reward_model.search_service.num_cpus": 0.1,
               "reward_model.search_service.timeout_s": 60}
    assert main(overrides(assets, tmp_path / "plain", **extra)) == 0
    before = running_replicas()
    assert main(overrides(assets, tmp_path / "service", **extra, **service)) == 0
    plain, served = (read_metrics(tmp_path / name)[0][1] for name in ("plain", "service"))
    counters = {k: v for k, v in served.items() if "/service_" in k}
    assert counters == {"reward/engine/pubmed_mini/service_calls": 1.0, "reward/engine/pubmed_mini/service_requests": 21.0}
    assert stable({k: v for k, v in served.items() if k not in counters}) == stable(plain)
    assert served["reward/searches"] == 21 and served["reward/search_error_ratio"] == 0.0
    assert literature._SERVICE is None
    deadline = time.monotonic() + 30  # ray.kill returns before the name is released
    while running_replicas() != before and time.monotonic() < deadline:
        time.sleep(0.2)
    assert running_replicas() == before  # the replicas the trainer started were killed at shutdown
