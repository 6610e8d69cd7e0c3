"""PubMed through NCBI E-utilities `esearch` (`db=pubmed`, `retmode=json`).

Request: `term` is always sent as an encoded parameter (GET query string, or a POST form
when the encoded request would exceed `post_threshold` characters), so a generated query
such as `x&retmax=1&db=pmc` is searched as text and cannot change any other parameter.
Paging: `retstart`/`retmax` pages of `page_size` until k ids, the end of the result list,
or PubMed's ceiling: esearch on PubMed returns only the first 9,999 records, so k above
that is clamped and the result carries a warning saying so. A later page made only of ids
already seen (a server ignoring `retstart`) is a broken service: `http.PagingError`.

Dates: `min_date` / `max_date` ("YYYY", "YYYY/MM" or "YYYY/MM/DD") filter on publication
date (`datetype=pdat`). NCBI needs both bounds; a missing one is filled with
`open_min_date` (default `OPEN_MIN_DATE`; the original DeepRetrieval sent 1970/01/01) /
`OPEN_MAX_DATE`. Order: `sort` (default relevance); `sort=None` (or "none") sends no sort
parameter, i.e. NCBI's default order, as the original did: when a query matches more than k
records, which k are kept depends on it.

Answer (HTTP 200, `esearchresult`): `count` -> `total`, `idlist` -> `ids`,
`querytranslation` -> `query_translation`; `errorlist.phrasesnotfound/fieldsnotfound` and
`warninglist.phrasesignored/quotedphrasesnotfound/outputmessages` -> `warnings`.

Classification of `esearchresult.ERROR` (an error inside an HTTP 200):
  * the message says the *query* is unusable (`QUERY_FAULT_PATTERN`: empty term, invalid
    query/term, syntax, unbalanced/unmatched, too long, cannot parse) -> `QuerySyntaxError`
    (checked first, because NCBI wraps some of these as "Search Backend failed: ...
    Empty Term in the request");
  * anything else ("Search Backend failed", database/timeout messages, unknown text) is
    treated as the service's fault: retried, then `SearchUnavailable`. A fault we cannot
    pin on the query must not penalise the policy.
An HTTP 200 whose JSON has no `esearchresult` (e.g. NCBI's rate-limit body
`{"error": "API rate limit exceeded", ...}`) or is not JSON is transient as well, and so
is an answer that contradicts itself: `count` above `retstart` but an empty `idlist`
(seen as a glitch; taken at face value it would score recall 0 and be cached). A query
with no hits (`count == 0`) is a valid result (`total == 0`), never an error.

Bounds (see `http`): `deadline` seconds per search across pages and retries
(`http.DEFAULT_DEADLINE_S`), `max_response_bytes` per answer, redirects off the
configured host refused while an API key is set.

Rate: 3 requests/s without an API key, 10/s with one (`api_key=` or `NCBI_API_KEY`),
shared across threads and processes through `ratelimit.RateLimiter`. The key is only
ever a request parameter: it is redacted from logs and errors and is not part of
`repr`, `config()` or cache keys.
"""

from __future__ import annotations

import logging
import os
import re
from typing import Any, Dict, List, Optional, Union
from urllib.parse import urlencode, urlsplit

from deepretrieval.search.base import QuerySyntaxError, SearchEngine, SearchResult, SearchUnavailable
from deepretrieval.search.cache import SearchCache, resolve_cache
from deepretrieval.search.http import (
    DEFAULT_DEADLINE_S,
    DEFAULT_MAX_RESPONSE_BYTES,
    Deadline,
    HttpClient,
    LiveSearchEngine,
    PagingError,
    RetryPolicy,
    Secret,
    TransientError,
    decode_json,
    parse_date,
)
from deepretrieval.search.ratelimit import RATE_HEADROOM, RateLimiter, credential_tag

logger = logging.getLogger(__name__)

DEFAULT_URL = "https://eutils.ncbi.nlm.nih.gov/entrez/eutils/"
URL_ENV = "DEEPRETRIEVAL_PUBMED_URL"
KEY_ENV = "NCBI_API_KEY"
RATE_WITHOUT_KEY = 3.0
RATE_WITH_KEY = 10.0
MAX_RETRIEVABLE = 9999
OPEN_MIN_DATE = "1000/01/01"
OPEN_MAX_DATE = "3000/12/31"

QUERY_FAULT_PATTERN = re.compile(
    r"empty\s+term|invalid\s+(?:query|term|search)|syntax|unbalanced|unmatched|mismatched|"
    r"(?:term|query)\s+(?:is\s+)?too\s+long|too\s+many\s+terms|(?:cannot|can't|unable\s+to)\s+parse|"
    r"malformed\s+(?:query|term)",
    re.IGNORECASE,
)

WARNING_FIELDS = (
    ("errorlist", "phrasesnotfound", "phrase not found"),
    ("errorlist", "fieldsnotfound", "field not found"),
    ("warninglist", "phrasesignored", "phrase ignored"),
    ("warninglist", "quotedphrasesnotfound", "quoted phrase not found"),
    ("warninglist", "outputmessages", "output message"),
)


