"""The tiered recall reward of DeepRetrieval for literature search.

    score = format_part + answer_part

    format_part  = format_score (+1)        if the tags are right (parsing.check_format)
                 = format_penalty (-4)      otherwise, or a response over parsing.MAX_RESPONSE_CHARS
                                            (error "too_long"); then there is no search and answer_part = 0
    answer_part  = tier(recall@K)           recall@K = |top-K retrieved ∩ targets| / |targets|
                                            (search.metrics.recall_at_k; 0 without targets)
                 = answer_error_penalty (-4)   no JSON object / no "query" string / blank query
                 = query_syntax_penalty (-4)   the engine rejected the query, or it is longer than
                                               parsing.MAX_QUERY_CHARS (the model's fault)
    tier(r)      = 5 if r >= 0.7, 4 if r >= 0.5, 3 if r >= 0.4, 1 if r >= 0.3, 0.5 if r >= 0.1,
                   0.1 if r >= 0.05, else -3.5                 (thresholds inclusive)
                 = recall_scale * r     when `recall_scale` is set (a linear reward in place of the
                                        tiers: every extra relevant document counts, where the tiers
                                        pay the same for recall 0.1 and 0.29; the CPU recipe's)

A row whose prompt style adds the answer to the input (`expand`: data.prompts.style_expands) is searched
as its input's bag of words OR the written query (`searched_query`, search.text.expanded_query), in
training and in evaluation alike; the reward's `query` is then that searched query.

The tier values, the format bonus/penalty and the -4 for an answer that fails to evaluate are
those of the original DeepRetrieval reward (verl/utils/reward_score/literature.py), but the
defaults do NOT reproduce it exactly:
  * answer parsing is lenient by default (`strict_json: false`, `parsing.parse_answer`): code
    fences, single quotes, trailing commas, text around the object, raw newlines/tabs in strings,
    two objects and Python literals are read, where the original's `json.loads` failed and gave
    -4 (total -3). Lenient is the default because a policy should be rewarded for its query, not
    for JSON punctuation, and an LLM evaluated with the same parser is measured on its queries.
    `strict_json: true` (`parsing.parse_answer_strict`) is the original's reading, including its
    answer score 0 for a blank `<answer>` block (error `empty_answer`); the reproduction
    (docs/original.md) uses it;
  * a `search_unavailable` sample (network, rate limit, server error) is not the model's fault:
    it gets `search_unavailable_score` (0) and `search_unavailable=True`, so the trainer can leave
    it out of the update (the original scored it -4, total -3);
  * the live sources default to recall@3000 (the original trained first on all results, up to
    9,999, then 1-2 epochs at 3,000), and the PubMed engine's own defaults for sort order and date
    floor (`sort=relevance`, `open_min_date=1000/01/01`; the original sent no sort and 1970/01/01).

Configuration (the trainer's `reward` section; dict or DictConfig) overrides any default and maps
each data source to its engine:

    reward:
      format_score: 1.0
      strict_json: false                        # true: the original's json.loads reading
      tiers: [[0.7, 5], [0.5, 4], ...]        # (min recall, reward), any order
      below_tiers_score: -3.5
      sources:                                  # or the same keys at the top level
        pubmed_mini: {engine: local, index: pubmed_mini, k: 100}
        pubmed: {engine: pubmed, k: 3000, use_pub_date: true, base_url: ..., cache: ...}

Keys of a source other than the reserved ones (`SOURCE_KEYS` and the scoring keys) are passed
to `make_engine(engine, **options)`. No key is ignored: `validate_reward_section` rejects, with a
`RewardConfigError` naming the key and the accepted spellings, any top-level key that is neither a
scoring key, `sources`, `num_workers`, `strict_json` nor a source section, a source section without
`engine` that is not a known source (`reward.pubmed.k=9999` and `reward.sources.pubmed.k=9999` both
set the pubmed source), and a source key that is neither reserved nor a parameter of the engine's
constructor. Data source `literature` (parquet files of the original DeepRetrieval preprocessing)
is routed to the `pubmed` source (`SOURCE_ALIASES`), with the format check of the original prompt
(which opens `<think>`) unless the source sets `think_in_prompt`. A local source without `index_dir` uses the vendored corpus
named by `index` (default: the data source name), built on first use (deepretrieval.search.local_index).
Engines are created lazily, once per process, keyed by their options, so the function-style
`compute_score` works inside Ray workers. With `use_search_service` (the trainer's
`reward_model.search_service`) the sources of the served engine kinds search through Ray actors
shared by every process of the run (deepretrieval.search.service), with the same results.
"""

