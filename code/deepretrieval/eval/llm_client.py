"""A small client for any OpenAI-compatible chat-completions endpoint.

Works with OpenAI (`https://api.openai.com/v1`), a local `vllm serve` (`http://host:8000/v1`),
and Azure OpenAI (`azure_api_version` set: the URL becomes
`{base}/openai/deployments/{model}/chat/completions?api-version=...` and the key goes in the
`api-key` header). Settings come from arguments or the environment:

    OPENAI_BASE_URL   (default https://api.openai.com/v1)
    OPENAI_API_KEY    (or the variable named by `api_key_env`; optional for local servers)
    OPENAI_MODEL
    OPENAI_API_VERSION (Azure only)

Requests run concurrently (`concurrency` threads), are retried with exponential backoff on
connection errors, 408/409/429 and 5xx (honouring `Retry-After`), and successful answers are
cached in SQLite keyed by (endpoint, model, messages, sampling parameters), so a re-run costs
nothing. Failures come back classified in `ChatResult.error`, never raised. The key is never
logged, put in an error message, or written to the cache.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sqlite3
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import requests

logger = logging.getLogger(__name__)

Messages = List[Dict[str, str]]

RETRY_STATUS = {408, 409, 429, 500, 502, 503, 504}


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


class AnswerCache:
    """SQLite store of successful answers; safe to share between threads and processes."""

    def __init__(self, path: "str | os.PathLike[str]"):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._conn = sqlite3.connect(str(self.path), timeout=30, check_same_thread=False)
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("CREATE TABLE IF NOT EXISTS answers (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
        self._conn.commit()

    def get(self, key: str) -> Optional[Dict[str, Any]]:
        with self._lock:
            row = self._conn.execute("SELECT value FROM answers WHERE key = ?", (key,)).fetchone()
        return json.loads(row[0]) if row else None

    def put(self, key: str, value: Dict[str, Any]) -> None:
        with self._lock:
            self._conn.execute("INSERT OR REPLACE INTO answers VALUES (?, ?)", (key, json.dumps(value)))
            self._conn.commit()

    def close(self) -> None:
        with self._lock:
            self._conn.close()


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
        backoff_s: float = 1.0,
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
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        self.concurrency = max(1, concurrency)
        self.extra_body = dict(extra_body or {})
        self.cache = AnswerCache(cache_path) if cache_path else None
        self._local = threading.local()
        if not self._api_key and "api.openai.com" in self.base_url:
            logger.warning("no API key in $%s for %s: requests will be rejected", api_key_env, self.base_url)

    def __repr__(self) -> str:  # the key stays out of logs and tracebacks
        key = "set" if self._api_key else "unset"
        return f"ChatClient(base_url={self.base_url!r}, model={self.model!r}, api_key=<{key}>)"

    # request building ---------------------------------------------------------------------
    @property
    def url(self) -> str:
        if self.azure_api_version:
            return (
                f"{self.base_url}/openai/deployments/{self.model}/chat/completions"
                f"?api-version={self.azure_api_version}"
            )
        return f"{self.base_url}/chat/completions"

    def _headers(self) -> Dict[str, str]:
        headers = {"Content-Type": "application/json"}
        if self._api_key:
            if self.azure_api_version:
                headers["api-key"] = self._api_key
            else:
                headers["Authorization"] = f"Bearer {self._api_key}"
        return headers

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

    def _session(self) -> requests.Session:
        sess = getattr(self._local, "session", None)
        if sess is None:
            sess = self._local.session = requests.Session()
        return sess

    # calls --------------------------------------------------------------------------------
    def complete(self, messages: Messages, n: int = 1, temperature: Optional[float] = None) -> ChatResult:
        """One chat completion with retries and caching; never raises for service failures."""
        body = self._body(messages, n, temperature)
        key = self.cache_key(body)
        if self.cache is not None:
            hit = self.cache.get(key)
            if hit is not None:
                return ChatResult(texts=hit["texts"], cached=True, usage=hit.get("usage", {}))
        result = self._post_with_retries(body)
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

    def _post_with_retries(self, body: Dict[str, Any]) -> ChatResult:
        last_error, last_message = "llm_unavailable", ""
        for attempt in range(1, self.max_retries + 2):
            wait = self.backoff_s * (2 ** (attempt - 1))
            try:
                resp = self._session().post(self.url, json=body, headers=self._headers(), timeout=self.timeout_s)
            except requests.RequestException as exc:
                # the exception text can hold the URL but never the headers, so it is safe to keep
                last_error, last_message = "llm_unavailable", f"{type(exc).__name__}: {exc}"
            else:
                if resp.status_code == 200:
                    return self._parse(resp, attempt)
                last_message = f"HTTP {resp.status_code}: {_error_text(resp)}"
                if resp.status_code not in RETRY_STATUS:
                    return ChatResult(error="llm_request_rejected", message=last_message, attempts=attempt)
                last_error = "llm_unavailable"
                retry_after = resp.headers.get("Retry-After")
                if retry_after:
                    try:
                        wait = max(0.0, float(retry_after))
                    except ValueError:
                        pass
            if attempt <= self.max_retries:
                logger.debug("chat request failed (%s); retry %d in %.1fs", last_message, attempt, wait)
                time.sleep(wait)
        return ChatResult(error=last_error, message=last_message, attempts=self.max_retries + 1)

    @staticmethod
    def _parse(resp: requests.Response, attempt: int) -> ChatResult:
        try:
            data = resp.json()
            choices = sorted(data["choices"], key=lambda c: c.get("index", 0))
            texts = [c["message"]["content"] or "" for c in choices]
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            return ChatResult(error="llm_bad_response", message=f"{type(exc).__name__}: {exc}", attempts=attempt)
        if not texts:
            return ChatResult(error="llm_bad_response", message="no choices in response", attempts=attempt)
        return ChatResult(texts=texts, attempts=attempt, usage=data.get("usage") or {})

    def close(self) -> None:
        if self.cache is not None:
            self.cache.close()


def _error_text(resp: requests.Response) -> str:
    try:
        err = resp.json().get("error")
        if isinstance(err, dict):
            return str(err.get("message", ""))[:300]
        return str(err)[:300]
    except ValueError:
        return resp.text[:300]
