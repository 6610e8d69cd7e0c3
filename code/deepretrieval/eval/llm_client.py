"""A client for any OpenAI-compatible chat-completions endpoint, on the official `openai` package.

Works with OpenAI (`https://api.openai.com/v1`), a local `vllm serve` (`http://host:8000/v1`),
both through `openai.OpenAI(base_url=...)`, and Azure OpenAI (`azure_api_version` set:
`openai.AzureOpenAI(azure_endpoint=base_url, api_version=...)`, the model name is the
deployment). Settings come from arguments or the environment:

    OPENAI_BASE_URL   (default https://api.openai.com/v1)
    OPENAI_API_KEY    (or the variable named by `api_key_env`; optional for local servers)
    OPENAI_MODEL
    OPENAI_API_VERSION (Azure only, used when the base URL contains "azure")

Requests run concurrently (`concurrency` threads). Retries are the `openai` package's: up to
`max_retries` more attempts on connection errors, timeouts, 408/409/429 and 5xx, with
exponential backoff (0.5 s doubling to 8 s, with jitter) or the server's `Retry-After` /
`retry-after-ms` when it gives one (up to two minutes). Successful answers are cached in
SQLite (`AnswerCache`, the shared `deepretrieval.cache_store` store, kept for ever) keyed by
(endpoint, model, messages, sampling parameters), so a re-run costs nothing. Failures come back
classified in `ChatResult.error`, never raised. The key is never logged, put in an error message
(a server that echoes it has it replaced by `<api key>`), or written to the cache.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence

from deepretrieval.cache_store import SQLiteStore

logger = logging.getLogger(__name__)

Messages = List[Dict[str, str]]
NO_KEY = "EMPTY"  # sent when no key is set (a local `vllm serve` without --api-key ignores it)

@dataclass
class ChatResult:
    """One completion: `texts` (n choices) or a classified `error`.

    error classes: "llm_unavailable" (connection/5xx/429 after all retries), "llm_request_rejected"
    (other 4xx: bad key, unknown model, context too long), "llm_bad_response" (not the OpenAI shape).
    """

    texts: List[str] = field(default_factory=list)
    error: Optional[str] = None
    message: str = ""
    cached: bool = False
    attempts: int = 0
    usage: Dict[str, Any] = field(default_factory=dict)

    @property
    def text(self) -> str:
        return self.texts[0] if self.texts else ""

    @property
    def ok(self) -> bool:
        return self.error is None


class AnswerCache(SQLiteStore):
    """SQLite store of successful answers (`{"texts": [...], "usage": {...}}`), never expiring;
    safe to share between threads and processes; a corrupt file is moved aside and rebuilt."""

    TABLE = "answers"

    def __init__(self, path: "str | os.PathLike[str]"):
        super().__init__(path, table=self.TABLE, ttl=math.inf, name="llm answer cache")

    def get(self, key: str) -> Optional[Dict[str, Any]]:
        return self.get_json(key, decode=_decode_answer)

    def put(self, key: str, value: Dict[str, Any]) -> None:
        self.put_json(key, {"texts": list(value["texts"]), "usage": dict(value.get("usage") or {})})


def _decode_answer(value: Any) -> Dict[str, Any]:
    texts = value["texts"]
    if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
        raise TypeError("cached texts are not a list of strings")
    return {"texts": texts, "usage": value.get("usage") or {}}


class ChatClient:
    """`ChatClient(base_url, model, api_key).complete(messages) -> ChatResult`."""

    def __init__(
        self,
        base_url: Optional[str] = None,
        model: Optional[str] = None,
        api_key: Optional[str] = None,
        api_key_env: str = "OPENAI_API_KEY",
        azure_api_version: Optional[str] = None,
        temperature: float = 0.0,
        max_tokens: int = 1024,
        timeout_s: float = 120.0,
        max_retries: int = 4,
        concurrency: int = 4,
        cache_path: "str | os.PathLike[str] | None" = None,
        extra_body: Optional[Dict[str, Any]] = None,
    ):
        self.base_url = (base_url or os.environ.get("OPENAI_BASE_URL") or "https://api.openai.com/v1").rstrip("/")
        self.model = model or os.environ.get("OPENAI_MODEL")
        if not self.model:
            raise ValueError("no model: pass model= or set OPENAI_MODEL")
        self._api_key = api_key if api_key is not None else os.environ.get(api_key_env)
        self.azure_api_version = azure_api_version or (
            os.environ.get("OPENAI_API_VERSION") if "azure" in self.base_url else None
        )
        self.temperature = temperature
        self.max_tokens = max_tokens
        self.timeout_s = timeout_s
        self.max_retries = max(0, int(max_retries))
        self.concurrency = max(1, concurrency)
        self.extra_body = dict(extra_body or {})
        self.cache = AnswerCache(cache_path) if cache_path else None
        self._local = threading.local()  # attempts of the call running on this thread
        self._openai = self._make_openai()
        if not self._api_key and "api.openai.com" in self.base_url:
            logger.warning("no API key in $%s for %s: requests will be rejected", api_key_env, self.base_url)

    def __repr__(self) -> str:  # the key stays out of logs and tracebacks
        key = "set" if self._api_key else "unset"
        return f"ChatClient(base_url={self.base_url!r}, model={self.model!r}, api_key=<{key}>)"

    def _make_openai(self) -> Any:
        import openai

        # every HTTP attempt (first try and retries) passes this hook: `ChatResult.attempts`
        http_client = openai.DefaultHttpxClient(event_hooks={"request": [self._count_attempt]})
        # a local server needs no key, but the package insists on one: "EMPTY", as vLLM's docs do
        common = dict(api_key=self._api_key or NO_KEY, max_retries=self.max_retries, timeout=self.timeout_s,
                      http_client=http_client)
        if self.azure_api_version:
            return openai.AzureOpenAI(azure_endpoint=self.base_url, api_version=self.azure_api_version, **common)
        return openai.OpenAI(base_url=self.base_url, **common)

    def _count_attempt(self, request: Any) -> None:
        self._local.attempts = getattr(self._local, "attempts", 0) + 1

    # request identity ---------------------------------------------------------------------
    @property
    def url(self) -> str:
        """The chat-completions URL requests go to (part of the cache key)."""
        if self.azure_api_version:
            return (
                f"{self.base_url}/openai/deployments/{self.model}/chat/completions"
                f"?api-version={self.azure_api_version}"
            )
        return f"{self.base_url}/chat/completions"

    def _body(self, messages: Messages, n: int, temperature: Optional[float]) -> Dict[str, Any]:
        body: Dict[str, Any] = {
            "model": self.model,
            "messages": messages,
            "temperature": self.temperature if temperature is None else temperature,
            "max_tokens": self.max_tokens,
        }
        if n > 1:
            body["n"] = n
        body.update(self.extra_body)
        return body

    def cache_key(self, body: Dict[str, Any]) -> str:
        blob = json.dumps({"url": self.url, "body": body}, sort_keys=True, ensure_ascii=False)
        return hashlib.sha256(blob.encode()).hexdigest()

    # calls --------------------------------------------------------------------------------
    def complete(self, messages: Messages, n: int = 1, temperature: Optional[float] = None) -> ChatResult:
        """One chat completion with retries and caching; never raises for service failures."""
        body = self._body(messages, n, temperature)
        key = self.cache_key(body)
        if self.cache is not None:
            hit = self.cache.get(key)
            if hit is not None:
                return ChatResult(texts=hit["texts"], cached=True, usage=hit.get("usage", {}))
        result = self._request(body)
        if result.ok and self.cache is not None:
            self.cache.put(key, {"texts": result.texts, "usage": result.usage})
        return result

    def complete_many(
        self, conversations: Sequence[Messages], n: int = 1, temperature: Optional[float] = None, progress: bool = False
    ) -> List[ChatResult]:
        """`complete` for each conversation, `concurrency` at a time, results in input order."""
        def one(msgs: Messages) -> ChatResult:
            return self.complete(msgs, n=n, temperature=temperature)

        if self.concurrency == 1 or len(conversations) <= 1:
            items = conversations
            if progress:
                from tqdm.auto import tqdm

                items = tqdm(conversations, desc="llm", unit="req")
            return [one(m) for m in items]
        with ThreadPoolExecutor(max_workers=self.concurrency) as pool:
            futures = pool.map(one, conversations)
            if progress:
                from tqdm.auto import tqdm

                futures = tqdm(futures, total=len(conversations), desc="llm", unit="req")
            return list(futures)

    def _request(self, body: Dict[str, Any]) -> ChatResult:
        """Send `body` through the `openai` client (which retries); classify what comes back."""
        import openai

        fields = {name: body[name] for name in ("model", "messages", "temperature", "max_tokens", "n") if name in body}
        extra = {name: value for name, value in body.items() if name not in fields}
        self._local.attempts = 0
        try:
            raw = self._openai.chat.completions.with_raw_response.create(**fields, extra_body=extra or None)
            data = json.loads(raw.text)
        except openai.APIStatusError as exc:  # the last answer was an HTTP error
            retryable = exc.status_code in (408, 409, 429) or exc.status_code >= 500
            return self._failed("llm_unavailable" if retryable else "llm_request_rejected",
                                f"HTTP {exc.status_code}: {_error_text(exc)}")
        except openai.APIConnectionError as exc:  # refused, reset, timed out (APITimeoutError)
            cause = exc.__cause__ or exc.__context__
            detail = f"{type(exc).__name__}: {exc}" + (f" ({type(cause).__name__}: {cause})" if cause else "")
            return self._failed("llm_unavailable", detail)
        except (ValueError, openai.APIResponseValidationError) as exc:  # a 200 whose body is not JSON
            return self._failed("llm_bad_response", f"{type(exc).__name__}: {exc}")
        except openai.OpenAIError as exc:  # anything else the package refuses (e.g. a malformed URL)
            return self._failed("llm_request_rejected", f"{type(exc).__name__}: {exc}")
        return _parse(data, self._local.attempts)

    def _failed(self, error: str, message: str) -> ChatResult:
        if self._api_key:  # a server may quote the key it rejected
            message = message.replace(self._api_key, "<api key>")
        return ChatResult(error=error, message=message[:500], attempts=self._local.attempts)

    def close(self) -> None:
        self._openai.close()
        if self.cache is not None:
            self.cache.close()


def _parse(data: Any, attempts: int) -> ChatResult:
    """An OpenAI-shaped response body -> ChatResult (`llm_bad_response` for any other shape)."""
    try:
        choices = sorted(data["choices"], key=lambda c: c.get("index", 0))
        texts = [c["message"]["content"] or "" for c in choices]
    except (KeyError, TypeError, AttributeError) as exc:
        return ChatResult(error="llm_bad_response", message=f"{type(exc).__name__}: {exc}", attempts=attempts)
    if not texts:
        return ChatResult(error="llm_bad_response", message="no choices in response", attempts=attempts)
    return ChatResult(texts=texts, attempts=attempts, usage=data.get("usage") or {})


def _error_text(exc: Any) -> str:
    """The server's own error message from an `openai.APIStatusError` (its `error.message`)."""
    body = exc.body
    if isinstance(body, dict):
        return str(body.get("message", body))[:300]
    if body is not None:
        return str(body)[:300]
    return str(exc.message)[:300]