def classify_esearch_error(message: str, query: str) -> Exception:
    """The exception for an `esearchresult.ERROR` text (see the module docstring)."""
    if QUERY_FAULT_PATTERN.search(message):
        return QuerySyntaxError(f"PubMed rejected the query: {message}", query=query)
    return TransientError(f"PubMed reported a backend error: {message}")


def esearch_warnings(result: Dict[str, Any]) -> List[str]:
    """Flatten `errorlist` / `warninglist` into readable strings, in NCBI's order."""
    out: List[str] = []
    for section, field, label in WARNING_FIELDS:
        block = result.get(section)
        if not isinstance(block, dict):
            continue
        values = block.get(field) or []
        if isinstance(values, str):
            values = [values]
        out.extend(f"{label}: {v}" for v in values if str(v).strip())
    return out


def parse_esearch(payload: Any, query: str, retstart: int = 0, retmax: int = 1) -> Dict[str, Any]:
    """Validate one esearch JSON answer -> {count, ids, translation, warnings}; raises classified.

    `retstart`/`retmax` are what was asked: hits counted past `retstart` but no id listed
    for a `retmax > 0` request is an inconsistent answer (`TransientError`)."""
    if not isinstance(payload, dict) or not isinstance(payload.get("esearchresult"), dict):
        detail = payload.get("error") if isinstance(payload, dict) else None
        raise TransientError(f"unexpected esearch answer{f': {detail}' if detail else ''}")
    result = payload["esearchresult"]
    if result.get("ERROR"):
        raise classify_esearch_error(str(result["ERROR"]), query)
    try:
        count = int(result["count"])
        ids = [str(i) for i in result.get("idlist", [])]
    except (KeyError, TypeError, ValueError):
        raise TransientError("esearch answer without a usable count/idlist") from None
    if not ids and retmax > 0 and count > retstart:
        raise TransientError(
            f"inconsistent esearch answer: count {count} but no ids from retstart {retstart}", reason="inconsistent"
        )
    return {
        "count": count,
        "ids": ids,
        "translation": result.get("querytranslation"),
        "warnings": esearch_warnings(result),
    }


