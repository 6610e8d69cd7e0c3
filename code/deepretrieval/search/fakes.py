"""Loopback stand-ins for NCBI esearch and ClinicalTrials.gov API v2, for tests and benchmarks.

They answer with the public services' response shapes (esearch JSON: `header` +
`esearchresult` with `count`/`retmax`/`retstart`/`idlist`/`translationset`/
`querytranslation`/`errorlist`/`warninglist`, or `ERROR`; NCBI's 429 body
`{"error": "API rate limit exceeded", ...}`; CT.gov: `studies[].protocolSection.
identificationModule.nctId`, `nextPageToken`, `totalCount`, text/plain 400s), over real
HTTP on 127.0.0.1 with an OS-chosen port, so the clients' sockets, timeouts and retries are
exercised for real.

Knobs: `latency` (seconds per answer), `rate_limit` (requests per sliding second; above it
HTTP 429 with `Retry-After`), per-query answers (`answers={term: FakeAnswer}`; unknown
terms get deterministic synthetic ids), and injected faults consumed one per request in
order (`inject(Fault(...))`): `error200` (ERROR inside HTTP 200), `status` (any code, with
optional headers/body), `timeout` (answer after `seconds`), `truncated` (JSON cut short
with a matching Content-Length), `short_read` (Content-Length promises more than is sent),
`reset` (close the socket without answering), `redirect` (HTTP `status` 3xx to
`location` + the request's own path and query, as a load balancer would), `drip` (the
answer, its first `size` bytes one every `seconds`, then the rest; `size=0`: all of it),
`drip_headers` (the status line and headers one byte every `seconds`, then the answer),
`huge` (the answer padded to about `size` bytes; `declare_length=False` sends no
Content-Length and closes the connection to end the body), `empty_ids` (HTTP 200 claiming
hits but listing none: esearch `count>0` with an empty `idlist`, a /studies page with
`totalCount>0`, no studies and a `nextPageToken`), `gzip` (the answer, padded to `size`
bytes if given, gzip-compressed and sent in chunks: a well-formed answer, or with a large
`size` a decompression bomb). `FakeCTGovServer(stuck_paging="page")`
answers every page with the first page and the same `nextPageToken`; `stuck_paging="token"`
serves the asked page but always hands out the first `nextPageToken`; `page_cap=n` serves
at most n studies per page whatever `pageSize` asks (as a mirror with a lower cap would).

    with FakePubMedServer(latency=0.15, rate_limit=10) as server:
        engine = PubMedSearchEngine(base_url=server.url, cache=False)
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import json
import socket
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, Deque, Dict, List, Optional, Tuple, Union
from urllib.parse import parse_qs, urlsplit


@dataclass
class FakeAnswer:
    """What the fake returns for one query: the full ranked id list and extra fields."""

    ids: List[str]
    querytranslation: Optional[str] = None
    errorlist: Optional[Dict[str, List[str]]] = None
    warninglist: Optional[Dict[str, List[str]]] = None
    error: Optional[str] = None  # esearch ERROR inside HTTP 200 (every time this term is asked)


@dataclass
class Fault:
    """One injected misbehaviour (see the module docstring for `kind`)."""

    kind: str
    status: int = 500
    headers: Dict[str, str] = field(default_factory=dict)
    body: Optional[str] = None
    message: str = "Search Backend failed: Database is not available"
    seconds: float = 1.0
    match: Optional[str] = None  # only requests whose term contains this substring
    location: Optional[str] = None  # redirect: scheme://host:port[/prefix] the request is sent on to
    size: int = 0  # drip: bytes dripped (0 = all); huge: body size in bytes
    declare_length: bool = True  # huge: send a Content-Length (else end the body by closing)


@dataclass
class RecordedRequest:
    method: str
    path: str
    params: Dict[str, str]
    time: float
    status: int = 0


def synthetic_ids(term: str, n: Optional[int] = None, prefix: str = "", digits: int = 8) -> List[str]:
    """Deterministic ids for a term: count in [50, 5050) unless `n`, values from a hash chain."""
    seed = hashlib.sha256(term.encode("utf-8")).digest()
    count = n if n is not None else 50 + int.from_bytes(seed[:4], "big") % 5000
    out, seen = [], set()
    i = 0
    while len(out) < count:
        h = hashlib.sha256(seed + i.to_bytes(4, "big")).digest()
        value = int.from_bytes(h[:6], "big") % (10 ** digits)
        ident = f"{prefix}{value:0{digits}d}" if prefix else str(value or 1)
        if ident not in seen:
            seen.add(ident)
            out.append(ident)
        i += 1
    return out


class _Handler(BaseHTTPRequestHandler):
    server: "_LoopbackHTTPServer"
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # keep test output quiet
        pass

    def setup(self) -> None:
        super().setup()
        # Headers and body leave in separate writes; without TCP_NODELAY, Nagle + the
        # client's delayed ACK add ~40 ms to every answer, which would distort benchmarks.
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def _params(self) -> Dict[str, str]:
        query = urlsplit(self.path).query
        params = {k: v[-1] for k, v in parse_qs(query, keep_blank_values=True).items()}
        if self.command == "POST":
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length).decode("utf-8") if length else ""
            params.update({k: v[-1] for k, v in parse_qs(body, keep_blank_values=True).items()})
        return params

    def do_GET(self) -> None:
        self.server.owner._dispatch(self, self._params())

    def do_POST(self) -> None:
        self.server.owner._dispatch(self, self._params())

    def send_body(self, status: int, body: Union[str, bytes], content_type: str = "application/json",
                  headers: Optional[Dict[str, str]] = None, declared_length: Optional[int] = None) -> None:
        data = body.encode("utf-8") if isinstance(body, str) else body
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(declared_length if declared_length is not None else len(data)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        if declared_length is not None:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        self.wfile.write(data)
        self.wfile.flush()


class _LoopbackHTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128

    def __init__(self, owner: "_FakeService"):
        self.owner = owner
        super().__init__(("127.0.0.1", 0), _Handler)


class _FakeService:
    """Server thread, request log, latency, sliding-window rate limit and fault queue."""

    retry_after = "1"

    def __init__(self, latency: float = 0.0, rate_limit: Optional[float] = None, retry_after: Union[int, float, str] = 1):
        self.latency = latency
        self.rate_limit = rate_limit
        self.retry_after = str(retry_after)
        self.requests: List[RecordedRequest] = []
        self.faults: Deque[Fault] = deque()
        self._window: Deque[float] = deque()
        self._lock = threading.Lock()
        self._server: Optional[_LoopbackHTTPServer] = None
        self._thread: Optional[threading.Thread] = None
        self.rate_limited = 0

    # lifecycle
    def start(self) -> "_FakeService":
        self._server = _LoopbackHTTPServer(self)
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    @property
    def port(self) -> int:
        assert self._server is not None, "server not started"
        return self._server.server_address[1]

    @property
    def root(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def inject(self, *faults: Fault) -> None:
        with self._lock:
            self.faults.extend(faults)

    def reset_log(self) -> None:
        with self._lock:
            self.requests.clear()
            self.rate_limited = 0

    # request handling
    def _over_limit(self, now: float) -> bool:
        if not self.rate_limit:
            return False
        while self._window and now - self._window[0] >= 1.0:
            self._window.popleft()
        if len(self._window) >= self.rate_limit:
            return True
        self._window.append(now)
        return False

    def _take_fault(self, term: str) -> Optional[Fault]:
        for index, fault in enumerate(self.faults):
            if fault.match is None or fault.match in term:
                del self.faults[index]
                return fault
        return None

    def _term(self, params: Dict[str, str]) -> str:
        raise NotImplementedError  # abstract: each fake server (PubMed, ClinicalTrials.gov) defines it

    def _dispatch(self, handler: _Handler, params: Dict[str, str]) -> None:
        now = time.time()
        record = RecordedRequest(handler.command, urlsplit(handler.path).path, params, now)
        with self._lock:
            self.requests.append(record)
            limited = self._over_limit(now)
            fault = None if limited else self._take_fault(self._term(params))
            if limited:
                self.rate_limited += 1
        if self.latency:
            time.sleep(self.latency)
        if limited:
            record.status = 429
            handler.send_body(429, self._rate_limit_body(), headers={"Retry-After": self.retry_after})
            return
        if fault is not None:
            record.status = self._apply_fault(handler, fault, params)
            return
        status, body, ctype = self._answer(handler, params)
        record.status = status
        handler.send_body(status, body, content_type=ctype)

    def _rate_limit_body(self) -> str:
        return json.dumps({"error": "rate limit exceeded"})

    def _error200_body(self, message: str) -> str:
        return json.dumps({"error": message})

    def _apply_fault(self, handler: _Handler, fault: Fault, params: Dict[str, str]) -> int:
        if fault.kind == "timeout":
            time.sleep(fault.seconds)
            status, body, ctype = self._answer(handler, params)
            try:
                handler.send_body(status, body, content_type=ctype)
            except OSError:
                pass  # the client gave up
            return status
        if fault.kind == "reset":
            handler.close_connection = True
            try:
                handler.connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            return 0
        if fault.kind == "status":
            body = fault.body if fault.body is not None else json.dumps({"error": f"HTTP {fault.status}"})
            ctype = "application/json" if body.startswith("{") else "text/plain"
            handler.send_body(fault.status, body, content_type=ctype, headers=fault.headers)
            return fault.status
        if fault.kind == "error200":
            handler.send_body(200, self._error200_body(fault.message))
            return 200
        if fault.kind in ("truncated", "short_read"):
            _, body, _ = self._answer(handler, params)
            cut = body[: max(1, len(body) // 2)]
            declared = len(body.encode("utf-8")) if fault.kind == "short_read" else None
            handler.send_body(200, cut, declared_length=declared)
            return 200
        if fault.kind == "redirect":
            target = (fault.location or self.root).rstrip("/") + handler.path
            handler.send_body(fault.status if 300 <= fault.status < 400 else 302, "", content_type="text/plain",
                              headers={"Location": target})
            return fault.status
        if fault.kind == "drip_headers":
            _, body, ctype = self._answer(handler, params)
            data = body.encode("utf-8")
            head = (f"HTTP/1.1 200 OK\r\nContent-Type: {ctype}\r\nX-Padding: {'p' * 200}\r\n"
                    f"Content-Length: {len(data)}\r\n\r\n").encode("ascii")
            try:
                for index in range(len(head)):
                    time.sleep(fault.seconds)
                    handler.wfile.write(head[index:index + 1])
                    handler.wfile.flush()
                handler.wfile.write(data)
                handler.wfile.flush()
            except OSError:
                handler.close_connection = True  # the client gave up
            return 200
        if fault.kind == "drip":
            _, body, ctype = self._answer(handler, params)
            return self._drip(handler, body.encode("utf-8"), ctype, fault)
        if fault.kind == "huge":
            _, body, ctype = self._answer(handler, params)
            return self._huge(handler, body, fault)
        if fault.kind == "gzip":
            _, body, ctype = self._answer(handler, params)
            if fault.size > len(body):
                body = '{"pad":"' + "x" * (fault.size - len(body) - 10) + '",' + body.lstrip()[1:]
            data = gzip.compress(body.encode("utf-8"))
            handler.send_response(200)
            handler.send_header("Content-Type", ctype)
            handler.send_header("Content-Encoding", "gzip")
            handler.send_header("Transfer-Encoding", "chunked")
            handler.end_headers()
            for start in range(0, len(data), 4096):
                part = data[start:start + 4096]
                handler.wfile.write(b"%x\r\n%s\r\n" % (len(part), part))
            handler.wfile.write(b"0\r\n\r\n")
            handler.wfile.flush()
            return 200
        if fault.kind == "empty_ids":
            handler.send_body(200, self._empty_ids_body(params))
            return 200
        raise ValueError(f"unknown fault kind {fault.kind!r}")

    @staticmethod
    def _drip(handler: _Handler, data: bytes, ctype: str, fault: Fault) -> int:
        slow = len(data) if fault.size <= 0 else min(fault.size, len(data))
        try:
            handler.send_response(200)
            handler.send_header("Content-Type", ctype)
            handler.send_header("Content-Length", str(len(data)))
            handler.end_headers()
            handler.wfile.flush()
            for index in range(slow):
                time.sleep(fault.seconds)
                handler.wfile.write(data[index:index + 1])
                handler.wfile.flush()
            handler.wfile.write(data[slow:])
            handler.wfile.flush()
        except OSError:
            handler.close_connection = True  # the client gave up
        return 200

    @staticmethod
    def _huge(handler: _Handler, body: str, fault: Fault) -> int:
        # Valid JSON: {"pad": "xxxx...", <the real answer's fields>}
        head, tail = b'{"pad":"', ('",' + body.lstrip()[1:]).encode("utf-8")
        pad = max(fault.size - len(head) - len(tail), 0)
        try:
            handler.send_response(200)
            handler.send_header("Content-Type", "application/json")
            if fault.declare_length:
                handler.send_header("Content-Length", str(len(head) + pad + len(tail)))
            else:
                handler.send_header("Connection", "close")
                handler.close_connection = True
            handler.end_headers()
            handler.wfile.write(head)
            block = b"x" * 65536
            while pad > 0:
                handler.wfile.write(block[:pad])
                pad -= min(pad, len(block))
            handler.wfile.write(tail)
            handler.wfile.flush()
        except OSError:
            handler.close_connection = True  # the client stopped reading
        return 200

    def _empty_ids_body(self, params: Dict[str, str]) -> str:
        raise NotImplementedError  # abstract: each fake server (PubMed, ClinicalTrials.gov) defines it

    def _answer(self, handler: _Handler, params: Dict[str, str]) -> Tuple[int, str, str]:
        raise NotImplementedError  # abstract: each fake server (PubMed, ClinicalTrials.gov) defines it


class FakePubMedServer(_FakeService):
    """`/esearch.fcgi` with esearch's JSON shapes. `url` is the E-utilities base URL."""

    def __init__(
        self,
        answers: Optional[Dict[str, FakeAnswer]] = None,
        latency: float = 0.0,
        rate_limit: Optional[float] = None,
        retry_after: Union[int, float, str] = 1,
        max_retrievable: int = 9999,
        default: Optional[Callable[[str], FakeAnswer]] = None,
    ):
        super().__init__(latency, rate_limit, retry_after)
        self.answers = dict(answers or {})
        self.max_retrievable = max_retrievable
        self.default = default or (lambda term: FakeAnswer(ids=synthetic_ids(term)))

    @property
    def url(self) -> str:
        return f"{self.root}/entrez/eutils/"

    def _term(self, params: Dict[str, str]) -> str:
        return params.get("term", "")

    def _rate_limit_body(self) -> str:
        # NCBI's own 429 body.
        return json.dumps({"error": "API rate limit exceeded", "api-key": "127.0.0.1",
                           "count": str(len(self._window) + 1), "limit": str(int(self.rate_limit or 0))})

    def _error200_body(self, message: str) -> str:
        return json.dumps({"header": {"type": "esearch", "version": "0.3"}, "esearchresult": {"ERROR": message}})

    def _empty_ids_body(self, params: Dict[str, str]) -> str:
        result = {"count": "125", "retmax": "0", "retstart": params.get("retstart", "0"), "idlist": [],
                  "translationset": [], "querytranslation": params.get("term", "")}
        return json.dumps({"header": {"type": "esearch", "version": "0.3"}, "esearchresult": result})

    def _answer(self, handler: _Handler, params: Dict[str, str]) -> Tuple[int, str, str]:
        if urlsplit(handler.path).path.rstrip("/").split("/")[-1] != "esearch.fcgi":
            return 404, "Not Found", "text/plain"
        header = {"type": "esearch", "version": "0.3"}
        term = params.get("term", "")
        if params.get("db") != "pubmed":
            return 200, json.dumps({"header": header, "esearchresult": {"ERROR": "Database is not supported: " + params.get("db", "")}}), "application/json"
        if not term.strip():
            return 200, json.dumps({"header": header, "esearchresult": {"ERROR": "Empty term and query_key - nothing todo"}}), "application/json"
        answer = self.answers.get(term) or self.default(term)
        if answer.error:
            return 200, json.dumps({"header": header, "esearchresult": {"ERROR": answer.error}}), "application/json"
        try:
            retstart = int(params.get("retstart", "0"))
            retmax = int(params.get("retmax", "20"))
        except ValueError:
            return 400, json.dumps({"error": "retstart/retmax must be integers"}), "application/json"
        ids = answer.ids
        if "mindate" in params or "maxdate" in params:
            # Mirror NCBI: both bounds are needed; the fake does not know dates, so it keeps
            # every other id to make the filter visible to tests.
            if not (params.get("mindate") and params.get("maxdate")):
                return 200, json.dumps({"header": header, "esearchresult": {"ERROR": "mindate and maxdate must be used together"}}), "application/json"
            ids = ids[::2]
        if retstart + retmax > self.max_retrievable:
            retmax = max(self.max_retrievable - retstart, 0)
        page = ids[retstart: retstart + retmax]
        result: Dict[str, Any] = {
            "count": str(len(ids)),
            "retmax": str(len(page)),
            "retstart": str(retstart),
            "idlist": page,
            "translationset": [],
            "querytranslation": answer.querytranslation if answer.querytranslation is not None else f"{term}[All Fields]",
        }
        if answer.errorlist is not None:
            result["errorlist"] = answer.errorlist
        if answer.warninglist is not None:
            result["warninglist"] = answer.warninglist
        elif not ids:
            result["warninglist"] = {"phrasesignored": [], "quotedphrasesnotfound": [], "outputmessages": ["No items found."]}
        return 200, json.dumps({"header": header, "esearchresult": result}), "application/json"