from __future__ import annotations

import copy
import functools
import json
import logging
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any, Dict, List, Optional, Sequence, Tuple

from deepretrieval.rewards.parsing import (
    ERROR_FORMAT,
    ERROR_NONE,
    ERROR_QUERY_SYNTAX,
    ERROR_EMPTY_ANSWER,
    ERROR_SEARCH_UNAVAILABLE,
    ERROR_TOO_LONG,
    check_format,
    parse_answer,
    parse_answer_strict,
)
from deepretrieval.search.base import ENGINES as _ENGINE_REGISTRY
from deepretrieval.search.base import (QuerySyntaxError, SearchEngine, SearchEngineError, SearchResult, SearchUnavailable,
                                       make_engine)
from deepretrieval.search.metrics import recall_at_k
from deepretrieval.search.text import expanded_query

logger = logging.getLogger(__name__)

DEFAULT_TIERS: Tuple[Tuple[float, float], ...] = (
    (0.7, 5.0),
    (0.5, 4.0),
    (0.4, 3.0),
    (0.3, 1.0),
    (0.1, 0.5),
    (0.05, 0.1),
)

# Per data source defaults: live tasks recall@3000, local tasks recall@100.
DEFAULT_SOURCES: Dict[str, Dict[str, Any]] = {
    "pubmed": {"engine": "pubmed", "k": 3000, "use_pub_date": True},
    "ctgov": {"engine": "ctgov", "k": 3000, "use_pub_date": False},
    "pubmed_mini": {"engine": "local", "index": "pubmed_mini", "k": 100},
    "trials_sigir": {"engine": "local", "index": "trials_sigir", "k": 100},
}

# Keys of a source entry that configure scoring, not the engine constructor.
SOURCE_KEYS = ("engine", "k", "use_pub_date", "index", "num_workers", "reasoning", "think_in_prompt", "strict_json")

# Data sources that read another source's settings: the original DeepRetrieval parquet files say
# "literature" for publication search on PubMed.
SOURCE_ALIASES: Dict[str, str] = {"literature": "pubmed"}

# Top-level keys of the reward section besides the scoring keys and the source sections.
TOP_LEVEL_KEYS = ("sources", "num_workers", "strict_json")


@dataclass(frozen=True)
class ScoringConfig:
    """Reward values; every field can be overridden globally or per data source."""

    format_score: float = 1.0
    format_penalty: float = -4.0
    tiers: Tuple[Tuple[float, float], ...] = DEFAULT_TIERS
    below_tiers_score: float = -3.5
    answer_error_penalty: float = -4.0
    query_syntax_penalty: float = -4.0
    search_unavailable_score: float = 0.0
    recall_scale: Optional[float] = None  # set: answer_part = recall_scale * recall, no tiers

    @classmethod
    def field_names(cls) -> Tuple[str, ...]:
        return tuple(f.name for f in fields(cls))


@dataclass(frozen=True)
class SourceConfig:
    """How one data source is searched and scored."""

    name: str
    engine: str
    k: int
    use_pub_date: bool = False
    index: Optional[str] = None
    num_workers: Optional[int] = None
    reasoning: Optional[bool] = None  # None: read extra_info.prompt_style (default True)
    think_in_prompt: Optional[bool] = None  # None: read extra_info.think_in_prompt (default False)
    strict_json: bool = False  # True: parsing.parse_answer_strict (the original's json.loads)
    engine_options: Tuple[Tuple[str, Any], ...] = ()
    scoring: ScoringConfig = field(default_factory=ScoringConfig)

    def engine_key(self) -> str:
        """Identity of the engine instance this source uses (shared between sources when equal)."""
        options = dict(self.engine_options)
        if self.engine == "local" and "index_dir" not in options:
            options["index"] = self.index or self.name
        return json.dumps([self.engine, options], sort_keys=True, default=str)


