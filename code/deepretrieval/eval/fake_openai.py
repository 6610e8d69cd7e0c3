"""A loopback OpenAI-compatible chat-completions server for tests and offline demos.

It answers `POST /v1/chat/completions` (and Azure's
`/openai/deployments/<name>/chat/completions?api-version=...`) with whatever a `responder`
function returns for the request body, in the OpenAI response shape. Failures can be scripted:
`fail_next(status, times, retry_after)` makes the next requests fail with that HTTP status (and,
when `retry_after` is given, a `Retry-After` header of that many seconds), which is how tests
exercise retries; a responder may return `(status, body)` to answer anything at all (a `str` or
`bytes` body is sent as is, e.g. text that is not JSON).
It binds 127.0.0.1 on a free port and never touches the network.
"""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

Responder = Callable[[Dict[str, Any]], Union[str, Tuple[int, Any]]]


def echo_last_user(body: Dict[str, Any]) -> str:
    """Default responder: repeats the last user message inside <answer> tags."""
    users = [m.get("content", "") for m in body.get("messages", []) if m.get("role") == "user"]
    return f"<answer>{users[-1] if users else ''}</answer>"


class _QuietServer(ThreadingHTTPServer):
    """A client that gave up (a timeout test) closes its socket mid-answer: not worth a traceback."""

    def handle_error(self, request: Any, client_address: Any) -> None:
        import sys

        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


class FakeOpenAIServer:
    """`with FakeOpenAIServer(responder, api_key="k") as srv: srv.base_url -> http://127.0.0.1:P/v1`.

    `requests` keeps every parsed request body (and the headers minus the key) for assertions.
    When `api_key` is set, requests without `Authorization: Bearer <key>` or `api-key: <key>`
    get 401, like the real service.
    """

    def __init__(self, responder: Optional[Responder] = None, api_key: Optional[str] = None, delay_s: float = 0.0):
        self.responder = responder or echo_last_user
        self.api_key = api_key
        self.delay_s = delay_s
        self.requests: List[Dict[str, Any]] = []
        self.paths: List[str] = []
        self._failures: List[Tuple[int, Optional[float]]] = []
        self._lock = threading.Lock()
        self._server: Optional[ThreadingHTTPServer] = None
        self._thread: Optional[threading.Thread] = None

    # scripted failures --------------------------------------------------------------------
    def fail_next(self, status: int = 500, times: int = 1, retry_after: Optional[float] = None) -> None:
        """The next `times` requests get HTTP `status` (with `Retry-After: retry_after` if given)."""
        with self._lock:
            self._failures.extend([(status, retry_after)] * times)

    def clear_failures(self) -> None:
        with self._lock:
            self._failures.clear()

    def _pop_failure(self) -> Optional[Tuple[int, Optional[float]]]:
        with self._lock:
            return self._failures.pop(0) if self._failures else None

    # lifecycle ----------------------------------------------------------------------------
    @property
    def base_url(self) -> str:
        assert self._server is not None, "server not started"
        return f"http://127.0.0.1:{self._server.server_address[1]}/v1"

    @property
    def root_url(self) -> str:
        assert self._server is not None, "server not started"
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def start(self) -> "FakeOpenAIServer":
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:  # keep test output clean
                pass

            def _send(self, status: int, payload: Any, retry_after: Optional[float] = None) -> None:
                data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                if retry_after is not None:
                    self.send_header("Retry-After", str(retry_after))
                self.end_headers()
                self.wfile.write(data)

            def do_POST(self) -> None:  # noqa: N802 (http.server naming)
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length)
                path = self.path.split("?")[0]
                if not path.endswith("/chat/completions"):
                    return self._send(404, {"error": {"message": f"no route {path}"}})
                if server.api_key is not None:
                    auth = self.headers.get("Authorization", "")
                    if auth != f"Bearer {server.api_key}" and self.headers.get("api-key") != server.api_key:
                        return self._send(401, {"error": {"message": "invalid api key"}})
                try:
                    body = json.loads(raw)
                except json.JSONDecodeError:
                    return self._send(400, {"error": {"message": "body is not JSON"}})
                with server._lock:
                    server.requests.append(body)
                    server.paths.append(self.path)
                if server.delay_s:
                    time.sleep(server.delay_s)
                failure = server._pop_failure()
                if failure is not None:
                    status, retry_after = failure
                    return self._send(status, {"error": {"message": f"scripted failure {status}"}}, retry_after)
                try:
                    answer = server.responder(body)
                except Exception as exc:  # a broken responder is a server error, as in real life
                    return self._send(500, {"error": {"message": repr(exc)}})
                if isinstance(answer, tuple):
                    status, payload = answer
                    return self._send(status, payload if not isinstance(payload, str) else payload.encode())
                n = int(body.get("n") or 1)
                self._send(
                    200,
                    {
                        "id": "chatcmpl-fake",
                        "object": "chat.completion",
                        "created": int(time.time()),
                        "model": body.get("model", "fake"),
                        "choices": [
                            {"index": i, "message": {"role": "assistant", "content": answer}, "finish_reason": "stop"}
                            for i in range(n)
                        ],
                        "usage": {"prompt_tokens": 0, "completion_tokens": len(answer.split()), "total_tokens": 0},
                    },
                )

        self._server = _QuietServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> "FakeOpenAIServer":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()
