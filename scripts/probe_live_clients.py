"""Replay issue #19's live-client fault scenarios against the loopback fakes; print what happened.

Each scenario runs in its own subprocess (so peak memory is its own) with a wall-clock cap,
using the engines importable from PYTHONPATH (point it at an older checkout's `code/` to
measure "before") and the fakes of *this* checkout, loaded by file path. Engines are built
with their defaults (30 s read timeout, 5 retries, default backoff) except the rate limit.

    PYTHONPATH=code python scripts/probe_live_clients.py                 # all scenarios
    PYTHONPATH=code python scripts/probe_live_clients.py --only drip,stall --cap 300

Output: one JSON line per scenario, then a summary table.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

FAKES = Path(__file__).resolve().parents[1] / "code" / "deepretrieval" / "search" / "fakes.py"
KEY = "probe-key-123456"
SCENARIOS = ("redirect_get", "redirect_post", "endless_paging", "empty_ids", "drip", "stall",
             "retry_after", "huge", "huge_undeclared", "short_key")


def _fakes():
    spec = importlib.util.spec_from_file_location("probe_fakes", FAKES)
    module = importlib.util.module_from_spec(spec)
    sys.modules["probe_fakes"] = module
    spec.loader.exec_module(module)
    return module


def _outcome(fn):
    start = time.perf_counter()
    try:
        result = fn()
        out = {"ok": True, "ids": len(result.ids), "total": result.total, "cached": result.cached}
    except Exception as exc:  # the probe reports whatever happened
        out = {"ok": False, "error": type(exc).__name__, "kind": getattr(exc, "kind", None),
               "reason": getattr(exc, "reason", None), "message": str(exc)[:200]}
    out["elapsed_s"] = round(time.perf_counter() - start, 2)
    return out


def run_scenario(name: str, tmp: Path) -> dict:
    fakes = _fakes()
    from deepretrieval.search.ctgov import CTGovSearchEngine
    from deepretrieval.search.pubmed import PubMedSearchEngine

    def pubmed(server, **kw):
        options = dict(base_url=server.url, cache=False, rate_limit=0, ratelimit_dir=tmp / "rl")
        options.update(kw)
        return PubMedSearchEngine(**options)

    if name in ("redirect_get", "redirect_post"):
        with fakes.FakePubMedServer() as good, fakes.FakePubMedServer() as evil:
            status = 302 if name == "redirect_get" else 307
            good.inject(fakes.Fault("redirect", status=status, location=f"http://localhost:{evil.port}"))
            query = "asthma" if name == "redirect_get" else " OR ".join(f"term{i}[tiab]" for i in range(400))
            out = _outcome(lambda: pubmed(good, api_key=KEY).search(query, k=5))
            out["other_host_requests"] = len(evil.requests)
            out["other_host_got_key"] = sum(r.params.get("api_key") == KEY for r in evil.requests)
            out["other_host_methods"] = [r.method for r in evil.requests]
        return out
    if name == "endless_paging":
        ids = [f"NCT{i:08d}" for i in range(5000)]
        with fakes.FakeCTGovServer(answers={"q": ids}, stuck_paging="page") as server:
            engine = CTGovSearchEngine(base_url=server.url, cache=False, rate_limit=0, page_size=100,
                                       ratelimit_dir=tmp / "rl")
            box = {}
            thread = threading.Thread(target=lambda: box.update(_outcome(lambda: engine.search("q", k=1000))),
                                      daemon=True)
            thread.start()
            thread.join(10.0)
            out = dict(box) if box else {"ok": None, "still_paging_after_s": 10.0}
            out["pages_requested"] = len(server.requests)
        return out
    if name == "empty_ids":
        with fakes.FakePubMedServer() as server:
            server.inject(fakes.Fault("empty_ids"))
            engine = pubmed(server, cache=tmp / "cache.sqlite", backoff_base=0.01)
            out = _outcome(lambda: engine.search("asthma", k=10))
            again = _outcome(lambda: engine.search("asthma", k=10))  # the glitch is over
            out["second_search"] = again
            out["requests"] = len(server.requests)
        return out
    if name == "drip":
        with fakes.FakePubMedServer() as server:
            server.inject(fakes.Fault("drip", seconds=2.0, size=38))
            return _outcome(lambda: pubmed(server).search("asthma", k=10))
    if name == "stall":
        with fakes.FakePubMedServer() as server:
            server.inject(*[fakes.Fault("timeout", seconds=45.0)] * 6)
            out = _outcome(lambda: pubmed(server).search("asthma", k=10))
            out["attempts"] = len(server.requests)
        return out
    if name == "retry_after":
        from deepretrieval.search.ratelimit import RateLimiter, credential_tag

        records = []
        handler = logging.Handler()
        handler.emit = lambda record: records.append(f"{record.levelname} {record.getMessage()}")
        logging.getLogger("deepretrieval").addHandler(handler)
        logging.getLogger("deepretrieval").setLevel(logging.INFO)
        with fakes.FakePubMedServer() as server:
            server.inject(fakes.Fault("status", status=429, headers={"Retry-After": "590"}))
            engine = pubmed(server, api_key=KEY, rate_limit=10)
            box = {}
            thread = threading.Thread(target=lambda: box.update(_outcome(lambda: engine.search("asthma", k=5))),
                                      daemon=True)
            thread.start()
            while not server.requests:
                time.sleep(0.01)
            thread.join(5.0)
            host = server.url.split("//")[1].split("/")[0]
            other = RateLimiter(10, credential_tag(f"ncbi@{host}", KEY), tmp / "rl")
            out = {"limiter_ahead_s": round(other.reserve() - time.time(), 1)}
            out["search"] = dict(box) if box else {"ok": None, "still_waiting_after_s": 5.0}
            out["log"] = [r for r in records if "Retry-After" in r or "pause" in r][:3]
            out["stats"] = {k: v for k, v in engine.stats().items() if "retry_after" in k or "rate" in k}
        return out
    if name in ("huge", "huge_undeclared"):
        with fakes.FakePubMedServer() as server:
            server.inject(fakes.Fault("huge", size=50_000_000, declare_length=name == "huge"))
            before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            out = _outcome(lambda: pubmed(server).search("asthma", k=10))
            out["peak_rss_growth_mb"] = round((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024, 1)
        return out
    if name == "short_key":
        lines = []
        handler = logging.Handler()
        handler.emit = lambda record: lines.append(record.getMessage())
        logging.getLogger().addHandler(handler)
        logging.getLogger().setLevel(logging.DEBUG)
        with fakes.FakePubMedServer() as server:
            out = _outcome(lambda: pubmed(server, api_key="Zq7").search("asthma", k=5))
        out["log_lines"] = len(lines)
        out["log_lines_with_key"] = sum("api_key=Zq7" in line for line in lines)
        return out
    raise ValueError(f"unknown scenario {name!r}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default=",".join(SCENARIOS), help="comma-separated scenario names")
    parser.add_argument("--cap", type=float, default=400.0, help="wall-clock cap per scenario (s)")
    parser.add_argument("--scenario", help=argparse.SUPPRESS)  # internal: run one in-process
    args = parser.parse_args(argv)
    if args.scenario:
        with tempfile.TemporaryDirectory() as tmp:
            print(json.dumps(run_scenario(args.scenario, Path(tmp))), flush=True)
        return
    rows = []
    for name in [n.strip() for n in args.only.split(",") if n.strip()]:
        start = time.perf_counter()
        try:
            proc = subprocess.run([sys.executable, __file__, "--scenario", name], capture_output=True,
                                  text=True, timeout=args.cap)
            lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
            result = json.loads(lines[-1]) if lines else {"crashed": proc.stderr[-300:]}
        except subprocess.TimeoutExpired:
            result = {"ok": None, "killed_after_s": args.cap}
        result["wall_s"] = round(time.perf_counter() - start, 1)
        rows.append((name, result))
        print(json.dumps({"scenario": name, **result}), flush=True)
    print()
    for name, result in rows:
        print(f"{name:16s} {result['wall_s']:7.1f}s  {json.dumps(result)[:160]}")


if __name__ == "__main__":
    main()