def _to_plain(config: Any) -> Dict[str, Any]:
    if config is None:
        return {}
    try:
        from omegaconf import DictConfig, OmegaConf

        if isinstance(config, DictConfig):
            return OmegaConf.to_container(config, resolve=True)  # type: ignore[return-value]
    except ImportError:  # omegaconf is a dependency, but the reward must not need it
        pass
    return copy.deepcopy(dict(config))


def _scoring_overrides(section: Mapping[str, Any]) -> Dict[str, Any]:
    out = {}
    for name in ScoringConfig.field_names():
        if name in section and section[name] is not None:
            value = section[name]
            if name == "tiers":
                items = value.items() if isinstance(value, Mapping) else value
                value = tuple(sorted(((float(t), float(r)) for t, r in items), reverse=True))
            else:
                value = float(value)
            out[name] = value
    return out


class RewardConfigError(ValueError):
    """A problem in the `reward` section; `key` is the dotted key at fault (under `reward.`)."""

    def __init__(self, key: str, reason: str):
        self.key = key
        self.reason = reason
        super().__init__(f"config key '{key}': {reason}")


def engine_parameters(engine: str) -> Optional[Tuple[str, ...]]:
    """Constructor parameters of a registered engine (None when it takes **kwargs it uses; a
    catch-all named `_...`, such as the local engine's `**_ignored`, accepts nothing from a config)."""
    import importlib
    import inspect

    target = _ENGINE_REGISTRY[engine]
    if isinstance(target, str):
        module_name, _, attr = target.partition(":")
        target = getattr(importlib.import_module(module_name), attr)
    params = inspect.signature(target).parameters.values()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD and not p.name.startswith("_") for p in params):
        return None
    return tuple(p.name for p in params if p.name != "self" and p.kind is not inspect.Parameter.VAR_KEYWORD)


def _check_source_entry(path: str, name: str, entry: Any, engine: Optional[str]) -> None:
    if not isinstance(entry, Mapping):
        raise RewardConfigError(path, f"a source section must be a mapping of keys, got {entry!r}")
    engine = entry.get("engine", engine)
    if engine is None:
        raise RewardConfigError(f"{path}.engine", f"reward source {name!r} has no engine: it is not a known source "
                                f"({', '.join(sorted(DEFAULT_SOURCES))}); a new source needs engine= (one of "
                                f"{', '.join(sorted(_ENGINE_REGISTRY))})")
    if engine not in _ENGINE_REGISTRY:
        raise RewardConfigError(f"{path}.engine", f"unknown search engine {engine!r}; known: {', '.join(sorted(_ENGINE_REGISTRY))}")
    reserved = set(SOURCE_KEYS) | set(ScoringConfig.field_names())
    allowed = engine_parameters(str(engine))
    for key in entry:
        if key in reserved or allowed is None or key in allowed:
            continue
        raise RewardConfigError(f"{path}.{key}", f"unknown key for a source of engine {engine!r}; accepted: "
                                f"{', '.join(sorted(reserved | set(allowed)))}")


