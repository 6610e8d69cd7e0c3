"""ClinicalTrials.gov through API v2: `GET {base}/studies`.

Request: `query.term` (the generated query, always an encoded parameter), `pageSize`
(<= 1000), `pageToken` from the previous page's `nextPageToken`, `fields=NCTId` (only the
identifier comes back), `countTotal=true` on the first page, `format=json`, and for the
date filters `filter.advanced=AREA[StudyFirstPostDate]RANGE[<min>,<max>]` (first-posted
date; partial dates widen to the first/last day they cover, an open side is MIN/MAX).

Answer: `{"studies": [{"protocolSection": {"identificationModule": {"nctId": ...}}}],
"nextPageToken": ..., "totalCount": N}`; paging stops at k ids or when no token remains.

Paging must advance: a `nextPageToken` seen before, a page that brings no new id, or more
than `ceil(k / n1) + PAGE_SLACK` pages (n1: the first page's length, so at most k + 2) is a
broken service (`http.PagingError`, a `SearchUnavailable`), never a short result. A page that lists no study but still hands out
a token, or a first page with `totalCount > 0` and no study, contradicts itself: retried
like any transient fault.

Classification: HTTP 400 with a text body starting "Error parsing query" is the query's
fault -> `QuerySyntaxError`; any other 4xx means our request is wrong -> `SearchUnavailable`
(immediately, not the model's fault). 429/5xx, timeouts, connection errors and truncated or
malformed JSON are retried, then `SearchUnavailable`.

Bounds (see `http`): `deadline` seconds per search across pages and retries,
`max_response_bytes` per page.

Rate: ClinicalTrials.gov publishes no limit (its robots.txt asks for a 1 s crawl delay);
the default `DEFAULT_RATE` is that 1 request/s, shared by every thread and process through
`ratelimit.RateLimiter`. Raise it with `rate_limit=` for mirrors.
"""

from __future__ import annotations

import logging
import math
import os
import re
from typing import Any, Dict, List, Optional, Union
from urllib.parse import urlsplit

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
    TransientError,
    date_bound_iso,
    decode_json,
)
from deepretrieval.search.ratelimit import RATE_HEADROOM, RateLimiter, credential_tag

logger = logging.getLogger(__name__)

DEFAULT_URL = "https://clinicaltrials.gov/api/v2/"
URL_ENV = "DEEPRETRIEVAL_CTGOV_URL"
DEFAULT_RATE = 1.0
MAX_PAGE_SIZE = 1000
PAGE_SLACK = 2  # pages allowed beyond ceil(k / first page's length), for later pages a little short
QUERY_FAULT_PATTERN = re.compile(r"error\s+parsing\s+query|syntax\s+error", re.IGNORECASE)


def parse_studies_page(payload: Any) -> Dict[str, Any]:
    """Validate one `/studies` JSON page -> {ids, total (or None), next_token}.

    A page without studies that still has a `nextPageToken`, or says `totalCount > 0`, is
    inconsistent (`TransientError`): an empty page can only be the last one of nothing."""
    if not isinstance(payload, dict) or not isinstance(payload.get("studies"), list):
        raise TransientError("unexpected /studies answer (no 'studies' list)")
    ids: List[str] = []
    for study in payload["studies"]:
        try:
            nct = study["protocolSection"]["identificationModule"]["nctId"]
        except (KeyError, TypeError):
            raise TransientError("study without protocolSection.identificationModule.nctId") from None
        ids.append(str(nct))
    total = payload.get("totalCount")
    try:
        total = int(total) if total is not None else None
    except (TypeError, ValueError):
        raise TransientError(f"unusable totalCount {total!r}") from None
    token = payload.get("nextPageToken") or None
    if not ids and (token or (total or 0) > 0):
        raise TransientError(
            f"inconsistent /studies page: no studies but totalCount {total} / nextPageToken {bool(token)}",
            reason="inconsistent",
        )
    return {"ids": ids, "total": total, "next_token": token}


