"""HTTP plumbing shared by the live engines: pooled sessions, rate limit, retries, redaction.

Retry policy (`RetryPolicy.delay`), "full jitter" exponential backoff:

    delay(attempt) = uniform(0, min(backoff_max, backoff_base * 2 ** attempt))
    delay          = max(delay, min(Retry-After, retry_after_max))   when the server sent one

Retried: timeouts, connection errors (including a body cut short), HTTP 429 and 5xx, and
whatever an engine's response handler declares transient (`TransientError`: truncated or
malformed JSON, a backend failure reported inside an HTTP 200, an answer that contradicts
itself). Not retried: anything the handler classifies as final (`QuerySyntaxError`,
`SearchUnavailable`). After the last retry the caller gets `SearchUnavailable`, never an
empty result.

Bounds (each failure is a `SearchUnavailable` subclass whose `reason` names it; `kind` stays
"search_unavailable", so the reward leaves the sample out instead of penalising it):
  * `Deadline`: one total budget per search (`deadline_s`, default `DEFAULT_DEADLINE_S`),
    across pages, retries, backoff sleeps and rate-limit waits. Every socket read of a body
    waits at most what is left of it, and a timer (`_Watch`) shuts the connection down if
    the status line and headers have not all arrived by then, so a server that stalls or
    drips a byte at a time cannot hold a search past it (reason "deadline").
  * `Retry-After` (seconds or an HTTP date) is capped at `retry_after_max` (default
    `ratelimit.RETRY_AFTER_MAX_S`) for this caller's sleep *and* for the shared limiter; a
    pause the deadline cannot afford fails the search at once. Every server-requested pause
    is counted (`retry_after`, `retry_after_s`) and logged, at WARNING from
    `LONG_PAUSE_S` seconds on.
  * Bodies are streamed and read up to `max_response_bytes` (default
    `DEFAULT_MAX_RESPONSE_BYTES`, after decompression); a larger answer is refused without
    being kept (reason "too_large", not retried).
  * Redirects are followed by this module, not by `requests`, at most `MAX_REDIRECTS` hops,
    method and body kept (so a POSTed query is not silently dropped). A redirect that leaves
    the configured origin (scheme, host, port; an http -> https upgrade on the same host is
    allowed) is refused when the client carries credentials, because the API key is in the
    query string or form body (reason "redirect", not retried).

Secrets (API keys) are redacted from every message this module produces and from the log
lines of `urllib3`, `requests` and the search modules: by value for registered secrets of at
least `MIN_SECRET_LEN` characters, and by parameter name (`api_key=...` in any URL or form,
whatever the value's length).
"""

from __future__ import annotations

import email.utils
import logging
import math
import os
import random
import re
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Set, TypeVar
from urllib.parse import quote, quote_plus, urljoin, urlsplit

import requests
import urllib3
from requests.adapters import HTTPAdapter

from deepretrieval.search.base import QuerySyntaxError, SearchEngineError, SearchUnavailable
from deepretrieval.search.ratelimit import RETRY_AFTER_MAX_S, RateLimiter

logger = logging.getLogger(__name__)

T = TypeVar("T")

RETRY_STATUS = frozenset({429, 500, 502, 503, 504})
REDIRECT_STATUS = frozenset({301, 302, 303, 307, 308})
MAX_REDIRECTS = 5
DEFAULT_DEADLINE_S = 60.0
DEFAULT_MAX_RESPONSE_BYTES = 8 * 1024 * 1024  # esearch for 9,999 ids is ~0.2 MB
LONG_PAUSE_S = 10.0
_CHUNK = 64 * 1024


class TransientError(Exception):
    """A failure worth retrying; `retry_after` (seconds) if the server asked for a pause.

    `reason` names the failure in the counters ("inconsistent": an answer contradicting
    itself, e.g. hits counted but none listed)."""

    def __init__(self, message: str, retry_after: Optional[float] = None, status: Optional[int] = None,
                 reason: Optional[str] = None):
        super().__init__(message)
        self.retry_after = retry_after
        self.status = status
        self.reason = reason


class DeadlineExceeded(SearchUnavailable):
    """The search's total time budget ran out (across pages, retries and waits)."""

    reason = "deadline"


class RedirectRefused(SearchUnavailable):
    """A redirect would have carried the credentials off the configured host."""

    reason = "redirect"


class ResponseTooLarge(SearchUnavailable):
    """The answer was larger than `max_response_bytes`."""

    reason = "too_large"


