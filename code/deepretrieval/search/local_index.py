"""Local index building: the tantivy schema, records -> documents, `build_index`, the index metadata,
and the vendored corpora's indexes built on first use.

Building (`build_index`) streams `Record`s from `deepretrieval.search.ingest` into a tantivy
index in a temporary directory next to the target, committing every `batch_size` documents,
and moves it into place only when complete; `INDEX_META_FILE` (written last) marks a
finished index, so an interrupted build never leaves something that opens as an index.

- `default_index_dir(name)`: `<cache_root>/indexes/<name>` for the vendored corpora (`LOCAL_CORPORA`).
- `ensure_local_index(name)`: builds that index from the vendored corpus on first use (under a
  file lock, so parallel Ray workers build it once; `build_index` moves a finished index into
  place, so an interrupted build never looks complete).

Searching lives in `deepretrieval.search.local`.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import re
import shutil
import time
import zlib
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import tantivy

from deepretrieval.paths import cache_root, data_root
from deepretrieval.search import query_tree as Q
from deepretrieval.search.base import SearchUnavailable
from deepretrieval.search.ingest import CorpusFormatError, Record, SkipLog, detect_format, expand_paths, iter_records
from deepretrieval.search.text import DEFAULT_STOPWORDS, STOPWORD_LISTS, check_stopwords

logger = logging.getLogger(__name__)

# local index name -> corpus file under data_root()
LOCAL_CORPORA: Dict[str, str] = {
    "pubmed_mini": "pubmed_mini/corpus.jsonl.gz",
    "trials_sigir": "trials_sigir/corpus.jsonl.gz",
}

INDEX_META_FILE = "deepretrieval_index.json"  # written last by build_index: its presence marks a finished index
INDEX_FORMAT_VERSION = 1
TEXT_FIELDS = Q.ALL_FIELDS
KEYWORD_FIELDS = ("mesh_kw", "majr_kw", "qual_kw", "sh_kw", "pt_kw")
MAX_SHARDS = 256
SHARD_HASH = "crc32(utf-8 id) mod shards"  # recorded in a sharded index's metadata (see shard_of)
MIN_HEAP_PER_THREAD = 15_000_000  # tantivy refuses an indexing thread less memory than this
# The combined field: every text field's words in one field (frequencies, no positions), like
# Elasticsearch's `copy_to` / the old `_all`. With it an all-fields word is one term query instead of one per
# field: a bag-of-words OR reads each document's postings once (2.2-2.6x faster at 1M records,
# docs/benchmarks.md) and is ranked by BM25 on the combined text instead of the sum of the fields' BM25
# (recall@100 of the pubmed_mini titles 0.366 vs 0.372). A PubMed mirror has it by default, `index build`
# when asked (`all_field`): the vendored benchmark indexes keep the per-field ranking their baselines were
# measured with. Phrases, truncations and field-qualified words search the fields themselves.
ALL_TEXT_FIELD = "all_text"



def build_schema() -> tantivy.Schema:
    sb = tantivy.SchemaBuilder()
    sb.add_text_field("id", stored=True, tokenizer_name="raw", index_option="basic")
    for name in TEXT_FIELDS:
        sb.add_text_field(name, tokenizer_name="default", index_option="position")
    for name in KEYWORD_FIELDS:  # lower-cased in Python, stored as one term per value
        sb.add_text_field(name, tokenizer_name="raw", index_option="freq")
    sb.add_text_field(ALL_TEXT_FIELD, tokenizer_name="default", index_option="freq")
    sb.add_integer_field("pub_date", indexed=True, fast=True)
    return sb.build()


def make_analyzer() -> tantivy.TextAnalyzer:
    """The query-side twin of tantivy's "default" tokenizer used by the text fields."""
    return (tantivy.TextAnalyzerBuilder(tantivy.Tokenizer.simple())
            .filter(tantivy.Filter.remove_long(40)).filter(tantivy.Filter.lowercase()).build())


# ----------------------------------------------------------------------------- building

