"""A search service: opened engines held by Ray actors, one replica set per node, shared by every
process of a run.

Without it each process that scores rewards opens its own copy of every engine (a local index is
opened, and built on first use, per process). With it, `SearchService.start` places
`replicas_per_node` actors (`SearchReplica`) on every alive Ray node (NodeAffinitySchedulingStrategy
with the node id, `soft=False`), each holding one opened engine; any process of the cluster finds
them by name with `ray.get_actor(replica_name(...), namespace=SERVICE_NAMESPACE)` (names are
deterministic: engine key hash, node id, replica number), so a multi-node run opens one mirror per
node instead of one per process. Starting is idempotent: a replica that is already there is reused.

`ServiceSearchEngine` is the client: a `SearchEngine` whose answers are the wrapped engine's own
(`SearchResult` JSON equal but for `elapsed_s`, the same classified errors). `search_requests`
sends a batch of (query, k, filters) in one call per replica, the batch split into contiguous
chunks over the node's replicas (the starting replica turns round-robin from call to call). When
the node has no live replica the client falls back to other nodes' replicas. Every wait is
bounded by `timeout_s` for the whole call; a replica that dies is dropped and its chunk is re-sent
to another one; what is still unanswered at the deadline, or when no replica is left, comes back
as `SearchUnavailable` ("search service: ..."), which the reward counts as `search_unavailable`
(left out of the update), never an exception and never a stalled step; the calls still pending at
the deadline are cancelled (`ray.cancel`, force=False: dropped if queued, stopped after the
current query if running). A client created by a `SearchService` starts the replica set again
(bounded by `timeout_s`) at the start of its next call when no replica of it is left on any node
(after a failed restart, not again for `REFRESH_S`); a set that lost only some replicas goes on
with the others and is topped up in the background: after a call in which a replica died, or when a periodic look-up finds
fewer than `replicas_per_node` on an alive node, a thread starts the missing ones (`SearchService.start`,
which reuses the live ones), one top-up at a time; one that leaves the set short (e.g. a node without
room) is tried again after `REFRESH_S`, doubling up to `TOP_UP_MAX_BACKOFF_S`. A failed first start (`SearchService.client`) is not tried
again for `REFRESH_S` either, and a start keeps the replicas that answered when others (e.g. on a
node without room) did not.

Counters (`stats()`, reported by the reward as `reward/engine/<source>/service_*`): `requests`
(queries sent), `calls` (batches), `replica_deaths`, `timeouts` (queries unanswered at the
deadline), `unavailable` (queries answered with a service error), `fallback_queries` (answered by
another node's replica), `restarts` (replica sets started again by the client), `top_ups` (background
starts of the missing replicas of a set that lost some).
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

from deepretrieval.search.base import QuerySyntaxError, SearchEngine, SearchEngineError, SearchResult, SearchUnavailable

logger = logging.getLogger(__name__)

SERVICE_NAMESPACE = "deepretrieval-search"
REPLICA_MAX_RESTARTS = 3  # a replica process that crashes (OOM, segfault) is restarted by Ray this often
REFRESH_S = 60.0  # a client looks the replicas up again this often (picks up restarted and new ones)
TOP_UP_MAX_BACKOFF_S = 600.0  # the longest wait between top-ups that leave a set short
# exceptions an engine raises for bad input that cross the service as themselves (parity with in-process)
PASSTHROUGH_ERRORS: Dict[str, type] = {"ValueError": ValueError, "TypeError": TypeError}

# one search: (query, k, filters)
Request = Tuple[str, int, Mapping[str, Any]]


@dataclass(frozen=True)
class ServiceSettings:
    """`reward_model.search_service`: replicas per node, the deadline of one call (and of a start),
    CPUs reserved per replica, and which engine kinds are served."""

    replicas_per_node: int = 2
    timeout_s: float = 120.0
    num_cpus: float = 1.0
    engines: Tuple[str, ...] = ("local",)


def settings_from_config(section: Any) -> Optional[ServiceSettings]:
    """The settings of a `search_service` config section (mapping or DictConfig); None when it is
    absent or `enable` is false."""
    if section is None or not section.get("enable"):
        return None
    engines = section.get("engines") or ServiceSettings.engines
    return ServiceSettings(
        replicas_per_node=int(section.get("replicas_per_node", ServiceSettings.replicas_per_node)),
        timeout_s=float(section.get("timeout_s", ServiceSettings.timeout_s)),
        num_cpus=float(section.get("num_cpus", ServiceSettings.num_cpus)),
        engines=(engines,) if isinstance(engines, str) else tuple(str(e) for e in engines),
    )


def key_hash(engine_key: str) -> str:
    """A short stable name for an engine identity (rewards.literature.SourceConfig.engine_key)."""
    return hashlib.sha1(engine_key.encode("utf-8")).hexdigest()[:16]


def replica_name(engine_hash: str, node_id: str, index: int) -> str:
    """The Ray actor name of replica `index` of an engine on a node (in SERVICE_NAMESPACE)."""
    return f"search/{engine_hash}/{node_id}/{index}"


# ----------------------------------------------------------------------------- the wire format

def error_payload(exc: BaseException) -> Dict[str, Any]:
    """An exception raised by an engine as plain data: classified errors keep their class (and a
    syntax error its position), ValueError / TypeError stay themselves (bad input raises in-process
    too), anything else becomes `search_unavailable` naming the exception class."""
    if isinstance(exc, QuerySyntaxError):
        return {"type": exc.kind, "problem": exc.problem, "position": exc.position, "query": exc.query}
    if isinstance(exc, SearchEngineError):
        return {"type": exc.kind, "message": str(exc)}
    name = type(exc).__name__
    if name in PASSTHROUGH_ERRORS and type(exc) is PASSTHROUGH_ERRORS[name]:
        return {"type": "passthrough", "class": name, "message": str(exc)}
    return {"type": SearchUnavailable.kind, "message": f"{name}: {exc}"}


def error_from_payload(payload: Mapping[str, Any]) -> Exception:
    """The exception `error_payload` described (a SearchEngineError, ValueError or TypeError)."""
    kind = payload.get("type")
    if kind == QuerySyntaxError.kind:
        return QuerySyntaxError(str(payload.get("problem")), payload.get("position"), payload.get("query"))
    if kind == "passthrough":
        return PASSTHROUGH_ERRORS[str(payload["class"])](str(payload.get("message", "")))
    if kind == SearchUnavailable.kind:
        return SearchUnavailable(str(payload.get("message", "")))
    error = SearchEngineError(str(payload.get("message", "")))
    error.kind = str(kind)  # an engine's own subclass: its class name is not known here, its kind is
    return error


def serve_request(engine: SearchEngine, request: Request) -> Dict[str, Any]:
    """One search on a replica: {"result": SearchResult as a dict} or {"error": error_payload}."""
    query, k, filters = request
    try:
        return {"result": engine.search(query, k=k, **dict(filters)).to_dict()}
    except Exception as exc:  # every failure crosses the wire as data, never as a dead call
        return {"error": error_payload(exc)}


def _decode(reply: Mapping[str, Any]) -> Union[SearchResult, Exception]:
    if "result" in reply:
        return SearchResult.from_dict(reply["result"])
    return error_from_payload(reply["error"])


class SearchReplica:
    """The actor: one opened engine (built by `opener` in the actor's process, on its node). An
    engine that cannot be opened is reported by `info()` (`error`), so the starter raises the
    engine's own error, as opening it in-process would."""

    def __init__(self, opener: Callable[[], SearchEngine], name: str):
        self.name = name
        self.engine: Optional[SearchEngine] = None
        self.error: Optional[Dict[str, Any]] = None
        try:
            self.engine = opener()
        except Exception as exc:  # reported by info(); the starter kills this replica
            self.error = error_payload(exc)

    def info(self) -> Dict[str, Any]:
        import ray

        return {"name": self.name, "engine": self.engine.name if self.engine is not None else None,
                "error": self.error, "pid": os.getpid(), "node_id": ray.get_runtime_context().get_node_id()}

    def search_requests(self, requests: Sequence[Request]) -> List[Dict[str, Any]]:
        if self.engine is None:
            return [{"error": self.error} for _ in requests]
        out: List[Dict[str, Any]] = []
        for request in requests:
            if out and _cancelled():  # the client's deadline passed (ray.cancel): nobody reads the rest
                break
            out.append(serve_request(self.engine, request))
        return out


def _cancelled() -> bool:
    """Whether the running actor task was cancelled (`ray.cancel`; False outside a Ray task)."""
    import ray

    try:
        return bool(ray.get_runtime_context().is_canceled())
    except Exception:  # not in an actor task
        return False


def current_node_id() -> str:
    import ray

    return ray.get_runtime_context().get_node_id()


def alive_nodes(num_cpus: float = 0.0) -> List[str]:
    """Ids of the alive Ray nodes with at least `num_cpus` CPUs (the ones a replica can go to)."""
    import ray

    return [n["NodeID"] for n in ray.nodes()
            if n.get("Alive") and float(n.get("Resources", {}).get("CPU", 0.0)) >= num_cpus]


def _split(n: int, parts: int) -> List[range]:
    """`range(n)` in `parts` contiguous chunks whose sizes differ by at most one (no empty chunk)."""
    parts = max(1, min(parts, n))
    base, extra = divmod(n, parts)
    out, start = [], 0
    for i in range(parts):
        size = base + (i < extra)
        out.append(range(start, start + size))
        start += size
    return out


@dataclass
class _Replica:
    name: str
    node_id: str
    handle: Any


# ----------------------------------------------------------------------------- the client

class ServiceSearchEngine(SearchEngine):
    """A `SearchEngine` answered by the replicas of one engine (see the module docstring).

    Args:
        engine_key: the engine's identity (the replicas' names derive from it).
        settings: replicas per node and the deadline of one call.
        name: the wrapped engine's `name` (None: asked from the first replica found).
        restart: called (with the deadline left) to start missing replicas again, at the start of a
            call that finds none; a `SearchService` passes its `start`.
    """

    def __init__(self, engine_key: str, settings: ServiceSettings, name: Optional[str] = None,
                 restart: Optional[Callable[[float], Any]] = None, node_id: Optional[str] = None):
        self.engine_key = engine_key
        self.engine_hash = key_hash(engine_key)
        self.settings = settings
        self.node_id = node_id or current_node_id()
        self._name = name
        self._restart = restart
        self._restart_failed_at = float("-inf")
        self._replicas: List[_Replica] = []
        self._refreshed = float("-inf")
        self._turn = 0
        self._lock = threading.Lock()
        self._top_up_thread: Optional[threading.Thread] = None
        self._top_up_next = float("-inf")  # no top-up before this time (after one that left the set short)
        self._top_up_failures = 0
        self.counters: Counter = Counter()
        self.served: Counter = Counter()  # replica name -> queries it answered

    # -- which replicas
    @property
    def name(self) -> str:  # type: ignore[override]
        if self._name is None:
            self._replicas_now()
        return self._name or "service"

    def refresh(self) -> List[_Replica]:
        """Look up every node's replicas by name (the dead ones are gone from the name table)."""
        import ray

        found = []
        for node in alive_nodes():
            for i in range(self.settings.replicas_per_node):
                name = replica_name(self.engine_hash, node, i)
                try:
                    found.append(_Replica(name, node, ray.get_actor(name, namespace=SERVICE_NAMESPACE)))
                except ValueError:  # not there (never started, or dead)
                    continue
        if found and self._name is None:
            try:
                self._name = ray.get(found[0].handle.info.remote(), timeout=self.settings.timeout_s)["engine"]
            except Exception:  # a replica that cannot answer is noticed by the next search
                logger.debug("search service: no info from %s", found[0].name, exc_info=True)
        with self._lock:
            self._replicas = found
            self._refreshed = time.monotonic()
        return found

    def _replicas_now(self) -> List[_Replica]:
        with self._lock:
            stale = time.monotonic() - self._refreshed > REFRESH_S
            replicas = list(self._replicas)
        if stale or not replicas:
            replicas = self.refresh()
            self._maybe_top_up(replicas)
        return replicas

    def _maybe_top_up(self, replicas: Sequence[_Replica]) -> None:
        """Start the missing replicas of a set that lost some, in a background thread (see the module
        docstring); nothing when the set is whole, a top-up is running, or the last one left it short
        less than its back-off ago; nor when none is left (the next call starts the whole set, `_ask`)."""
        if self._restart is None or not replicas:
            return
        expected = len(alive_nodes(self.settings.num_cpus)) * self.settings.replicas_per_node
        if len(replicas) >= expected:
            return
        with self._lock:
            running = self._top_up_thread is not None and self._top_up_thread.is_alive()
            if running or time.monotonic() < self._top_up_next:
                return
            self._top_up_thread = threading.Thread(target=self._top_up, args=(len(replicas), expected),
                                                   name="search-service-top-up", daemon=True)
            self._top_up_thread.start()

    def _top_up(self, had: int, expected: int) -> None:
        restart = self._restart
        found: List[_Replica] = []
        try:
            if restart is not None:
                restart(self.settings.timeout_s)
                found = self.refresh()
        except Exception as exc:  # the set goes on with the replicas it has
            logger.warning("search service: could not top up engine %s: %s", self.engine_hash, exc)
        with self._lock:
            self.counters["top_ups"] += 1
            if len(found) >= expected:
                self._top_up_failures, self._top_up_next = 0, float("-inf")
            else:
                self._top_up_failures += 1
                wait = min(REFRESH_S * 2 ** (self._top_up_failures - 1), TOP_UP_MAX_BACKOFF_S)
                self._top_up_next = time.monotonic() + wait
        logger.info("search service: topped up engine %s from %d to %d of %d replicas", self.engine_hash, had,
                    len(found), expected)

    def _pool(self, replicas: Sequence[_Replica]) -> List[_Replica]:
        """This node's replicas when it has any, else every other node's; rotated by one per call."""
        local = [r for r in replicas if r.node_id == self.node_id]
        pool = local or list(replicas)
        if not pool:
            return []
        with self._lock:
            turn = self._turn = (self._turn + 1) % len(pool)
        return pool[turn:] + pool[:turn]

    def _drop(self, replica: _Replica) -> None:
        with self._lock:
            self._replicas = [r for r in self._replicas if r.name != replica.name]

    # -- searching
    def _ask(self, requests: Sequence[Request]) -> List[Union[SearchResult, Exception]]:
        """Every request answered (a result or the exception the engine raised), or a
        SearchUnavailable for those the service could not answer before the deadline."""
        import ray
        from ray.exceptions import GetTimeoutError, RayActorError, RayError

        n = len(requests)
        out: List[Union[SearchResult, Exception, None]] = [None] * n
        if n == 0:
            return []
        deadline = time.monotonic() + self.settings.timeout_s
        self.counters["calls"] += 1
        self.counters["requests"] += n
        replicas = self._replicas_now()
        if not replicas and self._restart is not None and time.monotonic() - self._restart_failed_at > REFRESH_S:
            self._try_restart(deadline)
            replicas = self.refresh()
        pool = self._pool(replicas)
        if not pool:
            return self._fail_all(out, range(n), f"no replica of engine {self.engine_hash} is running on any node")
        chunks = _split(n, len(pool))
        tried: Dict[int, set] = {c: set() for c in range(len(chunks))}
        pending: Dict[Any, Tuple[int, _Replica]] = {}

        def send(c: int, replica: _Replica) -> None:
            tried[c].add(replica.name)
            ref = replica.handle.search_requests.remote([requests[i] for i in chunks[c]])
            pending[ref] = (c, replica)

        def next_replica(c: int) -> Optional[_Replica]:
            for candidate in self._pool(self._replicas_now()):
                if candidate.name not in tried[c]:
                    return candidate
            return None

        died = False
        for c, replica in enumerate(pool[: len(chunks)]):
            send(c, replica)
        while pending:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=remaining)
            for ref in ready:
                c, replica = pending.pop(ref)
                try:
                    replies = ray.get(ref, timeout=max(deadline - time.monotonic(), 0.1))
                except RayActorError as exc:  # died (or is restarting): its chunk goes to another replica
                    self.counters["replica_deaths"] += 1
                    logger.warning("search service: replica %s is gone (%s)", replica.name, type(exc).__name__)
                    self._drop(replica)
                    died = True
                    other = next_replica(c)
                    if other is not None:
                        send(c, other)
                    else:
                        self._fail_all(out, chunks[c], f"replica {replica.name} died and no other replica is left")
                    continue
                except (GetTimeoutError, RayError) as exc:
                    self._fail_all(out, chunks[c], f"replica {replica.name}: {type(exc).__name__}: {exc}"[:500])
                    continue
                for i, reply in zip(chunks[c], replies):
                    out[i] = _decode(reply)
                self.served[replica.name] += len(replies)
                if replica.node_id != self.node_id:
                    self.counters["fallback_queries"] += len(replies)
        for ref, (c, replica) in pending.items():  # the deadline passed
            # cancel it, so the replica's later calls do not queue behind stale work: a queued call
            # is dropped; a running one stops at its next query (SearchReplica checks the flag);
            # Ray allows only force=False for actor tasks
            try:
                ray.cancel(ref, force=False)
            except Exception as exc:  # already finished or the replica is gone
                logger.debug("search service: cancel on %s: %s", replica.name, exc)
            self.counters["timeouts"] += len(chunks[c])
            self._fail_all(out, chunks[c], f"no answer from replica {replica.name} within "
                           f"{self.settings.timeout_s:g} s (reward_model.search_service.timeout_s)")
        if died:  # after the call, so that a set that lost every replica is restarted by the next call instead
            with self._lock:
                left = list(self._replicas)
            self._maybe_top_up(left)
        return out  # type: ignore[return-value]

    def _fail_all(self, out: List[Any], indices: Sequence[int], why: str) -> List[Any]:
        error = SearchUnavailable(f"search service: {why}")
        for i in indices:
            out[i] = error
        self.counters["unavailable"] += len(indices)
        return out

    def _try_restart(self, deadline: float) -> None:
        try:
            self._restart(max(deadline - time.monotonic(), 1.0))  # type: ignore[misc]
            self.counters["restarts"] += 1
        except Exception as exc:  # reported as unavailable searches by the caller; tried again after REFRESH_S
            self._restart_failed_at = time.monotonic()
            logger.warning("search service: could not start the replicas again: %s", exc)

    def search_requests(self, requests: Sequence[Request]) -> List[SearchResult]:
        """Many searches in one call; every error comes back inside its result (`error` filled,
        as `try_search`; a ValueError / TypeError of the engine as `search_unavailable` naming it,
        as the reward classifies it in-process)."""
        results = []
        for (query, k, _), answer in zip(requests, self._ask(requests)):
            if isinstance(answer, SearchResult):
                results.append(answer)
                continue
            if not isinstance(answer, SearchEngineError):
                answer = SearchUnavailable(f"{type(answer).__name__}: {answer}")
            results.append(SearchResult.failed(answer, query=query, engine=self.name, k=k))
        return results

    def search(self, query: str, k: int = 100, **filters: Any) -> SearchResult:
        answer = self._ask([(query, k, filters)])[0]
        if isinstance(answer, Exception):
            raise answer
        return answer

    def batch_search(self, queries: Sequence[str], k: int = 100, threads: int = 1, **filters: Any) -> List[SearchResult]:
        """As `SearchEngine.batch_search` (classified errors inside the results, a ValueError or
        TypeError raised), in one call over the replicas; `threads` is not used."""
        answers = self._ask([(q, k, filters) for q in queries])
        for answer in answers:
            if isinstance(answer, Exception) and not isinstance(answer, SearchEngineError):
                raise answer
        return [a if isinstance(a, SearchResult) else SearchResult.failed(a, query=q, engine=self.name, k=k)
                for q, a in zip(queries, answers)]

    def stats(self) -> Dict[str, float]:
        return {f"service_{k}": float(v) for k, v in sorted(self.counters.items())}


