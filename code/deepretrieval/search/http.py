"""HTTP plumbing shared by the live engines: pooled sessions, rate limit, retries, redaction.

Retry policy (`RetryPolicy.delay`), "full jitter" exponential backoff:

    delay(attempt) = uniform(0, min(backoff_max, backoff_base * 2 ** attempt))
    delay          = max(delay, min(Retry-After, retry_after_max))   when the server sent one

Retried: timeouts, connection errors (including a body cut short), HTTP 429 and 5xx, and
whatever an engine's response handler declares transient (`TransientError`: truncated or
malformed JSON, a backend failure reported inside an HTTP 200). Not retried: anything the
handler classifies as final (`QuerySyntaxError`, `SearchUnavailable`). After the last retry
the caller gets `SearchUnavailable`, never an empty result.

Secrets (API keys) are redacted from every message this module produces and from the
`urllib3` debug log, which would otherwise print request URLs with their query strings.
"""

from __future__ import annotations

import email.utils
import logging
import os
import random
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, Mapping, Optional, Set, TypeVar
from urllib.parse import quote, quote_plus

import requests
from requests.adapters import HTTPAdapter

from deepretrieval.search.base import QuerySyntaxError, SearchEngineError, SearchUnavailable
from deepretrieval.search.ratelimit import RateLimiter

logger = logging.getLogger(__name__)

T = TypeVar("T")

RETRY_STATUS = frozenset({429, 500, 502, 503, 504})


class TransientError(Exception):
    """A failure worth retrying; `retry_after` (seconds) if the server asked for a pause."""

    def __init__(self, message: str, retry_after: Optional[float] = None, status: Optional[int] = None):
        super().__init__(message)
        self.retry_after = retry_after
        self.status = status


# -- redaction --------------------------------------------------------------------------
MIN_SECRET_LEN = 8
_SECRETS: Set[str] = set()
_SECRETS_LOCK = threading.Lock()


def register_secret(secret: Optional[str]) -> None:
    """Have `redact` and the urllib3 log filter hide `secret` (and its URL-encoded forms).

    Process-wide, so only strings of at least `MIN_SECRET_LEN` characters are registered
    (NCBI keys are 36): a one-letter test key would otherwise blank that letter in every
    log line. Shorter secrets are still redacted from the owning client's own errors.
    """
    if not secret or len(secret) < MIN_SECRET_LEN:
        return
    with _SECRETS_LOCK:
        _SECRETS.update({secret, quote(secret, safe=""), quote_plus(secret)})
    _install_log_filter()


def redact(text: Any, extra: Iterable[str] = ()) -> str:
    """`text` with every registered secret (and those in `extra`) replaced by `***`."""
    out = str(text)
    with _SECRETS_LOCK:
        secrets = set(_SECRETS)
    secrets.update(s for s in extra if s)
    for secret in sorted(secrets, key=len, reverse=True):
        out = out.replace(secret, "***")
    return out


class Secret:
    """A credential that prints as `***` (repr, str, f-strings, `vars(engine)` dumps).

    `reveal()` gives the value, for the one place that puts it into a request. It pickles
    with its value, so an engine sent to a Ray worker can still authenticate.
    """

    __slots__ = ("_value",)

    def __init__(self, value: str):
        self._value = str(value)
        register_secret(self._value)

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('***')"

    __str__ = lambda self: "***"  # noqa: E731

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)

    def __reduce__(self):
        return (Secret, (self._value,))


class _RedactingFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if _SECRETS:
            try:
                message = record.getMessage()
            except Exception:
                return True
            clean = redact(message)
            if clean != message:
                record.msg, record.args = clean, None
        return True


_FILTER = _RedactingFilter()
_FILTER_LOGGERS = ("urllib3", "urllib3.connectionpool", "urllib3.poolmanager", "urllib3.util.retry",
                   "urllib3.response", "requests")


def _install_log_filter() -> None:
    for name in _FILTER_LOGGERS:
        log = logging.getLogger(name)
        if _FILTER not in log.filters:
            log.addFilter(_FILTER)


# -- retry policy -------------------------------------------------------------------------
@dataclass
class RetryPolicy:
    """How often and how long to wait between attempts (see the module docstring)."""

    max_retries: int = 5
    backoff_base: float = 0.5
    backoff_max: float = 30.0
    retry_after_max: float = 120.0

    def delay(self, attempt: int, retry_after: Optional[float] = None, rng: Optional[random.Random] = None) -> float:
        cap = min(self.backoff_max, self.backoff_base * (2.0 ** attempt))
        wait = (rng or random).uniform(0.0, cap) if cap > 0 else 0.0
        if retry_after is not None:
            wait = max(wait, min(max(retry_after, 0.0), self.retry_after_max))
        return wait