def validate_reward_section(plain: Mapping[str, Any]) -> Dict[str, Dict[str, Any]]:
    """Check every key of a plain `reward` section (see the module docstring); returns the source
    sections it sets, by name (from `sources:` and from the top level). Raises RewardConfigError."""
    scoring_keys = set(ScoringConfig.field_names())
    given: Dict[str, Dict[str, Any]] = {}
    sections: List[Tuple[str, str, Any]] = []
    for key, value in plain.items():
        key = str(key)
        if key == "sources":
            if value is None:
                continue
            if not isinstance(value, Mapping):
                raise RewardConfigError("reward.sources", f"must map source names to sections, got {value!r}")
            sections.extend((f"reward.sources.{n}", str(n), e) for n, e in value.items())
        elif key in scoring_keys or key in TOP_LEVEL_KEYS:
            continue
        elif isinstance(value, Mapping):
            sections.append((f"reward.{key}", key, value))
        else:
            accepted = sorted(scoring_keys | set(TOP_LEVEL_KEYS))
            hint = ""
            if key in SOURCE_KEYS:
                hint = f" ('{key}' belongs to a source: reward.<source>.{key} or reward.sources.<source>.{key})"
            raise RewardConfigError(f"reward.{key}", f"unknown key{hint}; accepted: {', '.join(accepted)}, or a "
                                    f"source section reward.<source>.<key> (known sources: "
                                    f"{', '.join(sorted(DEFAULT_SOURCES))})")
    for path, name, entry in sections:
        if name in SOURCE_ALIASES and not (isinstance(entry, Mapping) and "engine" in entry):
            target = SOURCE_ALIASES[name]
            raise RewardConfigError(path, f"data source {name!r} reads the {target!r} source's settings: set "
                                    f"reward.{target}.<key> (or reward.sources.{target}.<key>), or give {name!r} "
                                    f"its own engine=")
        _check_source_entry(path, name, entry, DEFAULT_SOURCES.get(name, {}).get("engine"))
        given[name] = {**given.get(name, {}), **dict(entry or {})}
    return given


@dataclass(frozen=True)
class RewardConfig:
    """The parsed `reward` section: global scoring values plus one SourceConfig per data source."""

    scoring: ScoringConfig
    sources: Dict[str, SourceConfig]

    @classmethod
    def from_config(cls, config: Any = None) -> "RewardConfig":
        plain = _to_plain(config)
        given = validate_reward_section(plain)
        scoring = ScoringConfig(**_scoring_overrides(plain))
        strict_default = bool(plain.get("strict_json") or False)
        raw_sources = {name: dict(entry) for name, entry in DEFAULT_SOURCES.items()}
        for name, entry in given.items():
            entry = dict(entry or {})
            if "engine" in entry and entry["engine"] != raw_sources.get(name, {}).get("engine"):
                raw_sources[name] = entry  # a different engine: defaults of the old one do not apply
            else:
                raw_sources.setdefault(name, {}).update(entry)
        sources = {}
        for name, entry in raw_sources.items():
            if "engine" not in entry:
                raise ValueError(f"reward source {name!r} has no engine")
            scoring_keys = set(ScoringConfig.field_names())
            options = {
                k: v for k, v in entry.items() if k not in SOURCE_KEYS and k not in scoring_keys
            }
            sources[name] = SourceConfig(
                name=name,
                engine=str(entry["engine"]),
                k=int(entry.get("k", 100)),
                use_pub_date=bool(entry.get("use_pub_date", False)),
                index=entry.get("index"),
                num_workers=entry.get("num_workers"),
                reasoning=entry.get("reasoning"),
                think_in_prompt=entry.get("think_in_prompt"),
                strict_json=bool(entry["strict_json"]) if entry.get("strict_json") is not None else strict_default,
                engine_options=tuple(sorted(options.items())),
                scoring=replace(scoring, **_scoring_overrides(entry)),
            )
        return cls(scoring=scoring, sources=sources)

    def source(self, data_source: str) -> SourceConfig:
        if data_source not in self.sources and SOURCE_ALIASES.get(data_source) in self.sources:
            target = self.sources[SOURCE_ALIASES[data_source]]
            # the original prompt opens <think> itself; a source that says otherwise wins
            return target if target.think_in_prompt is not None else replace(target, think_in_prompt=True)
        if data_source not in self.sources:
            raise KeyError(
                f"no reward source configured for data_source {data_source!r}; "
                f"known: {', '.join(sorted(self.sources))}"
            )
        return self.sources[data_source]


# ---------------------------------------------------------------- pure scoring functions