def _all_text(rec: Record) -> str:
    """The combined field's text: every text field's values, in TEXT_FIELDS order."""
    parts: List[str] = []
    for name in TEXT_FIELDS:
        value = getattr(rec, name)
        if value:
            parts.extend([value] if isinstance(value, str) else value)
    return "\n".join(parts)


def _document(rec: Record, all_field: bool = False) -> tantivy.Document:
    doc = tantivy.Document()
    doc.add_text("id", rec.id)
    if rec.title:
        doc.add_text("title", rec.title)
    if rec.abstract:
        doc.add_text("abstract", rec.abstract)
    for m in rec.mesh:
        doc.add_text("mesh", m)
        doc.add_text("mesh_kw", m.lower())
    for m in rec.mesh_major:
        doc.add_text("majr_kw", m.lower())
    for q in rec.qualifiers:
        doc.add_text("qual_kw", q.lower())
        doc.add_text("sh_kw", q.rpartition("/")[2].lower())
    for p in rec.pt:
        doc.add_text("pt_kw", p.lower())
    for name in ("keywords", "conditions", "interventions"):
        for value in getattr(rec, name):
            doc.add_text(name, value)
    if rec.eligibility:
        doc.add_text("eligibility", rec.eligibility)
    if rec.pub_date is not None:
        doc.add_integer("pub_date", int(rec.pub_date))
    if all_field:
        text = _all_text(rec)
        if text:
            doc.add_text(ALL_TEXT_FIELD, text)
    return doc


def _prepare_target(out: Path, overwrite: bool) -> None:
    if out.exists():
        if not out.is_dir():
            raise FileExistsError(f"{out} exists and is not a directory")
        contents = list(out.iterdir())
        if contents and not (overwrite or (out / INDEX_META_FILE).exists()):
            raise FileExistsError(f"{out} is not empty and holds no deepretrieval index; pass overwrite=True")


def _remove_stale_partials(out: Path) -> None:
    """Partial builds of `out` left by killed processes (SIGKILL skips our cleanup). A build killed
    between its two renames (the old index moved aside to `.<out>.old-PID`, the finished one not
    yet moved from `.<out>.partial-PID`) left no index at `out`: the finished build (its metadata
    written last) is moved there, else the old index is moved back; then the rest is removed."""

    def dead(path: Path) -> bool:
        pid = path.name.rpartition("-")[2]
        if not pid.isdigit():
            return True
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
        return False

    partials = [p for p in sorted(out.parent.glob(f".{out.name}.partial-*")) if dead(p)]
    olds = [p for p in sorted(out.parent.glob(f".{out.name}.old-*")) if dead(p)]
    if not out.exists():
        finished = [p for p in partials if (p / INDEX_META_FILE).is_file()]
        restore = finished[0] if finished else next((p for p in olds if (p / INDEX_META_FILE).is_file()), None)
        if restore is not None:
            logger.warning("index build: %s was missing after a killed build; recovered it from %s", out, restore.name)
            restore.rename(out)
    for stale in partials + olds:
        if stale.exists():
            shutil.rmtree(stale, ignore_errors=True)


def shard_of(record_id: str, shards: int) -> int:
    """The shard (0 .. shards-1) of a record id: CRC-32 of its UTF-8 bytes modulo `shards` (stable
    across processes and Python versions, unlike `hash`); every version of an id lands in one
    shard, so revisions and deletions stay within it."""
    return zlib.crc32(record_id.encode("utf-8", "surrogatepass")) % shards


def shard_dir_name(i: int) -> str:
    return f"shard-{i:03d}"