class PagingError(SearchUnavailable):
    """The service's paging did not advance (a repeated page token, pages of known ids)."""

    reason = "paging"


class Deadline:
    """A total time budget: `remaining()` seconds left on a monotonic clock (inf without one)."""

    def __init__(self, seconds: Optional[float], clock: Callable[[], float] = time.monotonic):
        self.seconds = float(seconds) if seconds else math.inf
        self._clock = clock
        self._end = clock() + self.seconds

    def remaining(self) -> float:
        return self._end - self._clock()

    @property
    def expired(self) -> bool:
        return self.remaining() <= 0

    def wall_end(self) -> float:
        """The deadline on the `time.time()` scale (the rate limiter's clock)."""
        return time.time() + self.remaining()


# -- redaction --------------------------------------------------------------------------
MIN_SECRET_LEN = 8
_SECRETS: Set[str] = set()
_SECRETS_LOCK = threading.Lock()


def register_secret(secret: Optional[str]) -> None:
    """Have `redact` and the urllib3 log filter hide `secret` (and its URL-encoded forms).

    Process-wide, so only strings of at least `MIN_SECRET_LEN` characters are registered
    (NCBI keys are 36): a one-letter test key would otherwise blank that letter in every
    log line. Shorter secrets are still redacted from the owning client's own errors, and
    every log line loses the value of its `api_key=` parameters whatever their length.
    """
    if not secret or len(secret) < MIN_SECRET_LEN:
        return
    with _SECRETS_LOCK:
        _SECRETS.update({secret, quote(secret, safe=""), quote_plus(secret)})
    _install_log_filter()


# A credential parameter in a URL or form body, whatever its value: `api_key=...`.
_SECRET_PARAM = re.compile(r"(?i)(\b(?:api[_-]?key|apikey|access[_-]?token)=)[^&\s\"'#;,)]*")


def redact(text: Any, extra: Iterable[str] = ()) -> str:
    """`text` with every registered secret (and those in `extra`) replaced by `***`, and the
    value of every credential parameter (`api_key=...`) too, however short it is."""
    out = _SECRET_PARAM.sub(r"\1***", str(text))
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
        try:
            message = record.getMessage()
        except Exception:
            return True
        clean = redact(message)
        if clean != message:
            record.msg, record.args = clean, None
        return True


_FILTER = _RedactingFilter()
# A filter on a logger sees only that logger's own records (not its children's): list each.
_FILTER_LOGGERS = ("urllib3", "urllib3.connectionpool", "urllib3.poolmanager", "urllib3.util.retry",
                   "urllib3.response", "urllib3.connection", "requests",
                   __name__, "deepretrieval.search.pubmed", "deepretrieval.search.ctgov")


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
    retry_after_max: float = RETRY_AFTER_MAX_S

    def delay(self, attempt: int, retry_after: Optional[float] = None, rng: Optional[random.Random] = None) -> float:
        cap = min(self.backoff_max, self.backoff_base * (2.0 ** attempt))
        wait = (rng or random).uniform(0.0, cap) if cap > 0 else 0.0
        if retry_after is not None:
            wait = max(wait, min(max(retry_after, 0.0), self.retry_after_max))
        return wait


