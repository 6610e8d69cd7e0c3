"""A local PubMed mirror: streaming, resumable ingest of NLM's baseline and update files.

`ingest_pubmed(index_dir, files)` applies PubMed baseline and daily update files
(``pubmedYYnNNNN.xml.gz``) to one tantivy index, in file-name order (NLM numbers them so that
name order is processing order), one file at a time:

- Each record is applied by id: its earlier version (if any) is deleted, then it is added, so
  a revised citation in an update file replaces the baseline one and ``DeleteCitation`` PMIDs
  are removed. Applying a file twice gives the same index (idempotent).
- After each file the writer commits (every shard) and the file (name, size, SHA-256, mtime, counts) is recorded in
  `MANIFEST_FILE` inside the index; the index metadata (`local.META_FILE`) is rewritten with
  the totals, so the mirror opens with `LocalSearchEngine` after every finished file.
- A rerun skips files the manifest lists (after checking their size and modification time,
  and the checksum when the time differs or with `verify`: a changed file is an error) and
  resumes with the first unfinished one. A damaged file (truncated gzip,
  malformed XML) stops the run with `CorpusFormatError`: its uncommitted records are rolled
  back, earlier files stay committed; replace the file and rerun. A run killed at any moment
  (even between a commit and the manifest write) loses at most the file in progress, which the
  rerun applies again (idempotent). The index is then right but that file's counts are not: a
  kill after some shard committed it (between two shards' commits, or between the commits and
  the manifest write) leaves its committed records in the index, so the rerun counts them as
  ``replaced`` instead of ``added`` and their deletions as ``delete_missing`` instead of
  ``deleted`` (in the file's entry and the totals).
- A file whose name sorts before one already applied is refused (applying an older file after
  newer ones would bring back replaced or deleted versions) unless `allow_out_of_order`.

Counts (per file and in total): records ``added`` (a new PMID), ``replaced`` (the PMID was in
the index), ``deleted`` (a deletion that removed a record), ``delete_missing`` (a deletion of
a PMID not in the index), and records ``skipped`` by reason (`ingest.SkipLog`).
Indexing uses tantivy's multi-threaded writer: `num_threads` (0: tantivy's choice) share
`heap_size` bytes (at least `MIN_HEAP_PER_THREAD` each). A mirror created with `shards` > 1 is
split like `build_index(shards=N)` (`local_index.shard_of`: every version of a PMID lands in
the same shard), in `shard-NNN` folders under one metadata file, searched concurrently by
`LocalSearchEngine`; the writers share the heap and threads as `build_index`'s do.
With `parse_workers` > 0 the files are read (XML parsing: about 0.4x the CPU per record of indexing) by that
many worker processes, up to that many files ahead of the one being applied; the files are still applied
one at a time in name order by this process, so the index, the manifest, the counts and the behaviour on a
damaged file or a kill are those of the in-process reader (0, which streams a file instead of holding it).
Searches of a mirror ignore PubMed's stopwords (`text.PUBMED_STOPWORDS`, as PubMed does) unless
it was made or updated with `stopwords="none"`; the list is recorded in the manifest and the metadata
and can be changed on any run (it is applied when searching, not when indexing). Mirrors made before
the setting existed keep searching every word. A new mirror also fills the combined field
(`local_index.ALL_TEXT_FIELD`: all-fields words are one term query each; `all_field=False` at creation
to rank by the fields' summed BM25 instead); it is fixed when the mirror is created.
"""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing
import os
import time
from collections import deque
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Deque, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

from deepretrieval.search.ingest import (CorpusFormatError, Record, SkipLog, detect_format, expand_paths,
                                         read_pubmed_xml)
from deepretrieval.search.local_index import (ALL_TEXT_FIELD, INDEX_FORMAT_VERSION, INDEX_META_FILE, MAX_SHARDS,
                                              MIN_HEAP_PER_THREAD, SHARD_HASH, TEXT_FIELDS, _document, _open_writer,
                                              build_schema, shard_dir_name, shard_of)