class PubMedSearchEngine(LiveSearchEngine, SearchEngine):
    """`search(query, k, min_date=None, max_date=None) -> SearchResult` against esearch."""

    name = "pubmed"
    FILTERS = ("min_date", "max_date")

    def __init__(
        self,
        base_url: Optional[str] = None,
        api_key: Optional[Union[str, Secret]] = None,
        cache: Union[bool, None, str, "os.PathLike[str]", SearchCache] = True,
        tool: str = "deepretrieval",
        email: Optional[str] = None,
        timeout: float = 30.0,
        max_retries: int = 5,
        rate_limit: Optional[float] = None,
        backoff_base: float = 0.5,
        backoff_max: float = 30.0,
        sort: str = "relevance",
        page_size: int = MAX_RETRIEVABLE,
        post_threshold: int = 2000,
        cache_ttl: Optional[float] = None,
        ratelimit_dir: Optional[Union[str, "os.PathLike[str]"]] = None,
        pool_size: int = 32,
        deadline: Optional[float] = DEFAULT_DEADLINE_S,
        max_response_bytes: int = DEFAULT_MAX_RESPONSE_BYTES,
        open_min_date: str = OPEN_MIN_DATE,
    ):
        self._remember_options(locals())
        base = base_url or os.environ.get(URL_ENV) or DEFAULT_URL
        self.base_url = base.rstrip("/") + "/"
        key = api_key.reveal() if isinstance(api_key, Secret) else api_key
        key = key or os.environ.get(KEY_ENV) or None
        self._api_key: Optional[Secret] = Secret(key) if key else None
        if isinstance(api_key, str) and api_key:
            self._options["api_key"] = self._api_key  # the pickled options print as *** too
        self.tool = tool
        self.email = email
        self.sort = None if sort is None or str(sort).lower() in ("", "none") else str(sort)
        parse_date(open_min_date, "open_min_date")
        self.open_min_date = open_min_date
        self.page_size = max(1, min(int(page_size), MAX_RETRIEVABLE))
        self.post_threshold = post_threshold
        self.rate_limit = rate_limit if rate_limit is not None else (RATE_WITH_KEY if self._api_key else RATE_WITHOUT_KEY)
        host = urlsplit(self.base_url).netloc
        limiter = RateLimiter(self.rate_limit, credential_tag(f"ncbi@{host}", key), ratelimit_dir, headroom=RATE_HEADROOM)
        policy = RetryPolicy(max_retries=max_retries, backoff_base=backoff_base, backoff_max=backoff_max)
        self.http = HttpClient(
            "pubmed", limiter, policy, timeout=timeout, secrets=[key], pool_size=pool_size,
            user_agent=f"deepretrieval ({tool})", deadline_s=deadline, max_response_bytes=max_response_bytes,
        )
        self._owns_cache = not isinstance(cache, SearchCache)
        self.cache = resolve_cache(cache, ttl=cache_ttl)

    def __repr__(self) -> str:
        key = "***" if self._api_key else None
        return f"PubMedSearchEngine(base_url={self.base_url!r}, api_key={key!r}, rate_limit={self.rate_limit:g})"

    @property
    def has_api_key(self) -> bool:
        return self._api_key is not None

    def config(self) -> Dict[str, Any]:
        """Settings safe to log (wandb config): the key only as a yes/no."""
        return {
            "engine": self.name, "base_url": self.base_url, "api_key_set": self.has_api_key,
            "tool": self.tool, "email": self.email, "sort": self.sort, "page_size": self.page_size,
            "rate_limit": self.rate_limit, "timeout": self.http.timeout,
            "max_retries": self.http.policy.max_retries, "deadline": self.http.deadline_s,
            "max_response_bytes": self.http.max_response_bytes,
            "cache": str(self.cache.path) if self.cache is not None else None,
            "cache_ttl": self.cache.ttl if self.cache is not None else None,
        }

    def _cache_identity(self, filters: Dict[str, Any]) -> Dict[str, Any]:
        ident = dict(filters)
        ident["sort"] = self.sort
        if self.open_min_date != OPEN_MIN_DATE:  # cache keys of the default floor stay as they were
            ident["open_min_date"] = self.open_min_date
        return ident

    def _date_params(self, filters: Dict[str, Any]) -> Dict[str, str]:
        lo, hi = filters.get("min_date"), filters.get("max_date")
        if lo is None and hi is None:
            return {}
        bounds = []
        for value, name, open_value in ((lo, "min_date", self.open_min_date), (hi, "max_date", OPEN_MAX_DATE)):
            if value is None:
                bounds.append(open_value)
                continue
            year, month, day = parse_date(value, name)
            bounds.append("/".join(f"{p:02d}" if i else f"{p:04d}" for i, p in enumerate((year, month, day)) if p is not None))
        return {"datetype": "pdat", "mindate": bounds[0], "maxdate": bounds[1]}

    def _request(self, params: Dict[str, str], query: str, deadline: Deadline) -> Dict[str, Any]:
        url = self.base_url + "esearch.fcgi"
        long_request = len(urlencode(params)) > self.post_threshold

        def handle(response):
            if response.status_code != 200:
                # 4xx other than 429: our request is wrong (not the query's text). If NCBI
                # still explains in JSON, classify that; otherwise it is not the model's fault.
                try:
                    payload = response.json()
                except ValueError:
                    payload = None
                if isinstance(payload, dict) and isinstance(payload.get("esearchresult"), dict):
                    message = payload["esearchresult"].get("ERROR")
                    if message:
                        error = classify_esearch_error(str(message), query)
                        if isinstance(error, QuerySyntaxError):
                            raise error
                raise SearchUnavailable(f"PubMed answered HTTP {response.status_code} {response.reason or ''}".strip())
            return parse_esearch(decode_json(response), query, int(params["retstart"]), int(params["retmax"]))

        if long_request:
            return self.http.call("POST", url, handle, data=params, what="esearch", deadline=deadline)
        return self.http.call("GET", url, handle, params=params, what="esearch", deadline=deadline)

    def _fetch(self, query: str, k: int, filters: Dict[str, Any], deadline: Deadline) -> SearchResult:
        warnings: List[str] = []
        want = k
        if k > MAX_RETRIEVABLE:
            want = MAX_RETRIEVABLE
            warnings.append(
                f"PubMed esearch cannot return records past {MAX_RETRIEVABLE:,}; k={k} was clamped to {MAX_RETRIEVABLE}"
            )
        base: Dict[str, str] = {"db": "pubmed", "term": query, "retmode": "json"}
        if self.sort is not None:
            base["sort"] = self.sort
        base.update(self._date_params(filters))
        if self.tool:
            base["tool"] = self.tool
        if self.email:
            base["email"] = self.email
        if self._api_key:
            base["api_key"] = self._api_key.reveal()
        ids: List[str] = []
        seen = set()
        total = 0
        translation = None
        retstart = 0
        first = True
        while len(ids) < want:
            retmax = min(self.page_size, want - retstart)
            if retmax <= 0:
                break
            page = self._request({**base, "retstart": str(retstart), "retmax": str(retmax)}, query, deadline)
            if first:
                total, translation = page["count"], page["translation"]
                warnings.extend(page["warnings"])
                first = False
            before = len(ids)
            for pmid in page["ids"]:
                if pmid not in seen:  # the set can shift between pages while PubMed updates
                    seen.add(pmid)
                    ids.append(pmid)
            if retstart > 0 and page["ids"] and len(ids) == before:
                raise PagingError(f"PubMed esearch page at retstart {retstart} repeated ids already seen (no new record)")
            retstart += len(page["ids"])
            if len(page["ids"]) < retmax or retstart >= page["count"]:
                break
        return SearchResult(
            ids=ids[:want], total=total, query=query, engine=self.name, k=k,
            warnings=warnings, query_translation=translation,
        )