def parse_retry_after(value: Optional[str], now: Optional[float] = None) -> Optional[float]:
    """`Retry-After` as seconds: either delta-seconds or an HTTP date. None if absent/bad.

    Not capped here (callers cap with `RetryPolicy.retry_after_max`); "inf" is kept as a
    very long pause, "nan" is not a pause at all."""
    if not value:
        return None
    value = value.strip()
    try:
        seconds = float(value)
        return None if math.isnan(seconds) else max(seconds, 0.0)
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
    """One pooled `requests.Session` plus limiter, retry policy, bounds and redaction for a service.

    `call(method, url, params=..., data=..., handle=fn, deadline=...)` runs attempts until
    `handle` returns. Before each attempt the limiter is acquired. Redirects, 429/5xx, the
    body-size cap and the deadline are dealt with before `handle` sees a response;
    `handle(response)` returns the value, raises `TransientError` to retry, or raises a
    `SearchEngineError` to stop. Counters (`counters`, floats): requests, retries,
    rate_limited, failures, retry_after (server-requested pauses) and retry_after_s (their
    capped length), redirects (followed), redirects_refused, deadline_exceeded, too_large,
    inconsistent.
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
        deadline_s: Optional[float] = DEFAULT_DEADLINE_S,
        max_response_bytes: int = DEFAULT_MAX_RESPONSE_BYTES,
    ):
        self.service = service
        self.limiter = limiter
        self.policy = policy or RetryPolicy()
        self.timeout = timeout
        self.deadline_s = float(deadline_s) if deadline_s else None
        self.max_response_bytes = int(max_response_bytes)
        if self.max_response_bytes < 1:
            raise ValueError(f"max_response_bytes must be positive, got {max_response_bytes!r}")
        self._secrets = [s for s in secrets if s]
        for secret in self._secrets:
            register_secret(secret)
        _install_log_filter()  # parameter-name redaction applies whatever the key's length
        self.session = session or requests.Session()
        if session is None:
            adapter = _WatchedAdapter(pool_connections=4, pool_maxsize=pool_size, max_retries=0)
            self.session.mount("http://", adapter)
            self.session.mount("https://", adapter)
        if user_agent:
            self.session.headers["User-Agent"] = user_agent
        self._lock = threading.Lock()
        self.counters: Dict[str, float] = {
            name: 0.0 for name in ("requests", "retries", "rate_limited", "failures", "retry_after", "retry_after_s",
                                   "redirects", "redirects_refused", "deadline_exceeded", "too_large", "inconsistent")
        }

    def _count(self, name: str, amount: float = 1.0) -> None:
        with self._lock:
            self.counters[name] = self.counters.get(name, 0.0) + amount

    def new_deadline(self) -> Deadline:
        """A fresh budget of `deadline_s` for one search."""
        return Deadline(self.deadline_s)

    def _deadline_error(self, deadline: Deadline, what: str, detail: str) -> DeadlineExceeded:
        self._count("deadline_exceeded")
        return DeadlineExceeded(
            f"{self.service} {what}: search deadline of {deadline.seconds:g}s exceeded ({redact(detail, self._secrets)})"
        )

    # -- one attempt: send, follow allowed redirects, read the body within the bounds ----------
    def _server_pause(self, response: requests.Response, what: str) -> Optional[float]:
        """The capped `Retry-After` of a 429/5xx answer, counted, logged, shared on a 429."""
        requested = parse_retry_after(response.headers.get("Retry-After"))
        if requested is None:
            return None
        pause = min(requested, self.policy.retry_after_max)
        self._count("retry_after")
        self._count("retry_after_s", pause)
        capped = f" (asked {requested:g}s, capped at {self.policy.retry_after_max:g}s)" if requested > pause else ""
        shared = "; every process sharing this rate limit waits" if response.status_code == 429 else ""
        logger.log(
            logging.WARNING if pause >= LONG_PAUSE_S else logging.INFO,
            "%s %s: server asked for a pause of %.1fs (HTTP %d Retry-After)%s%s",
            self.service, what, pause, response.status_code, capped, shared,
        )
        if response.status_code == 429:
            self.limiter.defer(pause)
        return pause

    def _redirect_target(self, origin: tuple, response: requests.Response, what: str) -> str:
        """Where a 3xx points, if this client may follow it there; else `RedirectRefused`.

        With credentials only the configured origin (scheme, host, port) is allowed, plus an
        upgrade from http to https on the same host; without credentials any http(s) URL."""
        target = urljoin(response.url, response.headers["Location"])
        parts = urlsplit(target)
        scheme, host = parts.scheme.lower(), (parts.hostname or "").lower()
        try:
            port = parts.port or _default_port(scheme)
        except ValueError:  # a port that is not a number
            port = -1
        if scheme not in ("http", "https"):
            raise SearchUnavailable(f"{self.service} {what}: redirect to unsupported scheme {scheme!r}")
        allowed = (scheme, host, port) == origin or (host == origin[1] and origin[0] == "http" and scheme == "https")
        if self._secrets and not allowed:
            self._count("redirects_refused")
            raise RedirectRefused(
                f"{self.service} {what}: refused to follow HTTP {response.status_code} redirect to "
                f"{scheme}://{host}:{port}, off the configured host {origin[0]}://{origin[1]}:{origin[2]}: "
                "the request carries credentials (api_key)"
            )
        self._count("redirects")
        return target

    def _send(self, method: str, url: str, params: Optional[Mapping[str, Any]], data: Optional[Mapping[str, Any]],
              deadline: Deadline, what: str) -> requests.Response:
        parts = urlsplit(url)
        origin = ((parts.scheme or "http").lower(), (parts.hostname or "").lower(),
                  parts.port or _default_port(parts.scheme))
        for _hop in range(MAX_REDIRECTS + 1):
            remaining = deadline.remaining()
            if remaining <= 0:
                raise _OutOfTime("before sending")
            wait = min(self.timeout, remaining)
            # Each socket read of the status line and headers waits at most `wait`; the watch
            # cuts the connection when the deadline passes however many reads there are.
            watch = _Watch(remaining) if math.isfinite(remaining) else None
            try:
                response = self.session.request(method, url, params=params, data=data, timeout=(wait, wait),
                                                allow_redirects=False, stream=True)
            except requests.RequestException:
                if watch is not None and watch.fired:
                    raise _OutOfTime("waiting for the answer's headers") from None
                raise
            finally:
                if watch is not None:
                    watch.stop()
            if watch is not None and watch.fired:  # cut mid-headers: what came is not an answer
                response.close()
                raise _OutOfTime("waiting for the answer's headers")
            if response.status_code in REDIRECT_STATUS and response.headers.get("Location"):
                try:
                    url = self._redirect_target(origin, response, what)
                finally:
                    response.close()
                params = None  # the Location carries the query string; a POST keeps its body
                continue
            try:
                self._read_body(response, deadline, what)
            except BaseException:
                response.close()
                raise
            return response
        raise SearchUnavailable(f"{self.service} {what}: more than {MAX_REDIRECTS} redirects")

    def _read_body(self, response: requests.Response, deadline: Deadline, what: str) -> None:
        """Read the streamed body into `response` (so `.json()` works), within the size cap
        and the deadline: each socket read waits at most what is left of the deadline."""
        cap = self.max_response_bytes
        declared = response.headers.get("Content-Length")
        if declared and declared.strip().isdigit() and int(declared) > cap:
            self._count("too_large")
            raise ResponseTooLarge(
                f"{self.service} {what}: answer of {int(declared):,} bytes is over the {cap:,}-byte cap (not read)"
            )
        sock = _socket_of(response)
        chunks: List[bytes] = []
        size = 0
        raw = response.raw
        while True:
            remaining = deadline.remaining()
            if remaining <= 0:
                raise _OutOfTime(f"reading the answer after {size:,} bytes")
            if sock is not None:
                try:
                    sock.settimeout(max(min(self.timeout, remaining), 0.001))
                except OSError:
                    sock = None
            try:
                chunk = raw.read1(_CHUNK, decode_content=True)
            except (urllib3.exceptions.ReadTimeoutError, socket.timeout) as exc:
                if deadline.expired:
                    raise _OutOfTime(f"reading the answer after {size:,} bytes") from None
                raise requests.ReadTimeout(f"read timed out after {size:,} bytes: {exc}") from None
            except (urllib3.exceptions.HTTPError, OSError) as exc:
                raise requests.ConnectionError(f"answer cut short after {size:,} bytes: {exc}") from None
            if not chunk:
                break
            size += len(chunk)
            if size > cap:
                self._count("too_large")
                raise ResponseTooLarge(f"{self.service} {what}: answer is over the {cap:,}-byte cap (stopped reading)")
            chunks.append(chunk)
        response._content = b"".join(chunks)
        response._content_consumed = True

    # -- the retry loop ----------------------------------------------------------------------
    def call(
        self,
        method: str,
        url: str,
        handle: Callable[[requests.Response], T],
        params: Optional[Mapping[str, Any]] = None,
        data: Optional[Mapping[str, Any]] = None,
        what: str = "request",
        deadline: Optional[Deadline] = None,
    ) -> T:
        deadline = deadline if deadline is not None else self.new_deadline()
        attempts = self.policy.max_retries + 1
        last = ""

        def so_far(detail: str) -> str:
            return f"{detail}; last error: {last}" if last else detail

        for attempt in range(attempts):
            if self.limiter.acquire(latest=deadline.wall_end()) is None:
                raise self._deadline_error(deadline, what, so_far("the rate-limit queue reaches past it"))
            self._count("requests")
            retry_after = None
            read_timeout = min(self.timeout, max(deadline.remaining(), 0.0))
            try:
                response = self._send(method, url, params, data, deadline, what)
                try:
                    if response.status_code in RETRY_STATUS or response.status_code >= 500:
                        if response.status_code == 429:
                            self._count("rate_limited")
                        retry_after = self._server_pause(response, what)
                        raise TransientError(
                            f"HTTP {response.status_code} {response.reason or ''}".strip(),
                            retry_after=retry_after,
                            status=response.status_code,
                        )
                    return handle(response)
                finally:
                    response.close()
            except _OutOfTime as exc:
                raise self._deadline_error(deadline, what, so_far(str(exc))) from None
            except SearchEngineError as exc:
                # Final classification by the engine; make sure no secret leaks through it.
                for index, arg in enumerate(exc.args):
                    if isinstance(arg, str):
                        exc.args = exc.args[:index] + (redact(arg, self._secrets),) + exc.args[index + 1:]
                raise
            except TransientError as exc:
                last, retry_after = redact(exc, self._secrets), exc.retry_after
                if exc.reason:
                    self._count(exc.reason)
            except requests.Timeout as exc:
                last = f"timeout after {read_timeout:.3g}s ({type(exc).__name__})"
            except requests.RequestException as exc:
                last = f"{type(exc).__name__}: {redact(exc, self._secrets)}"
            if deadline.expired:
                raise self._deadline_error(deadline, what, f"after {attempt + 1} attempt(s); last error: {last}")
            if attempt + 1 < attempts:
                wait = self.policy.delay(attempt, retry_after)
                if wait >= deadline.remaining():
                    raise self._deadline_error(
                        deadline, what, f"a {wait:.1f}s wait before retry {attempt + 1} would pass it; last error: {last}"
                    )
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


class _OutOfTime(Exception):
    """Internal: the deadline ran out inside an attempt (becomes `DeadlineExceeded`)."""


_WATCHING = threading.local()


class _Watch:
    """Shuts down the socket of the connection this thread takes from the pool (see
    `_WatchedPool`) if `seconds` pass before `stop()`: a server sending its headers a byte
    at a time would otherwise hold the request past the deadline, one bounded read at a time."""

    def __init__(self, seconds: float):
        self._lock = threading.Lock()
        self._conn: Any = None
        self._active = True
        self.fired = False
        _WATCHING.current = self
        self._timer = threading.Timer(max(seconds, 0.0), self._fire)
        self._timer.daemon = True
        self._timer.start()

    def attach(self, conn: Any) -> None:
        with self._lock:
            self._conn = conn

    def _fire(self) -> None:
        with self._lock:
            sock = getattr(self._conn, "sock", None)
            if not self._active or sock is None:
                return
            self.fired = True
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def stop(self) -> None:
        with self._lock:
            self._active = False
            self._conn = None
        self._timer.cancel()
        if getattr(_WATCHING, "current", None) is self:
            _WATCHING.current = None


class _WatchedPool:
    """Connection-pool mixin: hands the connection it gives out to this thread's `_Watch`."""

    def _get_conn(self, timeout: Optional[float] = None):
        conn = super()._get_conn(timeout)  # type: ignore[misc]
        watch = getattr(_WATCHING, "current", None)
        if watch is not None:
            watch.attach(conn)
        return conn