def writer_threads(num_threads: int, shards: int) -> int:
    """Indexing threads of each shard's writer: `num_threads` for a single index (0: tantivy's choice),
    an even share of them, at least one, per shard otherwise."""
    return int(num_threads) if shards == 1 else max(1, int(num_threads) // shards)


def _open_writer(index: Any, heap_size: int, num_threads: int, shards: int) -> Any:
    """One shard's writer: its share of the heap and threads (writer_threads), at least tantivy's minimum
    heap per thread."""
    threads = writer_threads(num_threads, shards)
    if shards == 1:
        return index.writer(heap_size, threads) if threads else index.writer(heap_size)
    return index.writer(max(heap_size // shards, MIN_HEAP_PER_THREAD * threads), threads)


def _write_meta(index_dir: Path, meta: Dict[str, Any]) -> None:
    (index_dir / INDEX_META_FILE).write_text(json.dumps(meta, indent=2, ensure_ascii=False), encoding="utf-8")


def build_index(
    corpus_path: Union[str, os.PathLike, Sequence[Union[str, os.PathLike]]],
    out_dir: Union[str, os.PathLike],
    format: Optional[str] = None,
    *,
    batch_size: int = 100_000,
    heap_size: int = 256_000_000,
    num_threads: int = 0,
    overwrite: bool = False,
    progress: bool = True,
    limit: Optional[int] = None,
    shards: int = 1,
    stopwords: str = DEFAULT_STOPWORDS,
    all_field: bool = False,
) -> Dict[str, Any]:
    """Index the corpus file(s) at `corpus_path` into `out_dir`; returns the index metadata.

    `format`: "jsonl" | "pubmed-xml" | "ctgov" or None to detect per file. One document per id:
    a record whose id was seen before replaces the earlier one in every format (PubMed/CT.gov
    revisions, and duplicate lines in JSONL: the last one wins), and DeleteCitation removes it;
    the metadata counts them (`replaced_or_deleted`, and `duplicates` when the corpus has no
    deletions). A record that cannot be read or indexed is skipped and counted by reason
    (`skipped`, `skipped_examples`); a damaged file (truncated gzip, malformed XML) or a corpus
    with no readable record raises CorpusFormatError and writes nothing. `out_dir` may be
    absent, empty or an earlier index (replaced only when the build succeeds); any other
    non-empty directory needs `overwrite=True`. `limit` stops after that many indexed records
    (benchmarks).

    `shards` > 1 splits the documents by `shard_of(id, shards)` into that many tantivy indexes,
    `out_dir/shard-000` ..., each a complete index by itself (its metadata is the build's, with the
    shard's own `num_docs`, `shard` and `num_shards`), under one top-level metadata file that
    lists them (`shards`); `LocalSearchEngine` searches them in parallel. `heap_size` and `num_threads` are the totals, shared evenly by the shards' writers
    (each gets at least one thread and tantivy's minimum of `MIN_HEAP_PER_THREAD` per thread).
    `stopwords` names the list (`STOPWORD_LISTS`) its searches ignore unless the engine is told otherwise;
    `all_field` fills the combined field (`ALL_TEXT_FIELD`) that all-fields words are then searched in."""
    from tqdm import tqdm

    check_stopwords(stopwords)
    shards = int(shards)
    if not 1 <= shards <= MAX_SHARDS:
        raise ValueError(f"shards must be between 1 and {MAX_SHARDS}, got {shards}")
    out = Path(out_dir).resolve()
    _prepare_target(out, overwrite)
    paths = expand_paths(corpus_path)
    formats = sorted({format or detect_format(p) for p in paths})
    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_partials(out)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    start = time.perf_counter()
    stats = {"added": 0, "deleted": 0, "with_date": 0, "with_mesh": 0, "with_major": 0, "with_qualifiers": 0,
             "with_pt": 0}
    skips = SkipLog()
    writers: List[Any] = []
    indexes: List[Any] = []
    shard_dirs = [tmp] if shards == 1 else [tmp / shard_dir_name(i) for i in range(shards)]
    try:
        for path in shard_dirs:
            path.mkdir(exist_ok=True)
            indexes.append(tantivy.Index(build_schema(), path=str(path)))
            writers.append(_open_writer(indexes[-1], heap_size, num_threads, shards))
        bar = tqdm(total=None, unit="doc", desc="indexing", disable=not progress, mininterval=1.0)
        since_commit = 0
        present: set = set()
        for path in paths:
            fmt = format or detect_format(path)
            for rec in iter_records(path, fmt, skips=skips):
                try:
                    doc = None if rec.deleted else _document(rec, all_field)
                    # the id's earlier version (if any) goes: revisions, duplicates, deletions
                    writer = writers[shard_of(rec.id, shards) if shards > 1 else 0]
                    writer.delete_documents_by_term("id", rec.id)
                    if doc is not None:
                        writer.add_document(doc)
                except (ValueError, TypeError, OverflowError) as exc:  # e.g. a lone surrogate from a JSON escape
                    skips.add("cannot be indexed", f"{path}: id {rec.id!r}", f"{type(exc).__name__}: {exc}")
                    continue
                if rec.deleted:
                    stats["deleted"] += 1
                    continue
                stats["added"] += 1
                stats["with_date"] += rec.pub_date is not None
                stats["with_mesh"] += bool(rec.mesh)
                stats["with_major"] += bool(rec.mesh_major)
                stats["with_qualifiers"] += bool(rec.qualifiers)
                stats["with_pt"] += bool(rec.pt)
                for name in TEXT_FIELDS:
                    if name not in present and getattr(rec, name):
                        present.add(name)
                since_commit += 1
                bar.update(1)
                if since_commit >= batch_size:
                    for writer in writers:
                        writer.commit()
                    since_commit = 0
                if limit is not None and stats["added"] >= limit:
                    break
            if limit is not None and stats["added"] >= limit:
                break
        bar.close()
        if stats["added"] == 0 and skips.total:
            raise CorpusFormatError(
                f"no record could be indexed: {skips.total} skipped ({_reasons(skips.counts)}); "
                f"first: {skips.examples[0]}")
        shard_docs = []
        for writer, index in zip(writers, indexes):
            writer.commit()
            writer.wait_merging_threads()
            index.reload()
            shard_docs.append(index.searcher().num_docs)
        num_docs = sum(shard_docs)
        removed = stats["added"] - num_docs
        meta = {
            "format_version": INDEX_FORMAT_VERSION,
            "num_docs": num_docs,
            "sources": [str(p) for p in paths],
            "formats": formats,
            "has_dates": stats["with_date"] > 0,
            "has_mesh": stats["with_mesh"] > 0,
            "has_major": stats["with_major"] > 0,
            "has_qualifiers": stats["with_qualifiers"] > 0,
            "has_pt": stats["with_pt"] > 0,
            "text_fields": [f for f in TEXT_FIELDS if f in present],
            "stopwords": stopwords,
            "all_field": bool(all_field),
            "writer_threads": writer_threads(num_threads, shards),
            "records_read": stats["added"] + stats["deleted"] + skips.total,
            "records_added": stats["added"],
            "deletions": stats["deleted"],
            "replaced_or_deleted": removed,
            "duplicates": removed if stats["deleted"] == 0 else None,
            "skipped": dict(sorted(skips.counts.items())),
            "skipped_examples": skips.examples,
            "build_seconds": round(time.perf_counter() - start, 3),
            "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        if shards > 1:
            for i, (path, n) in enumerate(zip(shard_dirs, shard_docs)):
                _write_meta(path, {**meta, "num_docs": n, "shard": i, "num_shards": shards})
            meta.update(shards=[p.name for p in shard_dirs], shard_docs=shard_docs, shard_hash=SHARD_HASH)
        _write_meta(tmp, meta)  # last: marks the whole index finished
        # swap into place: the old index (if any) moves aside first, then is removed
        old = None
        if out.exists():
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            out.rename(old)
        tmp.rename(out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        # release tantivy's writer (lock file, merge threads) before removing the partial index
        for writer in writers:
            try:
                writer.rollback()
                writer.wait_merging_threads()
            except Exception:  # the writer may be in any state; removal below is what matters
                pass
        writers = indexes = []  # noqa: F841
        import gc

        gc.collect()
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("indexed %d documents into %s in %.1fs", meta["num_docs"], out, meta["build_seconds"])
    if meta["skipped"] or meta["replaced_or_deleted"]:
        logger.warning("index %s: %s", out, "; ".join(build_summary(meta)[1:3]))
    return meta


def _reasons(counts: Dict[str, int]) -> str:
    return ", ".join(f"{reason}: {n}" for reason, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


def build_summary(meta: Dict[str, Any]) -> List[str]:
    """Human-readable lines for a build's metadata: records read, indexed, replaced, skipped."""
    lines = [f"records read {meta.get('records_read', meta.get('records_added', 0)):,}; "
             f"documents in the index {meta.get('num_docs', 0):,}"]
    if meta.get("deletions"):
        lines.append(f"deletion records {meta['deletions']:,}; records replaced by a later one with the same id "
                     f"or deleted {meta.get('replaced_or_deleted', 0):,}")
    elif meta.get("duplicates"):
        lines.append(f"duplicate ids {meta['duplicates']:,}: each id is indexed once, from its last record")
    skipped = meta.get("skipped") or {}
    if skipped:
        lines.append(f"skipped {sum(skipped.values()):,} records ({_reasons(skipped)})")
        lines += [f"  {example}" for example in meta.get("skipped_examples", [])[:5]]
    if meta.get("stopwords", DEFAULT_STOPWORDS) != "none":
        lines.append(f"searches ignore stopwords ({meta['stopwords']} list)")
    if meta.get("all_field"):
        lines.append(f"all-fields words are searched in the combined field ({ALL_TEXT_FIELD})")
    return lines


# metadata key -> the JSON types it may have; anything else means a damaged or foreign file
_META_TYPES: Dict[str, Tuple[type, ...]] = {
    "format_version": (int,), "num_docs": (int,), "formats": (list,), "text_fields": (list,), "sources": (list,),
    "skipped": (dict,), "records_read": (int,), "records_added": (int,), "deletions": (int,), "shards": (list,),
    "stopwords": (str,), "all_field": (bool,), "writer_threads": (int,),
}


def read_index_meta(index_dir: Union[str, os.PathLike]) -> Dict[str, Any]:
    """The metadata `build_index` wrote last into `index_dir`; raises SearchUnavailable (with the
    fix: rebuild) when it is missing, unreadable, not JSON, not an object or has fields of the
    wrong type."""
    path = Path(index_dir) / INDEX_META_FILE
    rebuild = "rebuild it with `deepretrieval index build`"
    if not path.is_file():
        raise SearchUnavailable(f"{index_dir} is not a complete deepretrieval index (no {INDEX_META_FILE}); "
                                "build one with `deepretrieval index build`")
    try:
        meta = json.loads(path.read_bytes().decode("utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise SearchUnavailable(f"index metadata {path} is unreadable ({type(exc).__name__}: {exc}); {rebuild}") \
            from None
    if not isinstance(meta, dict):
        raise SearchUnavailable(f"index metadata {path} holds a JSON {type(meta).__name__}, not an object; {rebuild}")
    for key, types in _META_TYPES.items():
        if key in meta and (not isinstance(meta[key], types) or (isinstance(meta[key], bool) and bool not in types)):
            raise SearchUnavailable(f"index metadata {path}: {key!r} is a {type(meta[key]).__name__}; {rebuild}")
    fields = meta.get("text_fields", [])
    if not all(isinstance(f, str) for f in fields):
        raise SearchUnavailable(f"index metadata {path}: 'text_fields' must list field names; {rebuild}")
    shards = meta.get("shards", [])
    if not all(isinstance(d, str) and re.fullmatch(r"shard-\d{3}", d) for d in shards):
        raise SearchUnavailable(f"index metadata {path}: 'shards' must list shard folder names; {rebuild}")
    if meta.get("stopwords", DEFAULT_STOPWORDS) not in STOPWORD_LISTS:
        raise SearchUnavailable(f"index metadata {path}: unknown stopword list {meta['stopwords']!r} "
                                f"(known: {', '.join(STOPWORD_LISTS)}); {rebuild}")
    return meta


def shard_paths(index_dir: Union[str, os.PathLike], meta: Dict[str, Any]) -> List[Path]:
    """The tantivy index folders of an index: its shards' (in shard order), or the folder itself
    for an unsharded index. A listed shard that is missing or has no complete metadata of its own
    is a SearchUnavailable naming it."""
    if not meta.get("shards"):
        return [Path(index_dir)]
    out = []
    for name in meta["shards"]:
        path = Path(index_dir) / name
        if not (path / INDEX_META_FILE).is_file():
            raise SearchUnavailable(f"shard {name} of index {index_dir} is missing or incomplete (no {path / INDEX_META_FILE}); "
                                    "rebuild it with `deepretrieval index build`")
        out.append(path)
    return out


def index_size_bytes(index_dir: Union[str, os.PathLike]) -> int:
    return sum(f.stat().st_size for f in Path(index_dir).rglob("*") if f.is_file())


# ----------------------------------------------------------------------------- vendored corpora

# The vendored corpora are indexed by one thread: documents then sit in the index in corpus order, and BM25 ties
# (common: tantivy quantises document lengths, so a one-word query scores every matching document of one length
# alike), which the engine breaks by (segment, document), rank the same on every machine. With tantivy's own
# choice (one thread per core) the threads split the documents between segments by timing: four rebuilds of
# trials_sigir on one machine ranked short queries' ties differently each time, changing top-100 sets, so a
# reward, and two recipe reruns went apart (docs/recipe.md, "Pooled so far"). The corpora are small (3.6k-41k
# documents: well under a second either way).
VENDORED_WRITER_THREADS = 1


def corpus_path(name: str) -> Path:
    if name not in LOCAL_CORPORA:
        raise ValueError(f"no vendored corpus named {name!r}; known: {', '.join(LOCAL_CORPORA)}")
    return data_root() / LOCAL_CORPORA[name]


def default_index_dir(name: str) -> Path:
    return cache_root() / "indexes" / name


def _finished_meta(index_dir: Path) -> Optional[Dict[str, Any]]:
    """The metadata of a finished index in `index_dir`, None when it is missing or damaged (logged)."""
    if not (Path(index_dir) / INDEX_META_FILE).is_file():
        return None
    try:
        return read_index_meta(index_dir)
    except SearchUnavailable as exc:
        logger.warning("%s", exc)
        return None


def index_ready(index_dir: Path) -> bool:
    """True when `index_dir` holds a finished index whose metadata reads; `ensure_local_index`
    rebuilds a vendored index whose metadata is missing or damaged."""
    return _finished_meta(index_dir) is not None


def _vendored_ready(target: Path, say_why: bool = False) -> bool:
    """A finished vendored index built with VENDORED_WRITER_THREADS (one built before, with tantivy's own thread
    count, orders tied documents by thread timing and is rebuilt; `say_why` logs that)."""
    meta = _finished_meta(target)
    if meta is None:
        return False
    if meta.get("writer_threads") != VENDORED_WRITER_THREADS:
        if say_why:
            logger.info("rebuilding local index %s: built with several indexing threads, its order of tied "
                        "documents depends on their timing", target)
        return False
    return True


def ensure_local_index(name: str, index_dir: Optional[os.PathLike] = None, rebuild: bool = False) -> Path:
    """Return the directory of the local index `name`, building it from the vendored corpus if missing (one
    indexing thread: VENDORED_WRITER_THREADS)."""
    target = Path(index_dir) if index_dir is not None else default_index_dir(name)
    if _vendored_ready(target) and not rebuild:
        return target
    source = corpus_path(name)
    if not source.exists():
        raise FileNotFoundError(f"corpus for {name!r} not found at {source} (set DEEPRETRIEVAL_DATA_DIR)")
    target.parent.mkdir(parents=True, exist_ok=True)
    lock_path = target.parent / f".{target.name}.lock"
    with open(lock_path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another process may be building it right now
        try:
            if _vendored_ready(target, say_why=True) and not rebuild:
                return target
            logger.info("building local index %r from %s (first use)", name, source)
            # build_index builds next to the target and moves the finished index into place
            build_index(str(source), str(target), overwrite=True, progress=False, num_threads=VENDORED_WRITER_THREADS)
            logger.info("local index %r ready at %s", name, target)
            return target
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