def tier_reward(
    recall: float, tiers: Sequence[Tuple[float, float]] = DEFAULT_TIERS, below: float = -3.5
) -> Tuple[float, float]:
    """(reward, threshold reached) for a recall; thresholds inclusive, threshold 0.0 when below all."""
    for threshold, reward in sorted(tiers, reverse=True):
        # tolerance: 7/10 computed as a float must reach the 0.7 tier
        if recall >= threshold - 1e-12:
            return float(reward), float(threshold)
    return float(below), 0.0


def _targets_of(ground_truth: Any) -> List[str]:
    if isinstance(ground_truth, Mapping):
        target = ground_truth.get("target")
    else:
        target = ground_truth
    if target is None:
        return []
    if isinstance(target, str):
        return [target]
    return [str(t) for t in list(target)]


def _flag(extra_info: Optional[Mapping[str, Any]], key: str, configured: Optional[bool], default: bool) -> bool:
    if configured is not None:
        return bool(configured)
    if extra_info and extra_info.get(key) is not None:
        return bool(extra_info.get(key))
    return default


def format_flags(source: SourceConfig, extra_info: Optional[Mapping[str, Any]]) -> Tuple[bool, bool]:
    """(reasoning, think_in_prompt) of the format check for a row: the source's setting when it has
    one, else the row's (reasoning unless its `prompt_style` answers only: data.prompts.style_reasons;
    `think_in_prompt`, default False)."""
    # reasoning unless the source says otherwise or the row's prompt style asks for the answer only
    # (imported here, not at the top: data.prompts imports rewards.parsing, and so this package)
    from deepretrieval.data.prompts import style_reasons

    reasoning_default = style_reasons(extra_info)
    reasoning = bool(source.reasoning) if source.reasoning is not None else reasoning_default
    return reasoning, _flag(extra_info, "think_in_prompt", source.think_in_prompt, False)


def searched_query(query: Optional[str], extra_info: Optional[Mapping[str, Any]],
                   expands: Optional[bool] = None) -> Optional[str]:
    """What is searched for a written `query`: the query itself, or where the row's prompt style adds
    the answer to the input (`expands`; None: data.prompts.style_expands of the row), the input's bag
    of words OR the query (search.text.expanded_query over `extra_info.task_input`)."""
    from deepretrieval.data.prompts import style_expands

    if query is None or not (style_expands(extra_info) if expands is None else expands):
        return query
    task_input = (extra_info or {}).get("task_input")
    if not isinstance(task_input, str):
        raise ValueError("the row's prompt style adds the answer to the input, but the row has no "
                         "extra_info.task_input (rewrite the data with this version)")
    return expanded_query(task_input, query)


def search_filters(source: SourceConfig, extra_info: Optional[Mapping[str, Any]]) -> Dict[str, Any]:
    """The engine filters of a row's searches: `max_date` = the row's `pub_date` where the source
    restricts searches to records published up to it (`use_pub_date`), else none."""
    if source.use_pub_date and extra_info and extra_info.get("pub_date"):
        return {"max_date": str(extra_info["pub_date"])}
    return {}


@dataclass
class PreparedSample:
    """A response after parsing, before searching: what to search (if anything) and with what."""

    data_source: str
    format_ok: bool
    query: Optional[str]
    error: str
    detail: str
    targets: List[str]
    source: SourceConfig
    filters: Dict[str, Any]

    @property
    def needs_search(self) -> bool:
        return self.error == ERROR_NONE and self.query is not None

    def search_key(self) -> Tuple[str, str, int, str]:
        """Samples with equal keys share one search."""
        override = _OVERRIDES.get(self.source.name)
        engine_id = f"override:{self.source.name}:{id(override)}" if override is not None else self.source.engine_key()
        return (
            engine_id,
            self.query or "",
            self.source.k,
            json.dumps(self.filters, sort_keys=True, default=str),
        )

    def cache_key(self, engine_id: str) -> str:
        """The persistent search cache's key (deepretrieval.search.cache) for this sample's search
        on the engine identified by `engine_id`."""
        from deepretrieval.search.cache import cache_key

        return cache_key(engine_id, "", self.query or "", self.source.k, self.filters)


