"""The evaluation's searches: the reward's engines, source settings, date filter and search path.

`Searcher` holds what evaluation adds to the reward's search (deepretrieval.rewards.literature):
a K override, a persistent SQLite search cache, per-task custom engines, and an engine identity
that includes a local index's build time (for resume fingerprints and cache keys). Everything a
search depends on (the source configuration, the `max_date` filter, the engine, the error
classes) is the reward's own function, so training recall and evaluation recall are one number.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path
from typing import Any, List, Mapping, Optional, Tuple

from deepretrieval.eval.samples import EvalSample
from deepretrieval.search.local_index import INDEX_META_FILE

logger = logging.getLogger(__name__)


class Searcher:
    """Runs queries through the reward's engine for a data source, with the SQLite search cache."""

    def __init__(
        self,
        reward_config: Any = None,
        k: Optional[int] = None,
        cache: "bool | str | os.PathLike[str] | None" = None,
        engines: Optional[Mapping[str, Any]] = None,
        threads: Optional[int] = None,
    ):
        from deepretrieval.rewards.literature import resolve_config
        from deepretrieval.search.cache import resolve_cache

        if isinstance(reward_config, Mapping) and isinstance(reward_config.get("reward"), Mapping):
            reward_config = reward_config["reward"]  # a whole trainer config was given
        self.config = resolve_config(reward_config)
        self.k = k
        self.cache = resolve_cache(cache)
        self.engines = dict(engines or {})
        self.threads = threads
        self._engine_ids: dict = {}  # task -> engine_id(task), read once per Searcher (every search keys on it)

    def threads_for(self, task: str) -> int:
        """Searches run at once for a task: `threads`, else the reward manager's default per engine
        kind (the live engines wait on the network and rate-limit themselves)."""
        if self.threads:
            return max(1, int(self.threads))
        from deepretrieval.rewards.manager import DEFAULT_WORKERS

        src = self.source(task)
        return int(src.num_workers or DEFAULT_WORKERS.get(src.engine, 1))

    def source(self, task: str) -> Any:
        src = self.config.source(task)
        return dataclasses.replace(src, k=int(self.k)) if self.k else src

    def engine_id(self, task: str) -> str:
        """Identity of the engine for fingerprints and cache keys; a local index adds its build
        time, so rebuilding the index invalidates cached searches and finished records. Computed
        once per task and Searcher (not a stat of the index per search)."""
        if task not in self._engine_ids:
            self._engine_ids[task] = self._read_engine_id(task)
        return self._engine_ids[task]

    def _read_engine_id(self, task: str) -> str:
        if task in self.engines:
            engine = self.engines[task]
            ident = f"custom:{getattr(engine, 'name', type(engine).__name__)}"
            index_dir = getattr(engine, "index_dir", None)
        else:
            src = self.source(task)
            ident = src.engine_key()
            index_dir = None
            if src.engine == "local":
                index_dir = dict(src.engine_options).get("index_dir")
                if index_dir is None:
                    # built now rather than at the first search, so the identity (with the build
                    # time) is the same before and after an interrupted first run
                    from deepretrieval.search.local_index import default_index_dir, ensure_local_index

                    try:
                        index_dir = ensure_local_index(src.index or src.name)
                    except Exception as exc:  # no corpus: every search will report it, classified
                        logger.warning("local index %s unavailable: %s", src.index or src.name, exc)
                        index_dir = default_index_dir(src.index or src.name)
        meta = Path(index_dir) / INDEX_META_FILE if index_dir else None
        if meta is not None and meta.exists():
            ident += f"|built:{meta.stat().st_mtime_ns}"
        return ident

    def search(self, sample: EvalSample, query: str) -> Tuple[List[str], str, str, bool]:
        """(ids, error, detail, cached) for `query`; errors classified, never raised."""
        from deepretrieval.rewards.literature import get_engine, query_sample, run_search
        from deepretrieval.search.base import SearchResult

        src = self.source(sample.task)
        prepared = query_sample(sample.task, query, sample.relevant, sample.extra_info, src)
        key = prepared.cache_key(self.engine_id(sample.task))
        if self.cache is not None:
            hit = self.cache.get(key)
            if hit is not None:
                return [str(i) for i in hit.ids], "none", "", True
        try:
            engine = self.engines.get(sample.task) or get_engine(src)
        except Exception as exc:  # index missing, bad options: the engine is unavailable
            logger.exception("cannot create the engine for %s", sample.task)
            return [], "search_unavailable", f"engine: {exc}", False
        outcome = run_search(prepared, engine)
        if outcome.error == "none" and self.cache is not None:
            self.cache.put(key, SearchResult(ids=outcome.ids, total=outcome.total, query=query, engine=src.engine, k=src.k))
        return outcome.ids, outcome.error, outcome.detail, outcome.cached
