"""`deepretrieval index build` and `deepretrieval search`.

Exit codes: 0 ok; 1 the query is malformed (QuerySyntaxError); 2 bad usage or input
(unreadable corpus, invalid date filter); 3 the engine is unavailable (no index, service down);
130 interrupted. Errors are one line on stderr (and the JSON object on stdout with --json),
never a traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any, Dict

from deepretrieval.search.base import (ENGINES, QuerySyntaxError, SearchEngineError, SearchResult,
                                       SearchUnavailable, make_engine)

logger = logging.getLogger(__name__)

EXIT_OK, EXIT_QUERY, EXIT_USAGE, EXIT_UNAVAILABLE, EXIT_INTERRUPTED = 0, 1, 2, 3, 130


def register(subparsers: argparse._SubParsersAction) -> None:
    index = subparsers.add_parser("index", help="build a local search index")
    index_sub = index.add_subparsers(dest="index_command", metavar="ACTION")
    build = index_sub.add_parser(
        "build", help="index a corpus (JSONL, PubMed baseline XML, ClinicalTrials.gov JSON)",
        description="Build a tantivy index for `deepretrieval search --engine local`. The format "
        "is detected from the content unless --format is given.")
    build.add_argument("--corpus", required=True, nargs="+", metavar="PATH",
                       help="corpus file(s) or directories (read in name order)")
    build.add_argument("--out", required=True, metavar="DIR", help="index directory to create or replace")
    build.add_argument("--format", choices=["jsonl", "pubmed-xml", "ctgov"], default=None)
    build.add_argument("--batch-size", type=int, default=100_000, help="documents per commit")
    build.add_argument("--threads", type=int, default=0, help="indexing threads (0: tantivy's choice)")
    build.add_argument("--heap-mb", type=int, default=256, help="indexing memory budget")
    build.add_argument("--overwrite", action="store_true", help="replace a non-empty, non-index --out")
    build.add_argument("--limit", type=int, default=None, help="stop after N records")
    build.add_argument("--no-progress", action="store_true")
    build.set_defaults(func=cmd_index_build)
    index.set_defaults(func=lambda args: (index.print_help(), EXIT_USAGE)[1])

    search = subparsers.add_parser(
        "search", help="run one query against a search engine",
        description="Search with PubMed syntax. Prints a ranked list, or one JSON object with "
        "--json (ids, scores, total, error, warnings).")
    search.add_argument("query", nargs="?", help="the query (use --query-file for multi-line searches)")
    search.add_argument("--query-file", metavar="FILE", help="read the query from FILE ('-': stdin)")
    search.add_argument("--engine", choices=sorted(ENGINES), default="local")
    search.add_argument("--index", metavar="DIR", help="index directory (local engine), or a vendored corpus's "
                        "name (pubmed_mini, trials_sigir): its index is built in the cache on first use")
    search.add_argument("--k", type=int, default=100, help="number of ranked ids to return")
    search.add_argument("--json", action="store_true", help="print one JSON object")
    search.add_argument("--min-date", metavar="YYYY/MM/DD")
    search.add_argument("--max-date", metavar="YYYY/MM/DD")
    search.add_argument("--base-url", metavar="URL", help="API base URL (live engines)")
    search.add_argument("--api-key", metavar="KEY", help="API key (live engines, e.g. NCBI); prefer the NCBI_API_KEY environment variable: command-line arguments are visible to other users in `ps`")
    search.add_argument("--no-cache", action="store_true", help="do not use the result cache (live engines)")
    search.set_defaults(func=cmd_search)


def _fail(message: str, code: int) -> int:
    print(f"error: {message}".replace("\n", " "), file=sys.stderr)
    return code


def cmd_index_build(args: argparse.Namespace) -> int:
    from deepretrieval.search.ingest import CorpusFormatError
    from deepretrieval.search.local import build_index, index_size_bytes

    try:
        meta = build_index(args.corpus, args.out, format=args.format, batch_size=args.batch_size,
                           heap_size=args.heap_mb * 1_000_000, num_threads=args.threads,
                           overwrite=args.overwrite, progress=not args.no_progress, limit=args.limit)
    except KeyboardInterrupt:
        return _fail("interrupted; no index was written", EXIT_INTERRUPTED)
    except (CorpusFormatError, FileNotFoundError, FileExistsError, OSError, ValueError) as exc:
        return _fail(str(exc), EXIT_USAGE)
    size = index_size_bytes(args.out)
    print(f"indexed {meta['num_docs']} documents ({', '.join(meta['formats'])}) into {args.out} "
          f"in {meta['build_seconds']:.1f}s, {size / 1e6:.1f} MB")
    return EXIT_OK


def _resolve_index(index: str) -> str:
    """An index folder, or the name of a vendored corpus (its index is built in the cache on first use)."""
    from deepretrieval.data.paths import LOCAL_CORPORA, ensure_local_index

    if index not in LOCAL_CORPORA or Path(index).exists():
        return index
    return str(ensure_local_index(index))  # logs where it builds it


def _engine_options(args: argparse.Namespace) -> Dict[str, Any]:
    if args.engine == "local":
        if not args.index:
            raise ValueError("--index DIR is required with --engine local")
        return {"index_dir": _resolve_index(args.index)}
    options: Dict[str, Any] = {"cache": not args.no_cache}
    if args.base_url:
        options["base_url"] = args.base_url
    if args.api_key:
        options["api_key"] = args.api_key
    return options


def _emit(result: SearchResult, as_json: bool) -> None:
    if as_json:
        print(json.dumps(result.to_dict(), ensure_ascii=False))
        return
    if result.error:
        return
    print(f"{result.total} matching documents; top {len(result.ids)}:")
    for hit in result.hits:
        print(f"{hit.rank:>5}  {hit.docid:<14} {hit.score:.4f}")
    for w in result.warnings:
        print(f"warning: {w}", file=sys.stderr)


def cmd_search(args: argparse.Namespace) -> int:
    if args.query_file:
        text = sys.stdin.read() if args.query_file == "-" else open(args.query_file, encoding="utf-8").read()
    else:
        text = args.query
    if text is None or not text.strip():
        return _fail("no query given (positional QUERY or --query-file)", EXIT_USAGE)
    if args.k < 0:
        return _fail("--k must be >= 0", EXIT_USAGE)
    filters = {k: v for k, v in (("min_date", args.min_date), ("max_date", args.max_date)) if v}
    try:
        engine = make_engine(args.engine, **_engine_options(args))
    except SearchEngineError as exc:
        return _report_error(exc, text, args, EXIT_UNAVAILABLE)
    except ImportError as exc:
        return _report_error(SearchUnavailable(f"engine {args.engine!r} is not available: {exc}"), text, args,
                             EXIT_UNAVAILABLE)
    except (ValueError, TypeError) as exc:
        return _fail(str(exc), EXIT_USAGE)
    try:
        with engine:
            result = engine.search(text, k=args.k, **filters)
    except QuerySyntaxError as exc:
        return _report_error(exc, text, args, EXIT_QUERY)
    except SearchEngineError as exc:
        return _report_error(exc, text, args, EXIT_UNAVAILABLE)
    except ValueError as exc:  # invalid filter values
        return _fail(str(exc), EXIT_USAGE)
    except KeyboardInterrupt:
        return _fail("interrupted", EXIT_INTERRUPTED)
    _emit(result, args.json)
    return EXIT_OK


def _report_error(exc: SearchEngineError, text: str, args: argparse.Namespace, code: int) -> int:
    if args.json:
        _emit(SearchResult.failed(exc, query=text, engine=args.engine, k=args.k), True)
    kind = "query syntax error" if isinstance(exc, QuerySyntaxError) else "search unavailable"
    return _fail(f"{kind}: {exc}", code)
