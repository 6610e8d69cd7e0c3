"""`deepretrieval index build` and `deepretrieval search`.

Exit codes: 0 ok; 1 the query is malformed (QuerySyntaxError, including a query nested too
deeply to parse); 2 bad usage or input (unreadable query file or corpus, invalid date, k out of
range, a damaged corpus file); 3 the engine is unavailable (no index, damaged index, service
down); 70 an unexpected error inside an engine; 130 interrupted; 141 the output pipe closed
(see deepretrieval.cli). Errors are one line on stderr (and the JSON object on stdout with
--json), never a traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

from deepretrieval.cli import EXIT_INTERNAL, EXIT_INTERRUPTED, OutputClosed, error_line
from deepretrieval.search.text import DEFAULT_STOPWORDS, MIRROR_STOPWORDS, STOPWORD_LISTS
from deepretrieval.search.base import (ENGINES, MAX_K, QuerySyntaxError, SearchEngineError, SearchResult,
                                       SearchUnavailable, make_engine)

logger = logging.getLogger(__name__)

EXIT_OK, EXIT_QUERY, EXIT_USAGE, EXIT_UNAVAILABLE = 0, 1, 2, 3  # 70, 130, 141: deepretrieval.cli

MAX_QUERY_FILE_BYTES = 1_000_000  # the longest CLEF expert search is ~12 kB


class UsageError(ValueError):
    """Bad command-line input: exit code 2 with a one-line message."""


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
    build.add_argument("--threads", type=int, default=0,
                       help="indexing threads in all (0: tantivy's choice, or one per shard with --shards; with more than "
                            "one per index, documents that tie on a query rank in an order that depends on thread "
                            "timing, so 1 makes the ranking reproducible across builds)")
    build.add_argument("--heap-mb", type=int, default=256, help="indexing memory budget in all (shared by the shards)")
    build.add_argument("--shards", type=int, default=1, metavar="N",
                       help="split the index into N shards by record id, searched in parallel")
    build.add_argument("--overwrite", action="store_true", help="replace a non-empty, non-index --out")
    build.add_argument("--limit", type=int, default=None, help="stop after N indexed records")
    build.add_argument("--all-field", action="store_true",
                       help="also index every text field's words in one combined field, where all-fields words are then "
                       "searched: one term query per word instead of one per field (faster on big indexes; ranked by "
                       "BM25 on the combined text)")
    build.add_argument("--stopwords", choices=list(STOPWORD_LISTS), default=DEFAULT_STOPWORDS,
                       help="words its searches ignore where they stand alone (pubmed: PubMed's list, as PubMed "
                       f"does; default {DEFAULT_STOPWORDS}; a search can override it)")
    build.add_argument("--no-progress", action="store_true")
    build.set_defaults(func=cmd_index_build)
    mirror = index_sub.add_parser(
        "ingest-pubmed", help="create or update a local PubMed mirror from baseline/update XML files (resumable)",
        description="Apply PubMed baseline and update files (pubmedYYnNNNN.xml.gz) to a mirror index in name "
        "order, committing after each file; a rerun skips finished files and resumes after a failure or kill.")
    mirror.add_argument("files", nargs="+", metavar="FILE", help="baseline/update files or directories")
    mirror.add_argument("--index", required=True, metavar="DIR", help="mirror index directory (new, empty or a mirror)")
    mirror.add_argument("--threads", type=int, default=0, help="indexing threads (0: tantivy's choice)")
    mirror.add_argument("--heap-mb", type=int, default=512, help="indexing memory budget, shared by the threads")
    mirror.add_argument("--parse-workers", type=int, default=0, metavar="N",
                        help="processes that parse the next files while one is applied (default 0: parse in this "
                        "process; on a many-core machine parsing is the bottleneck, see docs/benchmarks.md)")
    mirror.add_argument("--shards", type=int, default=None,
                        help="split a new mirror into N shards searched in parallel (default 1; fixed at creation)")
    mirror.add_argument("--allow-out-of-order", action="store_true",
                        help="apply a file that sorts before one already applied")
    mirror.add_argument("--no-all-field", dest="all_field", action="store_false", default=None,
                        help="a new mirror without the combined field: all-fields words searched in each field and "
                        "ranked by the fields' summed BM25 (fixed at creation)")
    mirror.add_argument("--stopwords", choices=list(STOPWORD_LISTS), default=None,
                        help="words searches of the mirror ignore where they stand alone (default: the mirror's; "
                        f"a new mirror: {MIRROR_STOPWORDS}, PubMed's list, as PubMed does)")
    mirror.add_argument("--verify", action="store_true",
                        help="check the SHA-256 of already applied files again (default: size and modification time)")
    mirror.add_argument("--no-progress", action="store_true")
    mirror.set_defaults(func=cmd_index_ingest_pubmed)
    index.set_defaults(func=lambda args: (index.print_help(), EXIT_USAGE)[1])

    search = subparsers.add_parser(
        "search", help="run one query against a search engine",
        description="Search with PubMed syntax. Prints a ranked list, or one JSON object with "
        "--json (ids, scores, total, error, warnings).")
    search.add_argument("query", nargs="?", help="the query (use --query-file for multi-line searches)")
    search.add_argument("--query-file", metavar="FILE",
                        help=f"read the query from FILE ('-': stdin; UTF-8, at most {MAX_QUERY_FILE_BYTES:,} bytes)")
    search.add_argument("--engine", choices=sorted(ENGINES), default="local")
    search.add_argument("--index", metavar="DIR", help="index directory (local engine), or a vendored corpus's "
                        "name (pubmed_mini, trials_sigir): its index is built in the cache on first use")
    search.add_argument("--k", type=int, default=100, help=f"number of ranked ids to return (0 to {MAX_K:,})")
    search.add_argument("--json", action="store_true", help="print one JSON object")
    search.add_argument("--total", action="store_true", help="count every matching document (local engine: slower, "
                        "as the search then visits every match; the live engines always report it)")
    search.add_argument("--stopwords", choices=list(STOPWORD_LISTS), default=None,
                        help="local engine: the stopword list to ignore (default: the index's)")
    search.add_argument("--min-date", metavar="YYYY/MM/DD")
    search.add_argument("--max-date", metavar="YYYY/MM/DD")
    search.add_argument("--base-url", metavar="URL", help="API base URL (live engines)")
    search.add_argument("--api-key", metavar="KEY", help="API key (live engines, e.g. NCBI); prefer the NCBI_API_KEY environment variable: command-line arguments are visible to other users in `ps`")
    search.add_argument("--no-cache", action="store_true", help="do not use the result cache (live engines)")
    search.set_defaults(func=cmd_search)


def _fail(message: str, code: int) -> int:
    error_line(message)
    return code


def _check_range(name: str, value: Optional[int], lo: int, hi: Optional[int] = None) -> None:
    if value is not None and (value < lo or (hi is not None and value > hi)):
        bound = f"between {lo:,} and {hi:,}" if hi is not None else f">= {lo:,}"
        raise UsageError(f"{name} must be {bound}, got {value:,}" if abs(value) < 10**30
                         else f"{name} must be {bound}")


def cmd_index_build(args: argparse.Namespace) -> int:
    from deepretrieval.search.ingest import CorpusFormatError
    from deepretrieval.search.local_index import MAX_SHARDS, build_index, build_summary, index_size_bytes

    try:
        _check_range("--batch-size", args.batch_size, 1)
        _check_range("--threads", args.threads, 0, 1024)
        _check_range("--heap-mb", args.heap_mb, 15, 1_000_000)
        _check_range("--limit", args.limit, 1)
        _check_range("--shards", args.shards, 1, MAX_SHARDS)
    except UsageError as exc:
        return _fail(str(exc), EXIT_USAGE)
    try:
        meta = build_index(args.corpus, args.out, format=args.format, batch_size=args.batch_size,
                           heap_size=args.heap_mb * 1_000_000, num_threads=args.threads,
                           overwrite=args.overwrite, progress=not args.no_progress, limit=args.limit,
                           shards=args.shards, stopwords=args.stopwords, all_field=args.all_field)
    except KeyboardInterrupt:
        return _fail("interrupted; no index was written", EXIT_INTERRUPTED)
    except (CorpusFormatError, FileNotFoundError, FileExistsError, OSError, ValueError) as exc:
        return _fail(str(exc), EXIT_USAGE)
    size = index_size_bytes(args.out)
    shards = f" in {len(meta['shards'])} shards" if meta.get("shards") else ""
    print(f"indexed {meta['num_docs']} documents ({', '.join(meta['formats'])}) into {args.out}{shards} "
          f"in {meta['build_seconds']:.1f}s, {size / 1e6:.1f} MB")
    for line in build_summary(meta):
        print(f"  {line}")
    return EXIT_OK


def cmd_index_ingest_pubmed(args: argparse.Namespace) -> int:
    from deepretrieval.search.ingest import CorpusFormatError
    from deepretrieval.search.mirror import MAX_PARSE_WORKERS, MirrorError, ingest_pubmed, ingest_summary

    try:
        _check_range("--threads", args.threads, 0, 1024)
        _check_range("--heap-mb", args.heap_mb, 15, 1_000_000)
        _check_range("--shards", args.shards, 1, 256)
        _check_range("--parse-workers", args.parse_workers, 0, MAX_PARSE_WORKERS)
        summary = ingest_pubmed(args.index, args.files, heap_size=args.heap_mb * 1_000_000, num_threads=args.threads,
                                shards=args.shards, progress=not args.no_progress,
                                allow_out_of_order=args.allow_out_of_order, verify=args.verify,
                                stopwords=args.stopwords, all_field=args.all_field,
                                parse_workers=args.parse_workers)
    except KeyboardInterrupt:
        return _fail("interrupted; finished files are committed, rerun to resume", EXIT_INTERRUPTED)
    except (MirrorError, CorpusFormatError, FileNotFoundError, OSError, ValueError) as exc:  # UsageError too
        return _fail(str(exc), EXIT_USAGE)
    for line in ingest_summary(summary):
        print(line)
    return EXIT_OK


def _resolve_index(index: str) -> str:
    """An index folder, or the name of a vendored corpus (its index is built in the cache on first use)."""
    from deepretrieval.search.local_index import LOCAL_CORPORA, ensure_local_index

    if index not in LOCAL_CORPORA or Path(index).exists():
        return index
    return str(ensure_local_index(index))  # logs where it builds it


def _engine_options(args: argparse.Namespace) -> Dict[str, Any]:
    if args.engine == "local":
        if not args.index:
            raise UsageError("--index DIR is required with --engine local")
        options = {"index_dir": _resolve_index(args.index)}
        if args.stopwords:
            options["stopwords"] = args.stopwords
        return options
    options: Dict[str, Any] = {"cache": not args.no_cache}
    if args.base_url:
        options["base_url"] = args.base_url
    if args.api_key:
        options["api_key"] = args.api_key
    return options


def read_query(args: argparse.Namespace) -> str:
    """The query text: the positional QUERY, or --query-file (UTF-8, '-' for stdin); UsageError
    for a missing, unreadable, oversized, non-UTF-8 or empty one."""
    if args.query_file is None:
        text = args.query
    elif args.query is not None:
        raise UsageError("give the query as QUERY or with --query-file, not both")
    else:
        source = "standard input" if args.query_file == "-" else f"query file {args.query_file}"
        try:
            if args.query_file == "-":
                stdin = getattr(sys.stdin, "buffer", sys.stdin)
                data = stdin.read(MAX_QUERY_FILE_BYTES + 1)
            else:
                with open(args.query_file, "rb") as fh:
                    data = fh.read(MAX_QUERY_FILE_BYTES + 1)
        except OSError as exc:
            raise UsageError(f"cannot read {source}: {exc.strerror or exc}") from None
        if len(data) > MAX_QUERY_FILE_BYTES:
            raise UsageError(f"{source} is larger than {MAX_QUERY_FILE_BYTES:,} bytes")
        try:
            text = data.decode("utf-8-sig") if isinstance(data, bytes) else data
        except UnicodeDecodeError as exc:
            raise UsageError(f"{source} is not UTF-8 text (byte {exc.start}: {exc.reason})") from None
    if text is None or not text.strip():
        raise UsageError("no query given (positional QUERY or --query-file)")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:  # a command-line argument that was not UTF-8 (surrogate-escaped bytes)
        raise UsageError(f"the query is not UTF-8 text (character {exc.start})") from None
    return text


def date_filters(args: argparse.Namespace) -> Dict[str, str]:
    """--min-date/--max-date as the engines' `min_date`/`max_date` filters, checked: each must be
    a real day in a YYYY[/MM[/DD]] form, and min <= max."""
    from deepretrieval.search.ingest import check_date_filter

    lo = check_date_filter(args.min_date, name="--min-date") if args.min_date else None
    hi = check_date_filter(args.max_date, end=True, name="--max-date") if args.max_date else None
    if lo is not None and hi is not None and lo > hi:
        raise ValueError(f"--min-date {args.min_date} is after --max-date {args.max_date}")
    return {k: v for k, v in (("min_date", args.min_date), ("max_date", args.max_date)) if v}


def _emit(result: SearchResult, as_json: bool) -> None:
    if as_json:
        print(json.dumps(result.to_dict(), ensure_ascii=False))
        return
    if result.error:
        return
    if result.total is None:
        print(f"top {len(result.ids)} (matching documents not counted; --total counts them):")
    else:
        print(f"{result.total} matching documents; top {len(result.ids)}:")
    for hit in result.hits:
        print(f"{hit.rank:>5}  {hit.docid:<14} {hit.score:.4f}")
    for w in result.warnings:
        print(f"warning: {w}", file=sys.stderr)


class InternalSearchError(SearchEngineError):
    """An engine failed in a way it does not classify (a bug): exit code 70."""

    kind = "internal_error"


def classify_search_error(exc: BaseException, engine: str) -> Tuple[SearchEngineError, int]:
    """Any exception out of building an engine or searching -> (classified error, exit code)."""
    if isinstance(exc, QuerySyntaxError):
        return exc, EXIT_QUERY
    if isinstance(exc, SearchEngineError):
        return exc, EXIT_UNAVAILABLE
    if isinstance(exc, RecursionError):  # a parser without its own depth limit
        return QuerySyntaxError("query nested too deeply to parse"), EXIT_QUERY
    if isinstance(exc, ImportError):
        return SearchUnavailable(f"engine {engine!r} is not available: {exc}"), EXIT_UNAVAILABLE
    return InternalSearchError(f"{engine} engine failed: {type(exc).__name__}: {exc}"), EXIT_INTERNAL


def cmd_search(args: argparse.Namespace) -> int:
    try:
        text = read_query(args)
        _check_range("--k", args.k, 0, MAX_K)
        filters: Dict[str, Any] = dict(date_filters(args))
        if args.total and args.engine == "local":  # the live engines always count (and take no such option)
            filters["count"] = True
        options = _engine_options(args)
    except (ValueError, FileNotFoundError) as exc:  # UsageError is a ValueError
        return _fail(str(exc), EXIT_USAGE)
    except OSError as exc:  # e.g. the cache folder for a vendored index cannot be written
        return _fail(f"search unavailable: cannot prepare the index: {exc}", EXIT_UNAVAILABLE)
    try:
        with make_engine(args.engine, **options) as engine:
            result = engine.search(text, k=args.k, **filters)
    except (KeyboardInterrupt, SystemExit, GeneratorExit, OutputClosed):
        raise
    except ValueError as exc:  # invalid filter values the engine rejects (QuerySyntaxError is one too)
        if isinstance(exc, SearchEngineError):
            error, code = classify_search_error(exc, args.engine)
            return _report_error(error, text, args, code)
        return _fail(str(exc), EXIT_USAGE)
    except BaseException as exc:  # noqa: BLE001 - any engine failure is one line (pyo3 panics are BaseException)
        logger.debug("search failed", exc_info=True)
        error, code = classify_search_error(exc, args.engine)
        return _report_error(error, text, args, code)
    _emit(result, args.json)
    return EXIT_OK


def _report_error(exc: SearchEngineError, text: str, args: argparse.Namespace, code: int) -> int:
    if args.json:
        _emit(SearchResult.failed(exc, query=text, engine=args.engine, k=args.k), True)
    kind = {EXIT_QUERY: "query syntax error", EXIT_INTERNAL: "internal error"}.get(code, "search unavailable")
    return _fail(f"{kind}: {exc}", code)