class CTGovSearchEngine(LiveSearchEngine, SearchEngine):
    """`search(query, k, min_date=None, max_date=None) -> SearchResult` against `/studies`."""

    name = "ctgov"
    FILTERS = ("min_date", "max_date")

    def __init__(
        self,
        base_url: Optional[str] = None,
        cache: Union[bool, None, str, "os.PathLike[str]", SearchCache] = True,
        timeout: float = 30.0,
        max_retries: int = 5,
        rate_limit: Optional[float] = None,
        backoff_base: float = 0.5,
        backoff_max: float = 30.0,
        page_size: int = MAX_PAGE_SIZE,
        cache_ttl: Optional[float] = None,
        ratelimit_dir: Optional[Union[str, "os.PathLike[str]"]] = None,
        pool_size: int = 32,
        deadline: Optional[float] = DEFAULT_DEADLINE_S,
        max_response_bytes: int = DEFAULT_MAX_RESPONSE_BYTES,
    ):
        self._remember_options(locals())
        base = base_url or os.environ.get(URL_ENV) or DEFAULT_URL
        self.base_url = base.rstrip("/") + "/"
        self.page_size = max(1, min(int(page_size), MAX_PAGE_SIZE))
        self.rate_limit = rate_limit if rate_limit is not None else DEFAULT_RATE
        host = urlsplit(self.base_url).netloc
        limiter = RateLimiter(self.rate_limit, credential_tag(f"ctgov@{host}", None), ratelimit_dir, headroom=RATE_HEADROOM)
        policy = RetryPolicy(max_retries=max_retries, backoff_base=backoff_base, backoff_max=backoff_max)
        self.http = HttpClient("ctgov", limiter, policy, timeout=timeout, pool_size=pool_size, user_agent="deepretrieval",
                               deadline_s=deadline, max_response_bytes=max_response_bytes)
        self._owns_cache = not isinstance(cache, SearchCache)
        self.cache = resolve_cache(cache, ttl=cache_ttl)

    def __repr__(self) -> str:
        return f"CTGovSearchEngine(base_url={self.base_url!r}, rate_limit={self.rate_limit:g})"

    def config(self) -> Dict[str, Any]:
        return {
            "engine": self.name, "base_url": self.base_url, "page_size": self.page_size,
            "rate_limit": self.rate_limit, "timeout": self.http.timeout,
            "max_retries": self.http.policy.max_retries, "deadline": self.http.deadline_s,
            "max_response_bytes": self.http.max_response_bytes,
            "cache": str(self.cache.path) if self.cache is not None else None,
            "cache_ttl": self.cache.ttl if self.cache is not None else None,
        }

    @staticmethod
    def date_filter(min_date: Any = None, max_date: Any = None) -> Optional[str]:
        """The Essie expression restricting the first-posted date, or None without dates."""
        if min_date is None and max_date is None:
            return None
        lo = date_bound_iso(min_date, end=False, name="min_date") if min_date is not None else "MIN"
        hi = date_bound_iso(max_date, end=True, name="max_date") if max_date is not None else "MAX"
        return f"AREA[StudyFirstPostDate]RANGE[{lo},{hi}]"

    def _page(self, params: Dict[str, str], query: str, deadline: Deadline) -> Dict[str, Any]:
        def handle(response):
            if response.status_code == 200:
                return parse_studies_page(decode_json(response))
            text = (response.text or "").strip()[:300]
            if response.status_code == 400 and QUERY_FAULT_PATTERN.search(text):
                raise QuerySyntaxError(f"ClinicalTrials.gov rejected the query: {text}", query=query)
            raise SearchUnavailable(
                f"ClinicalTrials.gov answered HTTP {response.status_code}: {text or response.reason}"
            )

        return self.http.call("GET", self.base_url + "studies", handle, params=params, what="studies",
                              deadline=deadline)

    def _fetch(self, query: str, k: int, filters: Dict[str, Any], deadline: Deadline) -> SearchResult:
        page_size = min(self.page_size, k)
        params: Dict[str, str] = {
            "query.term": query,
            "pageSize": str(page_size),
            "fields": "NCTId",
            "format": "json",
            "countTotal": "true",
        }
        advanced = self.date_filter(filters.get("min_date"), filters.get("max_date"))
        if advanced:
            params["filter.advanced"] = advanced
        ids: List[str] = []
        seen = set()
        total: Optional[int] = None
        token: Optional[str] = None
        tokens_seen = set()
        max_pages = math.ceil(k / page_size) + PAGE_SLACK  # revised by the first page's length
        pages = 0
        while len(ids) < k:
            if pages >= max_pages:
                raise PagingError(
                    f"ClinicalTrials.gov paging did not finish: {pages} pages of {page_size} gave {len(ids)} of "
                    f"k={k} ids and still a next page"
                )
            request = dict(params)
            if token:
                request["pageToken"] = token
                request.pop("countTotal", None)  # the total only comes with the first page
            page = self._page(request, query, deadline)
            pages += 1
            if total is None:
                total = page["total"]
                # A mirror may cap pageSize below what was asked: size the bound by what came.
                max_pages = math.ceil(k / max(len(page["ids"]), 1)) + PAGE_SLACK
            before = len(ids)
            for nct in page["ids"]:
                if nct not in seen:
                    seen.add(nct)
                    ids.append(nct)
            token = page["next_token"]
            if pages > 1 and len(ids) == before:
                raise PagingError(f"ClinicalTrials.gov page {pages} repeated ids already seen (no new study)")
            if not token:
                break
            if token in tokens_seen:
                raise PagingError(f"ClinicalTrials.gov repeated a nextPageToken on page {pages}")
            tokens_seen.add(token)
        if total is None:
            total = len(ids)
        return SearchResult(ids=ids[:k], total=total, query=query, engine=self.name, k=k)