def query_sample(
    data_source: str, query: str, targets: Any, extra_info: Optional[Mapping[str, Any]], source: SourceConfig
) -> PreparedSample:
    """A query given as it is (no response to parse or format to check), ready for `run_search`:
    the same source settings and filters as a parsed response of that row would get."""
    return PreparedSample(
        data_source=data_source, format_ok=True, query=query, error=ERROR_NONE, detail="",
        targets=_targets_of(targets), source=source, filters=search_filters(source, extra_info),
    )


def prepare_sample(
    data_source: str,
    solution_str: str,
    ground_truth: Any,
    extra_info: Optional[Mapping[str, Any]],
    config: RewardConfig,
) -> PreparedSample:
    source = config.source(data_source)
    reasoning, think_in_prompt = format_flags(source, extra_info)
    parsed = parse_answer_strict(solution_str) if source.strict_json else parse_answer(solution_str)
    if parsed.error == ERROR_TOO_LONG:  # over the length budget: not checked further, scored as bad format
        format_ok, format_detail = False, parsed.detail
    else:
        format_ok, format_detail = check_format(solution_str, think_in_prompt=think_in_prompt, reasoning=reasoning)
    if not format_ok:
        # the original never searched a badly formatted response; the parsed query is still logged
        error, detail = (ERROR_TOO_LONG if parsed.error == ERROR_TOO_LONG else ERROR_FORMAT), format_detail
    else:
        error, detail = parsed.error, parsed.detail
    return PreparedSample(
        data_source=data_source,
        format_ok=format_ok,
        query=searched_query(parsed.query, extra_info) if error == ERROR_NONE else parsed.query,
        error=error,
        detail=detail,
        targets=_targets_of(ground_truth),
        source=source,
        filters=search_filters(source, extra_info),
    )


@dataclass
class SearchOutcome:
    """What one search produced: ids, or a classified error."""

    ids: List[str]
    error: str = ERROR_NONE
    detail: str = ""
    total: Optional[int] = None  # the match count when the engine counted it (the reward needs only the ids)
    elapsed_s: float = 0.0
    cached: bool = False


def _unsearched_answer_score(error: str, scoring: Any) -> float:
    """The answer part of the score of a sample that was never searched: nothing without a readable
    answer block (`format`, `too_long`) or for a blank one (`empty_answer`, strict reading only: the
    original scored it 0); the syntax penalty for a query rejected before any search (over the
    length budget); the answer-error penalty otherwise (`json`, `empty_query`)."""
    if error in (ERROR_FORMAT, ERROR_TOO_LONG, ERROR_EMPTY_ANSWER):
        return 0.0
    if error == ERROR_QUERY_SYNTAX:
        return scoring.query_syntax_penalty
    return scoring.answer_error_penalty


def finish_sample(sample: PreparedSample, outcome: Optional[SearchOutcome]) -> Dict[str, Any]:
    """Combine a prepared sample and its search outcome into the reward dict."""
    scoring = sample.source.scoring
    result: Dict[str, Any] = {
        "score": 0.0,
        "format_ok": sample.format_ok,
        "query": sample.query,
        "recall": 0.0,
        "n_retrieved": 0,
        "error": sample.error,
        "error_detail": sample.detail,
        "tier": None,
        "format_score": scoring.format_score if sample.format_ok else scoring.format_penalty,
        "answer_score": 0.0,
        "search_unavailable": False,
        "n_targets": len(sample.targets),
        "search_time_s": 0.0,
        "cached": False,
    }
    if sample.error != ERROR_NONE:
        result["answer_score"] = _unsearched_answer_score(sample.error, scoring)
    elif outcome is None:
        raise ValueError("a sample that needs a search was finished without a search outcome")
    else:
        result["search_time_s"] = outcome.elapsed_s
        result["cached"] = outcome.cached
        if outcome.error == ERROR_QUERY_SYNTAX:
            result.update(error=ERROR_QUERY_SYNTAX, error_detail=outcome.detail)
            result["answer_score"] = scoring.query_syntax_penalty
        elif outcome.error != ERROR_NONE:
            result.update(
                error=ERROR_SEARCH_UNAVAILABLE,
                error_detail=outcome.detail,
                search_unavailable=True,
                recall=None,
                score=scoring.search_unavailable_score,
            )
            return result
        else:
            retrieved = outcome.ids[: sample.source.k]
            recall = recall_at_k(retrieved, sample.targets)
            if recall is None:  # no targets: recall is undefined; a training sample scores it as 0
                logger.warning("%s: sample without targets; recall set to 0", sample.data_source)
                recall = 0.0
            if scoring.recall_scale is not None:
                answer, tier = scoring.recall_scale * recall, None
            else:
                answer, tier = tier_reward(recall, scoring.tiers, scoring.below_tiers_score)
            result.update(recall=recall, n_retrieved=len(retrieved), tier=tier, answer_score=answer)
    result["score"] = float(result["format_score"] + result["answer_score"])
    return result