class FakeCTGovServer(_FakeService):
    """`/api/v2/studies` with the v2 JSON shapes. `url` is the API base URL."""

    KNOWN_PARAMS = {"query.term", "pageSize", "pageToken", "fields", "countTotal", "format", "filter.advanced"}

    def __init__(
        self,
        answers: Optional[Dict[str, List[str]]] = None,
        latency: float = 0.0,
        rate_limit: Optional[float] = None,
        retry_after: Union[int, float, str] = 1,
        stuck_paging: Optional[str] = None,
        page_cap: Optional[int] = None,
    ):
        super().__init__(latency, rate_limit, retry_after)
        self.answers = dict(answers or {})
        if stuck_paging not in (None, "page", "token"):
            raise ValueError(f"stuck_paging must be None, 'page' or 'token', got {stuck_paging!r}")
        self.stuck_paging = stuck_paging
        self.page_cap = page_cap

    @property
    def url(self) -> str:
        return f"{self.root}/api/v2/"

    def _empty_ids_body(self, params: Dict[str, str]) -> str:
        term = params.get("query.term", "")
        return json.dumps({"studies": [], "nextPageToken": self._token(term, 0), "totalCount": 125})

    def _term(self, params: Dict[str, str]) -> str:
        return params.get("query.term", "")

    @staticmethod
    def _token(term: str, offset: int) -> str:
        raw = json.dumps([hashlib.sha1(term.encode()).hexdigest()[:8], offset]).encode()
        return base64.urlsafe_b64encode(raw).decode().rstrip("=")

    @staticmethod
    def _untoken(token: str) -> Tuple[str, int]:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        tag, offset = json.loads(raw)
        return tag, int(offset)

    def _answer(self, handler: _Handler, params: Dict[str, str]) -> Tuple[int, str, str]:
        if urlsplit(handler.path).path.rstrip("/") != "/api/v2/studies":
            return 404, "Not Found", "text/plain"
        for name in params:
            if name not in self.KNOWN_PARAMS:
                return 400, f"`{name}` is unknown parameter", "text/plain"
        term = params.get("query.term", "")
        if term.count("[") != term.count("]") or term.count("(") != term.count(")"):
            return 400, f"Error parsing query in `query.term`: mismatched input at '{term[-10:]}'", "text/plain"
        try:
            size = int(params.get("pageSize", "10"))
        except ValueError:
            return 400, "Parameter `pageSize` has incorrect format", "text/plain"
        if not 0 <= size <= 1000:
            return 400, "Parameter `pageSize` must be between 0 and 1000", "text/plain"
        ids = self.answers.get(term)
        if ids is None:
            ids = synthetic_ids(term, prefix="NCT", digits=8)
        if params.get("filter.advanced"):
            ids = ids[::2]
        offset = 0
        if params.get("pageToken"):
            try:
                tag, offset = self._untoken(params["pageToken"])
            except (ValueError, TypeError):
                return 400, "Parameter `pageToken` has incorrect format", "text/plain"
            if tag != hashlib.sha1(term.encode()).hexdigest()[:8]:
                return 400, "Parameter `pageToken` does not match the query", "text/plain"
        if self.page_cap is not None:
            size = min(size, self.page_cap)
        if self.stuck_paging == "page":
            offset = 0  # a broken server: page one and the same token, whatever was asked
        page = ids[offset: offset + size]
        body: Dict[str, Any] = {
            "studies": [{"protocolSection": {"identificationModule": {"nctId": n}}} for n in page]
        }
        if offset + size < len(ids):
            body["nextPageToken"] = self._token(term, size if self.stuck_paging else offset + size)  # stuck: page 2
        if params.get("countTotal", "").lower() == "true":
            body["totalCount"] = len(ids)
        return 200, json.dumps(body), "application/json"