# ----------------------------------------------------------------------------- lifecycle

class SearchService:
    """Starts replica sets (one per engine key, on every node), hands out clients, and kills the
    replicas it created at `stop`. One per process; idempotent."""

    def __init__(self, settings: ServiceSettings):
        self.settings = settings
        self._created: Dict[str, Any] = {}  # replica name -> handle, the ones this process started
        self._clients: Dict[str, ServiceSearchEngine] = {}
        self._failed: Dict[str, Tuple[float, Exception]] = {}  # engine key -> (when, error) of its last failed start
        self._lock = threading.Lock()

    def start(self, engine_key: str, opener: Callable[[], SearchEngine], timeout_s: Optional[float] = None
              ) -> List[Dict[str, Any]]:
        """Make sure every alive node with room holds `replicas_per_node` replicas of the engine
        (existing ones are reused) and that all of them answer; returns their `info()`.
        When a replica cannot open its engine, the engine's own error is raised (SearchUnavailable
        for a missing index, TypeError / ValueError for bad options, as in-process); when one does
        not answer within `timeout_s` (default settings.timeout_s): when some replicas answered, the
        late ones are dropped (killed if this call created them; logged) and the others serve, else
        SearchUnavailable. The replicas created by a failed start are killed."""
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        timeout_s = float(timeout_s if timeout_s is not None else self.settings.timeout_s)
        engine_hash = key_hash(engine_key)
        remote_cls = ray.remote(SearchReplica)
        handles: Dict[str, Any] = {}
        new: List[str] = []
        with self._lock:
            for node in alive_nodes(self.settings.num_cpus):
                for i in range(self.settings.replicas_per_node):
                    name = replica_name(engine_hash, node, i)
                    try:
                        handles[name] = ray.get_actor(name, namespace=SERVICE_NAMESPACE)
                        continue
                    except ValueError:
                        pass
                    handles[name] = remote_cls.options(
                        name=name, namespace=SERVICE_NAMESPACE, num_cpus=self.settings.num_cpus,
                        max_restarts=REPLICA_MAX_RESTARTS, get_if_exists=True,
                        scheduling_strategy=NodeAffinitySchedulingStrategy(node_id=node, soft=False),
                    ).remote(opener, name)
                    self._created[name] = handles[name]
                    new.append(name)
        refs = {handles[n].info.remote(): n for n in handles}
        ready, late = ray.wait(list(refs), num_returns=len(refs), timeout=timeout_s)
        try:
            if not ready:
                raise TimeoutError
            infos = ray.get(ready, timeout=max(timeout_s, 1.0))
        except Exception as exc:
            for name in new:
                self._kill(name)
            why = (f"the replicas did not answer within {timeout_s:g} s (not enough CPUs for num_cpus="
                   f"{self.settings.num_cpus:g} per replica?)" if isinstance(exc, TimeoutError)
                   else f"a replica could not open its engine: {type(exc).__name__}: {str(exc)[:800]}")
            raise SearchUnavailable(f"search service: {why}") from None
        if late:  # e.g. a node without room for its replicas: served by the others
            late_names = sorted(refs[ref] for ref in late)
            logger.warning("search service: %d replica(s) of engine %s did not answer within %g s and were dropped "
                           "(not enough CPUs for num_cpus=%g on their node?): %s", len(late_names), engine_hash,
                           timeout_s, self.settings.num_cpus, ", ".join(late_names))
            for name in late_names:
                if name in new:
                    self._kill(name)
                    new.remove(name)
        failed = [info for info in infos if info.get("error")]
        if failed:
            for name in new:
                self._kill(name)
            raise error_from_payload(failed[0]["error"])
        if new:
            logger.info("search service: started %d replica(s) of engine %s (%d reused)", len(new), engine_hash,
                        len(ready) - len(new))
        return infos

    def client(self, engine_key: str, opener: Callable[[], SearchEngine]) -> ServiceSearchEngine:
        """The client of an engine, its replicas started on first use (see `start`). A failed start
        is not tried again for REFRESH_S seconds: meanwhile every call fails at once with the same
        error (a SearchUnavailable saying when it is tried again), not after another `timeout_s`."""
        with self._lock:
            client = self._clients.get(engine_key)
            failed = self._failed.get(engine_key)
        if client is not None:
            return client
        if failed is not None and time.monotonic() - failed[0] < REFRESH_S:
            when, error = failed
            if isinstance(error, SearchUnavailable):
                raise SearchUnavailable(f"{error} (start failed {time.monotonic() - when:.0f} s ago; tried again "
                                        f"{REFRESH_S:g} s after the failure)")
            raise error
        try:
            infos = self.start(engine_key, opener)
        except Exception as exc:
            with self._lock:
                self._failed[engine_key] = (time.monotonic(), exc)
            raise
        with self._lock:
            self._failed.pop(engine_key, None)
        client = ServiceSearchEngine(engine_key, self.settings, name=infos[0]["engine"] if infos else None,
                                     restart=lambda timeout_s: self.start(engine_key, opener, timeout_s))
        with self._lock:
            return self._clients.setdefault(engine_key, client)

    def _kill(self, name: str) -> None:
        import ray

        handle = self._created.pop(name, None)
        if handle is not None:
            try:
                ray.kill(handle, no_restart=True)
            except Exception:  # already gone
                pass

    def stop(self) -> None:
        """Kill the replicas this process started (sets other processes started stay)."""
        with self._lock:
            for name in list(self._created):
                self._kill(name)
            for client in self._clients.values():
                client._restart = None  # its replica sets are not started again, nor topped up
            self._clients.clear()