class _WatchedHTTPPool(_WatchedPool, urllib3.HTTPConnectionPool):
    pass


class _WatchedHTTPSPool(_WatchedPool, urllib3.HTTPSConnectionPool):
    pass


class _WatchedAdapter(HTTPAdapter):
    """`HTTPAdapter` whose pools report their connections to `_Watch` (no other change)."""

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = {"http": _WatchedHTTPPool, "https": _WatchedHTTPSPool}


def _default_port(scheme: Optional[str]) -> int:
    return 443 if (scheme or "").lower() == "https" else 80


def _socket_of(response: requests.Response) -> Optional[socket.socket]:
    """The socket a streamed response is read from (urllib3 2.x), or None if not reachable."""
    connection = getattr(response.raw, "_connection", None) or getattr(response.raw, "connection", None)
    sock = getattr(connection, "sock", None)
    return sock if isinstance(sock, socket.socket) else None


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
    `self.cache`, and implement `_fetch(query, k, filters, deadline) -> SearchResult`.
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
        result = self._fetch(query, k, clean, self.http.new_deadline())
        result.elapsed_s = time.perf_counter() - start
        if self.cache is not None and key is not None:
            self.cache.put(key, result)
        return result

    def _fetch(self, query: str, k: int, filters: Dict[str, Any], deadline: Deadline):  # pragma: no cover
        raise NotImplementedError  # abstract: every page and retry shares `deadline`

    def stats(self) -> Dict[str, float]:
        """Counters for metrics (cumulative): `http_<counter>` (see `HttpClient`), limiter wait,
        cache."""
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