# ---------------------------------------------------------------- engines (lazy, one per process)

_ENGINES: Dict[str, SearchEngine] = {}
_ENGINES_LOCK = threading.Lock()
_OVERRIDES: Dict[str, SearchEngine] = {}


def set_engine(data_source: str, engine: Optional[SearchEngine]) -> None:
    """Use `engine` for `data_source` in this process (tests, custom engines); None removes it."""
    if engine is None:
        _OVERRIDES.pop(data_source, None)
    else:
        _OVERRIDES[data_source] = engine


def open_engine(source: SourceConfig) -> SearchEngine:
    """A new engine for a source (a local source without `index_dir` opens the vendored corpus
    named by `index`, built on first use)."""
    options = dict(source.engine_options)
    if source.engine == "local" and "index_dir" not in options:
        from deepretrieval.search.local_index import ensure_local_index

        options["index_dir"] = str(ensure_local_index(source.index or source.name))
    return make_engine(source.engine, **options)


def get_engine(source: SourceConfig) -> SearchEngine:
    """The process-wide engine for a source, created on first use (a client of the search service
    when `use_search_service` serves the source's engine kind)."""
    if source.name in _OVERRIDES:
        return _OVERRIDES[source.name]
    if _SERVICE is not None and source.engine in _SERVICE.settings.engines:
        return _SERVICE.client(source.engine_key(), functools.partial(open_engine, source))
    key = source.engine_key()
    engine = _ENGINES.get(key)
    if engine is not None:
        return engine
    with _ENGINES_LOCK:
        engine = _ENGINES.get(key)
        if engine is None:
            engine = _ENGINES[key] = open_engine(source)
    return engine


# ---------------------------------------------------------------- the search service (optional)

_SERVICE: Optional[Any] = None  # a deepretrieval.search.service.SearchService


def use_search_service(settings: Optional[Any]) -> None:
    """Serve the engine kinds named in `settings.engines` (a search.service.ServiceSettings) through
    Ray actors in this process (Ray must be up); None kills the replicas this process started and
    searches in-process again. Calling it again with equal settings keeps the running service."""
    global _SERVICE
    if _SERVICE is not None and settings == _SERVICE.settings:
        return
    if _SERVICE is not None:
        _SERVICE.stop()
        _SERVICE = None
    if settings is not None:
        from deepretrieval.search.service import SearchService

        _SERVICE = SearchService(settings)


def clear_engines() -> None:
    """Close and forget the process-wide engines."""
    with _ENGINES_LOCK:
        for engine in _ENGINES.values():
            try:
                engine.close()
            except Exception:  # closing is best effort
                logger.debug("engine close failed", exc_info=True)
        _ENGINES.clear()