from deepretrieval.search.text import DEFAULT_STOPWORDS, MIRROR_STOPWORDS, check_stopwords

logger = logging.getLogger(__name__)

MANIFEST_FILE = "mirror_manifest.json"
MANIFEST_VERSION = 1
EXISTS_CHUNK = 4096  # records whose presence in the index is looked up with one query
COUNT_KEYS = ("added", "replaced", "deleted", "delete_missing")
FLAG_KEYS = ("with_date", "with_mesh", "with_major", "with_qualifiers", "with_pt")

PathLike = Union[str, os.PathLike]


class MirrorError(ValueError):
    """The mirror cannot be updated as asked (not a mirror, a changed or out-of-order file, locked)."""


def file_fingerprint(path: PathLike, block: int = 1 << 20) -> Tuple[int, str]:
    """(size in bytes, SHA-256 hex digest) of a file, read in `block`-sized pieces."""
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as fh:
        while True:
            data = fh.read(block)
            if not data:
                break
            size += len(data)
            digest.update(data)
    return size, digest.hexdigest()


def _write_json_atomic(path: Path, obj: Any) -> None:
    """Write JSON to `path` through a temporary file and a rename (never half a file)."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=1, ensure_ascii=False), encoding="utf-8")
    os.replace(tmp, path)


@dataclass
class Counts:
    """What applying records did, by outcome; `skips` holds the records left out, by reason."""

    added: int = 0
    replaced: int = 0
    deleted: int = 0
    delete_missing: int = 0
    flags: Dict[str, int] = field(default_factory=lambda: dict.fromkeys(FLAG_KEYS, 0))
    fields: set = field(default_factory=set)  # text fields some record filled
    skips: SkipLog = field(default_factory=SkipLog)

    def as_dict(self) -> Dict[str, Any]:
        return {**{k: getattr(self, k) for k in COUNT_KEYS}, "skipped": dict(sorted(self.skips.counts.items()))}


class MirrorWriter:
    """Applies records to a mirror index; one file (or any batch) per `apply` + `commit`.

    Opens `index_dir` (creating an empty mirror of `shards` shards there when it does not exist
    or is empty; an existing mirror keeps the shard count it was created with), holds tantivy's
    writer lock of every shard until `close`, and answers "is this id in the index" from the
    last commit plus the records applied since (`_present`)."""

    def __init__(self, index_dir: PathLike, heap_size: int = 512_000_000, num_threads: int = 0,
                 shards: Optional[int] = None, stopwords: Optional[str] = None, all_field: Optional[bool] = None):
        import tantivy

        if stopwords is not None:
            check_stopwords(stopwords)
        self.dir = Path(index_dir)
        self._tantivy = tantivy
        self.manifest = self._read_manifest()
        if self.manifest is not None and shards is not None and shards != self.manifest.get("shards", 1):
            raise MirrorError(f"{self.dir} is a mirror of {self.manifest.get('shards', 1)} shard(s), not {shards}; "
                              "the shard count is fixed when a mirror is created")
        if self.manifest is not None and all_field is not None and all_field != self.manifest.get("all_field", False):
            raise MirrorError(f"{self.dir} is a mirror {'with' if self.manifest.get('all_field') else 'without'} the "
                              f"combined field ({ALL_TEXT_FIELD}); it is fixed when a mirror is created")
        self.num_shards = int(self.manifest.get("shards", 1) if self.manifest is not None else shards or 1)
        if not 1 <= self.num_shards <= MAX_SHARDS:
            raise MirrorError(f"shards must be between 1 and {MAX_SHARDS}, got {self.num_shards}")
        threads_each = max(1, num_threads // self.num_shards) if self.num_shards > 1 else max(1, num_threads)
        if num_threads < 0 or heap_size < MIN_HEAP_PER_THREAD * threads_each:
            raise MirrorError(f"heap_size {heap_size:,} is below {MIN_HEAP_PER_THREAD:,} bytes per indexing thread "
                              f"({num_threads} threads)")
        dirs = [self.dir] if self.num_shards == 1 else [self.dir / shard_dir_name(i) for i in range(self.num_shards)]
        if self.manifest is None:
            if self.dir.exists() and any(self.dir.iterdir()):
                what = "an index built by `deepretrieval index build`" if (self.dir / INDEX_META_FILE).exists() \
                    else "files that are not a mirror"
                raise MirrorError(f"{self.dir} holds {what}; a mirror needs its own (new or empty) directory")
            self.indexes = []
            for path in dirs:
                path.mkdir(parents=True, exist_ok=True)
                self.indexes.append(tantivy.Index(build_schema(), path=str(path)))
            self.manifest = {"manifest_version": MANIFEST_VERSION, "shards": self.num_shards, "files": [],
                             "totals": {**dict.fromkeys(COUNT_KEYS, 0), "skipped": {}},
                             "flags": dict.fromkeys(FLAG_KEYS, 0), "text_fields": [],
                             "stopwords": stopwords or MIRROR_STOPWORDS,
                             "all_field": True if all_field is None else bool(all_field)}
            # written before anything is applied, so a run that fails or is killed during its
            # first file leaves a mirror (with no files done) that the rerun resumes
            _write_json_atomic(self.dir / MANIFEST_FILE, self.manifest)
        else:
            self.indexes = [tantivy.Index.open(str(path)) for path in dirs]
        # a changed stopword list is saved with the next commit (ingest_pubmed commits once when no file is due)
        self.stopwords_changed = stopwords is not None and stopwords != self.stopwords
        if self.stopwords_changed:
            self.manifest["stopwords"] = stopwords
        self.writers: List[Any] = []
        try:
            for index in self.indexes:
                self.writers.append(_open_writer(index, heap_size, num_threads, self.num_shards))
        except ValueError as exc:
            self.close()
            if "lock" in str(exc).lower():
                raise MirrorError(f"{self.dir} is being updated by another process ({exc})") from None
            raise
        self.schema = self.indexes[0].schema
        self.searchers = [index.searcher() for index in self.indexes]
        self._since_commit: Dict[str, bool] = {}  # id -> present, for ids applied since the last commit

    @property
    def num_docs(self) -> int:
        return sum(int(searcher.num_docs) for searcher in self.searchers)

    @property
    def all_field(self) -> bool:
        """Whether the mirror fills the combined field (mirrors made before the setting: no)."""
        return bool(self.manifest.get("all_field", False))

    @property
    def stopwords(self) -> str:
        """The stopword list searches of this mirror ignore (mirrors made before the setting: none)."""
        return self.manifest.get("stopwords", DEFAULT_STOPWORDS)

    # -- manifest
    def _read_manifest(self) -> Optional[Dict[str, Any]]:
        path = self.dir / MANIFEST_FILE
        if not path.is_file():
            return None
        try:
            manifest = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            raise MirrorError(f"mirror manifest {path} is unreadable ({type(exc).__name__}: {exc})") from None
        if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), list) \
                or not isinstance(manifest.get("shards", 1), int) or isinstance(manifest.get("shards"), bool):
            raise MirrorError(f"mirror manifest {path} is not a mirror manifest")
        return manifest

    @property
    def done(self) -> Dict[str, Dict[str, Any]]:
        """Files already applied, by name."""
        return {f["name"]: f for f in self.manifest["files"]}

    def _shard(self, record_id: str) -> int:
        return shard_of(record_id, self.num_shards) if self.num_shards > 1 else 0

    # -- applying
    def _present(self, ids: Sequence[str]) -> Dict[str, bool]:
        """Whether each id is in the index now: from the records applied since the last commit,
        else from one term-set query per shard over the committed index (deleted documents excluded)."""
        out = {i: self._since_commit[i] for i in ids if i in self._since_commit}
        ask: Dict[int, List[str]] = {}
        for i in dict.fromkeys(i for i in ids if i not in out):
            out[i] = False
            ask.setdefault(self._shard(i), []).append(i)
        for shard, shard_ids in ask.items():
            searcher = self.searchers[shard]
            if not searcher.num_docs:
                continue
            query = self._tantivy.Query.term_set_query(self.schema, "id", shard_ids)
            found = searcher.search(query, limit=1, count=True).count
            if found:
                for _, addr in searcher.search(query, limit=found).hits:
                    out[searcher.doc(addr)["id"][0]] = True
        return out

    def apply(self, records: Iterable[Record], counts: Counts, on_record: Optional[Callable[[int], None]] = None) \
            -> Counts:
        """Apply records in order (delete the id's earlier version, then add unless a deletion),
        counting outcomes into `counts`; `on_record(n)` is called after each chunk of n records."""
        chunk: List[Record] = []
        for rec in records:
            chunk.append(rec)
            if len(chunk) >= EXISTS_CHUNK:
                self._apply_chunk(chunk, counts)
                if on_record:
                    on_record(len(chunk))
                chunk = []
        if chunk:
            self._apply_chunk(chunk, counts)
            if on_record:
                on_record(len(chunk))
        return counts

    def _apply_chunk(self, chunk: List[Record], counts: Counts) -> None:
        present = self._present([r.id for r in chunk])
        for rec in chunk:
            was = present[rec.id]
            try:
                doc = None if rec.deleted else _document(rec, self.all_field)
                writer = self.writers[self._shard(rec.id)]
                if was:  # an id in no committed document and not added since needs no delete (most of a baseline)
                    writer.delete_documents_by_term("id", rec.id)
                if doc is not None:
                    writer.add_document(doc)
            except (ValueError, TypeError, OverflowError) as exc:  # e.g. a lone surrogate in a field
                counts.skips.add("cannot be indexed", f"id {rec.id!r}", f"{type(exc).__name__}: {exc}")
                continue
            present[rec.id] = self._since_commit[rec.id] = not rec.deleted
            if rec.deleted:
                if was:
                    counts.deleted += 1
                else:
                    counts.delete_missing += 1
                continue
            if was:
                counts.replaced += 1
            else:
                counts.added += 1
            counts.flags["with_date"] += rec.pub_date is not None
            counts.flags["with_mesh"] += bool(rec.mesh)
            counts.flags["with_major"] += bool(rec.mesh_major)
            counts.flags["with_qualifiers"] += bool(rec.qualifiers)
            counts.flags["with_pt"] += bool(rec.pt)
            counts.fields.update(f for f in TEXT_FIELDS if f not in counts.fields and getattr(rec, f))

    def commit(self, entry: Optional[Dict[str, Any]], counts: Counts, source: str = "") -> None:
        """Commit the applied records (every shard), then record `entry` (a finished file; None
        for none) and `counts` in the manifest and rewrite the index metadata. Not atomic over
        the shards and the manifest: after a kill in between, the rerun re-applies the file (same
        index) but counts its committed records as replaced (see the module docstring)."""
        for writer in self.writers:
            writer.commit()
        for index in self.indexes:
            index.reload()
        self.searchers = [index.searcher() for index in self.indexes]
        self._since_commit.clear()
        totals = self.manifest["totals"]
        for key in COUNT_KEYS:
            totals[key] += getattr(counts, key)
        for reason, n in counts.skips.counts.items():
            totals["skipped"][reason] = totals["skipped"].get(reason, 0) + n
        for key in FLAG_KEYS:
            self.manifest["flags"][key] += counts.flags[key]
        self.manifest["text_fields"] = sorted(set(self.manifest["text_fields"]) | counts.fields)
        if entry is not None:
            self.manifest["files"].append({**entry, **counts.as_dict(),
                                           "ingested_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
        _write_json_atomic(self.dir / MANIFEST_FILE, self.manifest)
        self._write_meta(source)

    def rollback(self) -> None:
        """Drop the records applied since the last commit."""
        for writer in self.writers:
            writer.rollback()
        self._since_commit.clear()

    def _write_meta(self, source: str) -> None:
        """The metadata `LocalSearchEngine` reads: each shard's, then the top-level file."""
        t, flags = self.manifest["totals"], self.manifest["flags"]
        meta = {
            "format_version": INDEX_FORMAT_VERSION,
            "num_docs": self.num_docs,
            "sources": [f["name"] for f in self.manifest["files"]] or ([source] if source else []),
            "formats": ["pubmed-xml"],
            "has_dates": flags["with_date"] > 0, "has_mesh": flags["with_mesh"] > 0,
            "has_major": flags["with_major"] > 0, "has_qualifiers": flags["with_qualifiers"] > 0,
            "has_pt": flags["with_pt"] > 0,
            "text_fields": [f for f in TEXT_FIELDS if f in self.manifest["text_fields"]],
            "stopwords": self.stopwords, "all_field": self.all_field,
            "records_read": sum(t[k] for k in COUNT_KEYS) + sum(t["skipped"].values()),
            "records_added": t["added"] + t["replaced"],
            "deletions": t["deleted"] + t["delete_missing"],
            "replaced_or_deleted": t["replaced"] + t["deleted"],
            "skipped": dict(sorted(t["skipped"].items())),
            "mirror": {"manifest": MANIFEST_FILE, "files": len(self.manifest["files"]), **t},
            "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        if self.num_shards > 1:
            shard_docs = [int(searcher.num_docs) for searcher in self.searchers]
            for i, n in enumerate(shard_docs):
                _write_json_atomic(self.dir / shard_dir_name(i) / INDEX_META_FILE,
                                   {**meta, "num_docs": n, "shard": i, "num_shards": self.num_shards})
            meta.update(shards=[shard_dir_name(i) for i in range(self.num_shards)], shard_docs=shard_docs,
                        shard_hash=SHARD_HASH)
        _write_json_atomic(self.dir / INDEX_META_FILE, meta)

    def close(self) -> None:
        """Wait for tantivy's background merges and release the writer locks."""
        for writer in self.writers:
            writer.wait_merging_threads()
        self.writers = []


def plan_files(files: Sequence[Path], done: Dict[str, Dict[str, Any]], allow_out_of_order: bool = False,
               verify: bool = False) -> Tuple[List[Tuple[Path, int, str, int]], List[str]]:
    """Split the input files (sorted by name) into those to apply, as (path, size, sha256,
    mtime_ns), and the names already applied. An applied file is checked by size, and by
    modification time when the manifest has it; its SHA-256 is computed again only when the
    time differs or `verify` (so a rerun does not re-read every applied file). Raises MirrorError
    for a name given twice, an applied file whose size or checksum changed, or (unless allowed) a
    new file sorting before an applied one."""
    names = [p.name for p in files]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise MirrorError(f"file name given more than once: {', '.join(twice[:5])}")
    last_done = max(done) if done else None
    todo, skipped = [], []
    for path in sorted(files, key=lambda p: p.name):
        mtime_ns = path.stat().st_mtime_ns
        if path.name in done:
            entry = done[path.name]
            size, sha = path.stat().st_size, entry.get("sha256")
            if size == entry.get("size") and (verify or entry.get("mtime_ns", mtime_ns) != mtime_ns):
                size, sha = file_fingerprint(path)
            if entry.get("size") != size or entry.get("sha256") != sha:
                raise MirrorError(f"{path}: was applied with size {entry.get('size')} and SHA-256 "
                                  f"{str(entry.get('sha256'))[:12]}..., now {size} / {str(sha)[:12]}...; a changed "
                                  "file cannot be re-applied over its old version: rebuild the mirror")
            skipped.append(path.name)
            continue
        if last_done is not None and path.name < last_done and not allow_out_of_order:
            raise MirrorError(f"{path.name} sorts before {last_done}, which is already applied: applying an older "
                              "file after newer ones would restore replaced or deleted records "
                              "(allow_out_of_order / --allow-out-of-order to do it anyway)")
        size, sha = file_fingerprint(path)
        todo.append((path, size, sha, mtime_ns))
    return todo, skipped


FileJob = Tuple[Path, int, str, int]  # plan_files' (path, size, sha256, mtime_ns)
MAX_PARSE_WORKERS = 256
_READER_LOG = logging.getLogger(read_pubmed_xml.__module__)  # the reader's skip warnings


def _read_whole_file(path: Path) -> Tuple[List[Record], SkipLog]:
    """A parse worker's job: the file's records in order and what its reader skipped (its warnings are
    logged by the applying process, `_file_readers`, as the in-process reader logs them)."""
    _READER_LOG.setLevel(logging.ERROR)
    skips = SkipLog()
    return list(read_pubmed_xml(path, skips)), skips


def _file_readers(todo: Sequence[FileJob], parse_workers: int) -> Iterator[Tuple[FileJob, Iterable[Record], SkipLog]]:
    """(file, its records in order, the reader's skips) for each file of `todo`, in order. Without workers a
    file is streamed here, as it is applied (the skips fill while its records are consumed); with
    `parse_workers` processes the next files are parsed meanwhile, at most that many ahead, so at most
    `parse_workers` + 1 files' records are held at once. A worker's error (a damaged file) is raised when its
    file's turn comes, after the earlier files were applied."""
    if parse_workers <= 0 or not todo:
        for job in todo:
            skips = SkipLog()
            yield job, read_pubmed_xml(job[0], skips), skips
        return
    # spawn: the writer's threads are running in this process, and forking a threaded process is unsafe
    pool = ProcessPoolExecutor(max_workers=min(parse_workers, len(todo)),
                               mp_context=multiprocessing.get_context("spawn"))
    pending: Deque[Tuple[FileJob, "Future[Tuple[List[Record], SkipLog]]"]] = deque()
    jobs = iter(todo)
    try:
        for job in jobs:
            pending.append((job, pool.submit(_read_whole_file, job[0])))
            if len(pending) >= parse_workers:
                break
        while pending:
            job, future = pending.popleft()
            nxt = next(jobs, None)
            if nxt is not None:
                pending.append((nxt, pool.submit(_read_whole_file, nxt[0])))
            try:
                records, skips = future.result()
            except BrokenProcessPool as exc:  # a worker was killed (e.g. out of memory)
                raise MirrorError(f"{job[0]}: its parse worker stopped ({exc}); the files before it are applied, "
                                  "rerun to resume (--parse-workers 0 parses in the applying process)") from None
            for example in skips.examples:
                _READER_LOG.warning("skipped %s", example)
            yield job, records, skips
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


def ingest_pubmed(index_dir: PathLike, paths: Union[PathLike, Sequence[PathLike]], *, heap_size: int = 512_000_000,
                  num_threads: int = 0, shards: Optional[int] = None, progress: bool = True,
                  allow_out_of_order: bool = False, verify: bool = False,
                  stopwords: Optional[str] = None, all_field: Optional[bool] = None,
                  parse_workers: int = 0) -> Dict[str, Any]:
    """Apply PubMed baseline/update XML files to the mirror at `index_dir` (see the module
    docstring); returns the run's summary: files applied and already done, counts for this run
    and for the whole mirror, documents in the index, seconds and records per second.
    Raises CorpusFormatError for a damaged or non-PubMed file (files before it stay applied)
    and MirrorError for the cases `plan_files` and `MirrorWriter` describe. `verify`: check the
    SHA-256 of every applied file again (by default only size and modification time). `stopwords`:
    the list searches ignore (`text.STOPWORD_LISTS`); None keeps the mirror's (a new one: pubmed).
    `all_field`: fill the combined field (a new mirror: True; fixed at creation). `parse_workers`: processes
    that read the next files while one is applied (0: read each file here, streamed)."""
    from tqdm import tqdm

    if not 0 <= parse_workers <= MAX_PARSE_WORKERS:
        raise ValueError(f"parse_workers must be in [0, {MAX_PARSE_WORKERS}], got {parse_workers}")
    start = time.perf_counter()
    files = expand_paths(paths)
    for path in files:
        fmt = detect_format(path)
        if fmt != "pubmed-xml":
            raise CorpusFormatError(f"{path}: {fmt}, not a PubMed baseline/update XML file")
    mirror = MirrorWriter(index_dir, heap_size=heap_size, num_threads=num_threads, shards=shards, stopwords=stopwords,
                          all_field=all_field)
    run = Counts()
    applied: List[str] = []
    try:
        todo, already = plan_files(files, mirror.done, allow_out_of_order, verify)
        bar = tqdm(total=None, unit="rec", disable=not progress, mininterval=1.0)
        readers = _file_readers(todo, parse_workers)
        try:
            for i, ((path, size, sha, mtime_ns), records, skips) in enumerate(readers, 1):
                bar.set_description(f"[{i}/{len(todo)}] {path.name}")
                counts = Counts(skips=skips)
                try:
                    mirror.apply(records, counts, on_record=bar.update)
                except BaseException:
                    mirror.rollback()
                    raise
                mirror.commit({"name": path.name, "size": size, "sha256": sha, "mtime_ns": mtime_ns}, counts, str(path))
                _merge_counts(run, counts)
                applied.append(path.name)
        finally:
            readers.close()  # stops the parse workers
            bar.close()
        if mirror.stopwords_changed and not applied:  # nothing to apply: save the new list by itself
            mirror.commit(None, Counts())
    except CorpusFormatError as exc:
        # the readers' advice is build_index's ("no index was written"); here earlier files stay applied
        message = str(exc).replace("; no index was written, replace the file", "")
        raise CorpusFormatError(f"{message}. Applied before it in this run: {len(applied)} file(s), committed; "
                                "replace the file and rerun to resume") from None
    finally:
        mirror.close()
    seconds = time.perf_counter() - start
    records = sum(getattr(run, k) for k in COUNT_KEYS)
    return {
        "index": str(index_dir), "files_applied": applied, "files_already_done": already,
        "run": run.as_dict(), "mirror": dict(mirror.manifest["totals"]),
        "num_docs": mirror.num_docs, "shards": mirror.num_shards, "stopwords": mirror.stopwords,
        "all_field": mirror.all_field,
        "seconds": round(seconds, 3),
        "records_per_s": round(records / seconds, 1) if seconds > 0 else None,
    }


def _merge_counts(into: Counts, more: Counts) -> None:
    for key in COUNT_KEYS:
        setattr(into, key, getattr(into, key) + getattr(more, key))
    for reason, n in more.skips.counts.items():
        into.skips.counts[reason] = into.skips.counts.get(reason, 0) + n
    into.skips.examples.extend(more.skips.examples[: max(0, into.skips.max_examples - len(into.skips.examples))])


def ingest_summary(summary: Dict[str, Any]) -> List[str]:
    """Human-readable lines for `ingest_pubmed`'s summary."""
    run, total = summary["run"], summary["mirror"]
    lines = [f"files applied {len(summary['files_applied']):,}, already done (skipped) "
             f"{len(summary['files_already_done']):,}; documents in the mirror {summary['num_docs']:,}",
             f"this run: added {run['added']:,}, replaced {run['replaced']:,}, deleted {run['deleted']:,}, "
             f"deletions of absent PMIDs {run['delete_missing']:,} in {summary['seconds']:.1f}s "
             f"({summary['records_per_s'] or 0:,.0f} records/s)"]
    if run["skipped"]:
        lines.append("this run skipped " + ", ".join(f"{reason}: {n:,}" for reason, n in run["skipped"].items()))
    lines.append(f"mirror total: added {total['added']:,}, replaced {total['replaced']:,}, deleted {total['deleted']:,}, "
                 f"deletions of absent PMIDs {total['delete_missing']:,}, skipped {sum(total['skipped'].values()):,}")
    lines.append(f"searches ignore stopwords: {summary['stopwords']} list; all-fields words searched in "
                 + (f"the combined field ({ALL_TEXT_FIELD})" if summary["all_field"] else "each field"))
    return lines