def parse_retry_after(value: Optional[str], now: Optional[float] = None) -> Optional[float]:
    """`Retry-After` as seconds: either delta-seconds or an HTTP date. None if absent/bad."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(float(value), 0.0)
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when is None:
        return None
    return max(when.timestamp() - (now if now is not None else time.time()), 0.0)


def decode_json(response: requests.Response) -> Any:
    """The body as JSON; an unparsable (e.g. truncated) body is a `TransientError`."""
    try:
        return response.json()
    except ValueError as exc:
        snippet = response.text[:80].replace("\n", " ") if response.content else ""
        raise TransientError(f"malformed JSON from server ({exc}); body starts {snippet!r}", status=response.status_code)


# -- client --------------------------------------------------------------------------------
class HttpClient:
    """One pooled `requests.Session` plus limiter, retry policy and redaction for a service.

    `call(method, url, params=..., data=..., handle=fn)` runs attempts until `handle`
    returns. Before each attempt the limiter is acquired. Statuses 429/5xx are transient
    before `handle` sees them; `handle(response)` returns the value, raises
    `TransientError` to retry, or raises a `SearchEngineError` to stop.
    """

    def __init__(
        self,
        service: str,
        limiter: RateLimiter,
        policy: Optional[RetryPolicy] = None,
        timeout: float = 30.0,
        secrets: Iterable[Optional[str]] = (),
        pool_size: int = 32,
        user_agent: Optional[str] = None,
        session: Optional[requests.Session] = None,
    ):
        self.service = service
        self.limiter = limiter
        self.policy = policy or RetryPolicy()
        self.timeout = timeout
        self._secrets = [s for s in secrets if s]
        for secret in self._secrets:
            register_secret(secret)
        self.session = session or requests.Session()
        if session is None:
            adapter = HTTPAdapter(pool_connections=4, pool_maxsize=pool_size, max_retries=0)
            self.session.mount("http://", adapter)
            self.session.mount("https://", adapter)
        if user_agent:
            self.session.headers["User-Agent"] = user_agent
        self._lock = threading.Lock()
        self.counters: Dict[str, int] = {"requests": 0, "retries": 0, "rate_limited": 0, "failures": 0}

    def _count(self, name: str) -> None:
        with self._lock:
            self.counters[name] += 1

    def call(
        self,
        method: str,
        url: str,
        handle: Callable[[requests.Response], T],
        params: Optional[Mapping[str, Any]] = None,
        data: Optional[Mapping[str, Any]] = None,
        what: str = "request",
    ) -> T:
        attempts = self.policy.max_retries + 1
        last = "no attempt made"
        for attempt in range(attempts):
            self.limiter.acquire()
            self._count("requests")
            retry_after = None
            try:
                response = self.session.request(method, url, params=params, data=data, timeout=self.timeout)
                try:
                    if response.status_code in RETRY_STATUS or response.status_code >= 500:
                        retry_after = parse_retry_after(response.headers.get("Retry-After"))
                        if response.status_code == 429:
                            self._count("rate_limited")
                            if retry_after is not None:
                                self.limiter.defer(retry_after)
                        raise TransientError(
                            f"HTTP {response.status_code} {response.reason or ''}".strip(),
                            retry_after=retry_after,
                            status=response.status_code,
                        )
                    return handle(response)
                finally:
                    response.close()
            except SearchEngineError as exc:
                # Final classification by the engine; make sure no secret leaks through it.
                for index, arg in enumerate(exc.args):
                    if isinstance(arg, str):
                        exc.args = exc.args[:index] + (redact(arg, self._secrets),) + exc.args[index + 1:]
                raise
            except TransientError as exc:
                last, retry_after = redact(exc, self._secrets), exc.retry_after
            except requests.Timeout as exc:
                last = f"timeout after {self.timeout:g}s ({type(exc).__name__})"
            except requests.RequestException as exc:
                last = f"{type(exc).__name__}: {redact(exc, self._secrets)}"
            if attempt + 1 < attempts:
                wait = self.policy.delay(attempt, retry_after)
                self._count("retries")
                logger.info(
                    "%s %s failed (%s); retry %d/%d in %.2fs",
                    self.service, what, last, attempt + 1, self.policy.max_retries, wait,
                )
                if wait > 0:
                    time.sleep(wait)
        self._count("failures")
        raise SearchUnavailable(
            f"{self.service} {what} failed after {attempts} attempt{'s' if attempts != 1 else ''}: {last}"
        )

    def close(self) -> None:
        self.session.close()


# -- shared request-parameter helpers -----------------------------------------------------
def parse_date(value: Any, name: str = "date") -> tuple:
    """`"YYYY"`, `"YYYY/MM"`, `"YYYY/MM/DD"` (or with `-`) -> (year, month|None, day|None).

    A malformed date is a configuration error (`ValueError`), not a query fault.
    """
    text = str(value).strip().replace("-", "/").replace(".", "/")
    parts = text.split("/")
    try:
        if not 1 <= len(parts) <= 3 or len(parts[0]) != 4:
            raise ValueError
        numbers = [int(p) for p in parts]
        year, month, day = numbers + [None] * (3 - len(numbers))
        if month is not None and not 1 <= month <= 12:
            raise ValueError
        if day is not None:
            import datetime

            datetime.date(year, month, day)
    except (ValueError, TypeError):
        raise ValueError(f"{name} must look like YYYY, YYYY/MM or YYYY/MM/DD, got {value!r}") from None
    return year, month, day


def date_bound_iso(value: Any, end: bool, name: str = "date") -> str:
    """The first (end=False) or last (end=True) day covered by a partial date, as YYYY-MM-DD."""
    import calendar

    year, month, day = parse_date(value, name)
    if month is None:
        month = 12 if end else 1
    if day is None:
        day = calendar.monthrange(year, month)[1] if end else 1
    return f"{year:04d}-{month:02d}-{day:02d}"


def _rebuild_engine(cls, options):
    return cls(**options)


# -- common engine shell --------------------------------------------------------------------
class LiveSearchEngine:
    """Mixin for the live engines: cache lookup, filter checks, stats and config.

    Subclasses (also `SearchEngine`s) set `name`, `FILTERS`, `self.base_url`, `self.http`,
    `self.cache`, and implement `_fetch(query, k, filters) -> SearchResult`.
    """

    name = "live"
    FILTERS: tuple = ("min_date", "max_date")

    base_url: str
    http: HttpClient
    cache: Any

    _options: Dict[str, Any]

    def _remember_options(self, options: Dict[str, Any]) -> None:
        """Keep the constructor arguments so the engine can be pickled (sent to Ray workers):
        sessions, locks and connections are rebuilt on the other side, not copied. The
        pickle carries the API key if one was passed explicitly (as Ray needs to rebuild
        the engine); set `NCBI_API_KEY` on the workers instead to keep it out of pickles."""
        self._options = {k: v for k, v in options.items() if k not in ("self", "__class__")}

    def __reduce__(self):
        options = dict(self._options)
        cache = options.get("cache")
        if cache is not None and not isinstance(cache, (bool, str, os.PathLike)):
            options["cache"] = str(cache.path)  # a SearchCache object: reopen the same file
            options["cache_ttl"] = options.get("cache_ttl") or cache.ttl
        return (_rebuild_engine, (type(self), options))

    def _check_filters(self, filters: Mapping[str, Any]) -> Dict[str, Any]:
        unknown = sorted(k for k, v in filters.items() if v is not None and k not in self.FILTERS)
        if unknown:
            raise ValueError(f"{self.name} engine does not support filter(s) {unknown}; known: {list(self.FILTERS)}")
        return {k: v for k, v in filters.items() if v is not None}

    def _cache_identity(self, filters: Mapping[str, Any]) -> Dict[str, Any]:
        """Filters plus any engine option that changes the answer (subclasses extend)."""
        return dict(filters)

    def search(self, query: str, k: int = 100, **filters: Any):  # -> SearchResult
        from deepretrieval.search.cache import cache_key

        start = time.perf_counter()
        if not isinstance(k, int) or isinstance(k, bool) or k < 1:
            raise ValueError(f"k must be a positive integer, got {k!r}")
        clean = self._check_filters(filters)
        if not isinstance(query, str) or not query.strip():
            # Both services would answer an empty query with everything or an error: the
            # query writer's fault, caught before spending a request on it.
            raise QuerySyntaxError("empty query", position=0, query=query if isinstance(query, str) else None)
        key = None
        if self.cache is not None:
            key = cache_key(self.name, self.base_url, query, k, self._cache_identity(clean))
            hit = self.cache.get(key)
            if hit is not None:
                hit.elapsed_s = time.perf_counter() - start
                return hit
        result = self._fetch(query, k, clean)
        result.elapsed_s = time.perf_counter() - start
        if self.cache is not None and key is not None:
            self.cache.put(key, result)
        return result

    def _fetch(self, query: str, k: int, filters: Dict[str, Any]):  # pragma: no cover - abstract
        raise NotImplementedError

    def stats(self) -> Dict[str, float]:
        """Counters for metrics: HTTP requests/retries/429s/failures, limiter wait, cache."""
        out: Dict[str, float] = {f"http_{k}": float(v) for k, v in self.http.counters.items()}
        out["ratelimit_wait_s"] = float(self.http.limiter.waited_s)
        if self.cache is not None:
            out.update({f"cache_{k}": float(v) for k, v in self.cache.stats().items()})
        return out

    def close(self) -> None:
        self.http.close()
        self.http.limiter.close()
        if self.cache is not None and getattr(self, "_owns_cache", False):
            self.cache.close()