def run_search(sample: PreparedSample, engine: Optional[SearchEngine] = None) -> SearchOutcome:
    """Search a prepared sample's query; search errors come back classified, never raised.

    An engine that cannot be *configured* (unknown engine name, bad options) raises: that is a
    setup mistake, not a transient failure to leave out of the update."""
    start = time.perf_counter()
    if engine is None:
        try:
            engine = get_engine(sample.source)
        except SearchEngineError as exc:  # e.g. the index cannot be opened; config errors raise
            return SearchOutcome([], ERROR_SEARCH_UNAVAILABLE, f"engine: {exc}", elapsed_s=time.perf_counter() - start)
    try:
        result = engine.search(sample.query or "", k=sample.source.k, **sample.filters)
    except QuerySyntaxError as exc:
        return SearchOutcome([], ERROR_QUERY_SYNTAX, str(exc), elapsed_s=time.perf_counter() - start)
    except (SearchUnavailable, SearchEngineError) as exc:
        return SearchOutcome([], ERROR_SEARCH_UNAVAILABLE, str(exc), elapsed_s=time.perf_counter() - start)
    except Exception as exc:  # an engine bug must not kill a training run; it is counted, not scored
        logger.exception("search failed unexpectedly for %r", sample.query)
        return SearchOutcome(
            [], ERROR_SEARCH_UNAVAILABLE, f"{type(exc).__name__}: {exc}", elapsed_s=time.perf_counter() - start
        )
    return outcome_of(result, time.perf_counter() - start)


def outcome_of(result: SearchResult, elapsed_s: float) -> SearchOutcome:
    """The outcome of a search that returned `result` (which may report a classified error)."""
    if result.error:  # an engine may report instead of raising
        kind = result.error.get("type")
        error = ERROR_QUERY_SYNTAX if kind == ERROR_QUERY_SYNTAX else ERROR_SEARCH_UNAVAILABLE
        return SearchOutcome([], error, result.error.get("message", ""), elapsed_s=elapsed_s)
    return SearchOutcome(ids=[str(i) for i in result.ids], total=result.total, elapsed_s=elapsed_s,
                         cached=bool(result.cached))


def run_searches(samples: Sequence[PreparedSample], engine: Any) -> List[SearchOutcome]:
    """Search many prepared samples in one call of an engine that takes a batch of requests
    (`search_requests`, the search service's client); errors come back classified, as in
    `run_search`. Each outcome's `elapsed_s` is the engine's own time for that search."""
    try:
        results = engine.search_requests([(s.query or "", s.source.k, s.filters) for s in samples])
    except Exception as exc:  # a service bug must not kill a training run; the searches are counted
        logger.exception("batched search failed unexpectedly")
        return [SearchOutcome([], ERROR_SEARCH_UNAVAILABLE, f"{type(exc).__name__}: {exc}") for _ in samples]
    return [outcome_of(r, float(r.elapsed_s)) for r in results]


# ---------------------------------------------------------------- verl entry point

@functools.lru_cache(maxsize=1)
def _default_config() -> RewardConfig:
    """The default reward configuration, built once per process."""
    return RewardConfig.from_config(None)


def resolve_config(config: Any = None) -> RewardConfig:
    """`config` as a RewardConfig (a mapping or section is parsed; None: the defaults)."""
    if isinstance(config, RewardConfig):
        return config
    if config is not None:
        return RewardConfig.from_config(config)
    return _default_config()


def compute_score(
    data_source: str,
    solution_str: str,
    ground_truth: Any,
    extra_info: Optional[Mapping[str, Any]] = None,
    config: Any = None,
    engine: Optional[SearchEngine] = None,
) -> Dict[str, Any]:
    """verl's reward signature: score one decoded response.

    Returns a dict with `score`, `format_ok`, `query`, `recall` (None when the search was
    unavailable), `n_retrieved`, `error` (none | too_long | format | json | empty_query | query_syntax |
    search_unavailable | empty_answer (strict_json only)), `tier` (recall threshold reached; 0.0 below all;
    None without recall),
    `format_score`, `answer_score`, `search_unavailable`, `error_detail`, `search_time_s`, `cached`.
    """
    cfg = resolve_config(config)
    sample = prepare_sample(data_source, solution_str, ground_truth, extra_info, cfg)
    outcome = run_search(sample, engine) if sample.needs_search else None
    return finish_sample(sample, outcome)
