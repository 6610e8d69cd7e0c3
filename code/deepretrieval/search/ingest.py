"""Readers that turn corpus files into normalised `Record`s for the local index.

Supported inputs (the format is detected from the content, or named explicitly):

- ``jsonl``: JSON Lines, optionally gzipped. The vendored corpora (``{pmid, title, abstract,
  mesh}`` and ``{nct_id, text}``), generic ``{id, title, text}`` documents and any mix of the
  common key spellings (``id|pmid|nct_id|docid|_id``, ``abstract|text|contents|body``). A line
  that holds a ClinicalTrials.gov v2 study (``protocolSection``) is read as one.
- ``pubmed-xml``: PubMed/MEDLINE baseline or update files (``pubmed*.xml[.gz]``), streamed with
  ``iterparse`` so memory stays bounded. ``DeleteCitation`` PMIDs come out as deletion records;
  a PMID seen again (a revised citation, in a later file or later in the same file) replaces
  the earlier one, which is NLM's rule of applying files in order.
- ``ctgov``: ClinicalTrials.gov API v2 study JSON: one study per file, a list of studies, an API
  page ``{"studies": [...]}``, a directory of such files or a zip (the bulk download).

Every reader yields `Record`s; `iter_records(paths, format, skips)` is the single entry point.

Bad input: with a `SkipLog` (what `build_index` passes) a record that cannot be read (invalid
or too deeply nested JSON, not UTF-8, no id, fields of the wrong type, a line over
`MAX_LINE_BYTES`) is skipped and counted by reason; without one it raises `CorpusFormatError`
naming the file and line. A damaged *file* (truncated or corrupt gzip, zip or XML) always raises
`CorpusFormatError`: the records after the damage are unknown, so no reader guesses.
"""

from __future__ import annotations

import calendar
import gzip
import io
import json
import logging
import os
import re
import zipfile
import zlib
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Dict, Iterator, List, Optional, Sequence, Tuple, Union

logger = logging.getLogger(__name__)

FORMATS = ("jsonl", "pubmed-xml", "ctgov")

PathLike = Union[str, os.PathLike]


@dataclass
class Record:
    """One document as the index sees it; `deleted` marks a deletion of `id`."""

    id: str
    title: str = ""
    abstract: str = ""
    mesh: List[str] = field(default_factory=list)  # descriptor names
    mesh_major: List[str] = field(default_factory=list)  # descriptors that are major topics
    qualifiers: List[str] = field(default_factory=list)  # "descriptor/qualifier" (full names)
    pt: List[str] = field(default_factory=list)  # publication types / study types
    keywords: List[str] = field(default_factory=list)
    conditions: List[str] = field(default_factory=list)
    interventions: List[str] = field(default_factory=list)
    eligibility: str = ""
    pub_date: Optional[int] = None  # yyyymmdd
    deleted: bool = False


class CorpusFormatError(ValueError):
    """The input cannot be read as the requested (or any known) corpus format."""


class RecordError(CorpusFormatError):
    """One record cannot be used; `reason` is the category it is counted under when skipped."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


MAX_LINE_BYTES = 64 << 20  # a JSONL line (one record) longer than this is skipped, not read into memory
_DAMAGED = (EOFError, gzip.BadGzipFile, zlib.error, zipfile.BadZipFile)  # a truncated or corrupt container


@dataclass
class SkipLog:
    """Records a lenient read left out: counts by reason and the first `max_examples` places
    (each also logged as a warning)."""

    max_examples: int = 10
    counts: Dict[str, int] = field(default_factory=dict)
    examples: List[str] = field(default_factory=list)

    def add(self, reason: str, where: str, detail: str = "") -> None:
        self.counts[reason] = self.counts.get(reason, 0) + 1
        if len(self.examples) < self.max_examples:
            text = " ".join((f"{where}: {reason}" + (f" ({detail})" if detail else "")).split())[:300]
            self.examples.append(text)
            logger.warning("skipped %s", text)

    def note(self, reason: str) -> None:
        """Count a record that is left out by design (no example, no warning)."""
        self.counts[reason] = self.counts.get(reason, 0) + 1

    @property
    def total(self) -> int:
        return sum(self.counts.values())


def _skip(skips: Optional[SkipLog], reason: str, where: str, detail: str = "") -> None:
    """Count a bad record in `skips`, or raise CorpusFormatError when reading strictly."""
    if skips is None:
        raise CorpusFormatError(f"{where}: {reason}" + (f" ({detail})" if detail else ""))
    skips.add(reason, where, detail)


def _damaged(path: Any, after: str, exc: BaseException) -> CorpusFormatError:
    return CorpusFormatError(f"{path}: the file is truncated or corrupt after {after} "
                             f"({type(exc).__name__}: {exc}); no index was written, replace the file")


# ----------------------------------------------------------------------------- dates

_MONTHS = {m: i + 1 for i, m in enumerate(
    ["jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec"])}
_SEASONS = {"spring": 3, "summer": 6, "fall": 9, "autumn": 9, "winter": 12}


def _month_or_none(value: Optional[str]) -> Optional[int]:
    """A month number from "3", "03", "Mar", "March" or a season; None when it is not one."""
    value = (value or "").strip().lower()
    if value.isdigit():
        m = int(value)
        return m if 1 <= m <= 12 else None
    return _MONTHS.get(value[:3]) if len(value) >= 3 and value[:3] in _MONTHS else _SEASONS.get(value)


def _month(value: Optional[str]) -> int:
    """Lenient month for corpus fields (PubMed <Month>): anything unreadable is January."""
    return _month_or_none(value) or 1 if value else 1


def _yyyymmdd(year: int, month: int, day: Optional[int], end: bool) -> Optional[int]:
    """yyyymmdd of a real calendar day, or None. A missing day is the first of the month, or
    with `end` day 31 (an inclusive upper bound: no real day lies between the 28th-30th and it)."""
    if not (1 <= year <= 9999 and 1 <= month <= 12):
        return None
    if day is None:
        return year * 10000 + month * 100 + (31 if end else 1)
    if not 1 <= day <= calendar.monthrange(year, month)[1]:
        return None
    return year * 10000 + month * 100 + day


def parse_date(value: Any, end: bool = False) -> Optional[int]:
    """Parse "YYYY", "YYYY/MM", "YYYY/MM/DD" (also with "-" or "."), "YYYY Mon DD" or an int
    yyyymmdd into yyyymmdd. Missing parts are the first day of the period, or the last when
    `end` (so "2005" as an upper bound is 20051231). Text after the date is ignored (corpus
    fields such as "2005-03-15T00:00"). Returns None when there is no year or the date does not
    exist (month 13, day 45, 2021/02/29)."""
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, float) and value.is_integer():  # a JSON year written 2005.0
        value = int(value)
    if isinstance(value, int):
        if 1000 <= value <= 9999:
            return value * 10000 + (1231 if end else 101)
        if not 10000000 <= value <= 99991231:
            return None
        return _yyyymmdd(value // 10000, value // 100 % 100, value % 100, end)
    text = str(value).strip()
    m = re.match(r"^(\d{4})(?:[/\-. ]([A-Za-z]{3,}|\d{1,2})(?:[/\-. ](\d{1,2}))?)?", text)
    if not m:
        return None
    year = int(m.group(1))
    if m.group(2) is None:
        return year * 10000 + (1231 if end else 101)
    month = _month_or_none(m.group(2))
    if month is None:
        return None
    return _yyyymmdd(year, month, int(m.group(3)) if m.group(3) else None, end)


DATE_FILTER_FORMAT = "YYYY, YYYY/MM or YYYY/MM/DD"
_DATE_FILTER_RE = re.compile(r"\d{4}(?:([/\-.])\d{1,2}(?:\1\d{1,2})?)?")


def check_date_filter(value: Any, end: bool = False, name: str = "date") -> int:
    """A `min_date`/`max_date` filter value -> yyyymmdd; raises ValueError unless the whole
    value is YYYY, YYYY/MM or YYYY/MM/DD (separator "/", "-" or ".") naming a real day."""
    text = str(value).strip()
    parsed = parse_date(text, end=end) if _DATE_FILTER_RE.fullmatch(text) else None
    if parsed is None:
        raise ValueError(f"{name} {value!r} is not a valid date (use {DATE_FILTER_FORMAT})")
    return parsed


# ----------------------------------------------------------------------------- opening

def open_text(path: PathLike) -> IO[str]:
    """Open a file as UTF-8 text, transparently gunzipping (detected by magic bytes, not name)."""
    return io.TextIOWrapper(_open_binary(path), encoding="utf-8")


def _open_binary(path: PathLike) -> IO[bytes]:
    with open(path, "rb") as fh:
        magic = fh.read(2)
    return gzip.open(path, "rb") if magic == b"\x1f\x8b" else open(path, "rb")


def expand_paths(paths: Union[PathLike, Sequence[PathLike]]) -> List[Path]:
    """Files to read, in order: directories expand to their corpus files, sorted by name
    (baseline and update files are numbered so that name order is NLM's processing order)."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    out: List[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            files = sorted(
                f for f in p.rglob("*")
                if f.is_file() and re.search(r"\.(jsonl|json|xml|zip)(\.gz)?$", f.name)
            )
            if not files:
                raise CorpusFormatError(f"{p}: no corpus files (*.jsonl, *.json, *.xml, *.zip) inside")
            out.extend(files)
        elif p.is_file():
            out.append(p)
        else:
            raise FileNotFoundError(f"corpus not found: {p}")
    return out


def detect_format(path: PathLike) -> str:
    """Guess the format of one file from its first bytes (after gunzip)."""
    path = Path(path)
    if zipfile.is_zipfile(path) or _zip_magic(path):
        return "ctgov"  # read_ctgov reports a damaged zip
    try:
        with _open_binary(path) as fh:
            head = fh.read(65536)
    except _DAMAGED as exc:
        raise _damaged(path, "its first bytes", exc) from None
    text = head.decode("utf-8", errors="replace").lstrip("\ufeff \t\r\n")
    if not text:
        raise CorpusFormatError(f"{path}: empty file")
    if text.startswith("<"):
        if "PubmedArticle" in text or "MedlineCitation" in text or "DeleteCitation" in text:
            return "pubmed-xml"
        raise CorpusFormatError(f"{path}: XML but not a PubMed baseline/update file")
    if text.startswith("["):
        return "ctgov"
    if text.startswith("{"):
        if re.search(r"\.jsonl(\.gz)?$", path.name):
            return "jsonl"  # the name says so; a bad first line is then one skipped record
        first = text.split("\n", 1)[0]
        try:
            obj = json.loads(first)
        except RecursionError:
            return "jsonl"  # a line nested too deeply; the reader skips it
        except json.JSONDecodeError:
            return "ctgov"  # a pretty-printed single JSON document (read_ctgov also reads JSONL)
        if isinstance(obj, dict) and "studies" in obj:
            return "ctgov"
        return "jsonl"
    raise CorpusFormatError(f"{path}: cannot detect the corpus format (not JSON, JSONL or PubMed XML)")


# ----------------------------------------------------------------------------- JSONL

_ID_KEYS = ("id", "pmid", "PMID", "nct_id", "nctId", "docid", "doc_id", "_id")
_BODY_KEYS = ("abstract", "text", "contents", "body")


def _as_list(value: Any) -> List[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value] if value.strip() else []
    return [str(v) for v in value if v is not None and str(v).strip()]


def record_from_dict(obj: Dict[str, Any]) -> Record:
    """Normalise one JSON object (vendored corpus row, generic document or CT.gov study)."""
    if "protocolSection" in obj:
        return record_from_ctgov(obj)
    doc_id = next((obj[k] for k in _ID_KEYS if obj.get(k) not in (None, "")), None)
    if isinstance(doc_id, str):
        doc_id = doc_id.strip()
    if doc_id is None or doc_id == "":
        raise RecordError("no id", f"record without an id (one of {', '.join(_ID_KEYS)}): keys {sorted(obj)[:8]}")
    if isinstance(doc_id, bool) or not isinstance(doc_id, (str, int)):
        raise RecordError("bad id", f"record id must be a string or an integer, not {type(doc_id).__name__}")
    body = next((obj[k] for k in _BODY_KEYS if obj.get(k)), "")
    date = next((obj[k] for k in ("pub_date", "date", "publication_date", "year") if obj.get(k)), None)
    return Record(
        id=str(doc_id),
        title=str(obj.get("title") or ""),
        abstract=str(body),
        mesh=_as_list(obj.get("mesh") or obj.get("mesh_terms")),
        mesh_major=_as_list(obj.get("mesh_major") or obj.get("majr")),
        qualifiers=_as_list(obj.get("qualifiers")),
        pt=_as_list(obj.get("pt") or obj.get("publication_types")),
        keywords=_as_list(obj.get("keywords")),
        conditions=_as_list(obj.get("conditions")),
        interventions=_as_list(obj.get("interventions")),
        eligibility=str(obj.get("eligibility") or ""),
        pub_date=parse_date(date),
    )


_FIELD_ERRORS = (TypeError, ValueError, AttributeError, KeyError, RecursionError)  # fields of the wrong shape


def _record_or_skip(obj: Any, where: str, skips: Optional[SkipLog]) -> Optional[Record]:
    """`record_from_dict(obj)`, or None after counting why it is not a record."""
    if not isinstance(obj, dict):
        _skip(skips, "not a JSON object", where, f"got a JSON {type(obj).__name__}")
        return None
    try:
        return record_from_dict(obj)
    except RecordError as exc:
        _skip(skips, exc.reason, where, str(exc))
    except _FIELD_ERRORS as exc:
        _skip(skips, "fields of the wrong type", where, f"{type(exc).__name__}: {exc}")
    return None


def _json_lines(path: PathLike) -> Iterator[Tuple[int, Optional[bytes]]]:
    """(line number, bytes) of each line; bytes None for a line over MAX_LINE_BYTES (its rest is
    read past, never held). A truncated or corrupt gzip stream raises CorpusFormatError."""
    lineno = 0
    with _open_binary(path) as fh:
        try:
            while True:
                line = fh.readline(MAX_LINE_BYTES + 1)
                if not line:
                    return
                lineno += 1
                if len(line) > MAX_LINE_BYTES:
                    while line and not line.endswith(b"\n"):
                        line = fh.readline(MAX_LINE_BYTES)
                    yield lineno, None
                else:
                    yield lineno, line
        except _DAMAGED as exc:
            raise _damaged(path, f"line {lineno}", exc) from None


def read_jsonl(path: PathLike, skips: Optional[SkipLog] = None) -> Iterator[Record]:
    """One JSON object per line (blank lines ignored); see the module docstring for bad lines."""
    for lineno, line in _json_lines(path):
        where = f"{path}:{lineno}"
        if line is None:
            _skip(skips, "line too long", where, f"over {MAX_LINE_BYTES:,} bytes")
            continue
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as exc:
            _skip(skips, "not UTF-8", where, f"byte {exc.start}: {exc.reason}")
            continue
        text = text.strip().lstrip("\ufeff")
        if not text:
            continue
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as exc:
            _skip(skips, "invalid JSON", where, exc.msg)
            continue
        except RecursionError:
            _skip(skips, "JSON nested too deeply", where)
            continue
        record = _record_or_skip(obj, where, skips)
        if record is not None:
            yield record


# ----------------------------------------------------------------------------- PubMed XML

def _text(elem: Optional[ET.Element]) -> str:
    """All text inside an element (titles carry inline markup such as <i> and <sup>)."""
    if elem is None:
        return ""
    return re.sub(r"\s+", " ", "".join(elem.itertext())).strip()


def _pubmed_date(article: ET.Element, citation: ET.Element) -> Optional[int]:
    """[dp]: the journal issue's PubDate; MedlineDate ("1998 Dec-1999 Jan") by its start;
    the electronic ArticleDate when the issue has no date."""
    pub = article.find("Journal/JournalIssue/PubDate")
    if pub is not None:
        year = pub.findtext("Year")
        if year:
            month = _month(pub.findtext("Month"))
            day = pub.findtext("Day")
            return int(year) * 10000 + month * 100 + (int(day) if day and day.isdigit() else 1)
        medline = pub.findtext("MedlineDate")
        if medline:
            m = re.search(r"(\d{4})(?:\s+([A-Za-z]{3}))?", medline)
            if m:
                return int(m.group(1)) * 10000 + _month(m.group(2)) * 100 + 1
    art_date = article.find("ArticleDate")
    if art_date is not None and art_date.findtext("Year"):
        return parse_date(
            f"{art_date.findtext('Year')}/{art_date.findtext('Month') or '01'}/{art_date.findtext('Day') or '01'}"
        )
    return None


def record_from_pubmed_article(elem: ET.Element) -> Optional[Record]:
    citation = elem.find("MedlineCitation")
    if citation is None:
        return None
    pmid = (citation.findtext("PMID") or "").strip()
    if not pmid:
        return None
    article = citation.find("Article")
    title = abstract = ""
    pts: List[str] = []
    date = None
    if article is not None:
        title = _text(article.find("ArticleTitle")) or _text(article.find("VernacularTitle"))
        parts = []
        for node in article.findall("Abstract/AbstractText"):
            label = node.get("Label")
            text = _text(node)
            if text:
                parts.append(f"{label}: {text}" if label else text)
        abstract = " ".join(parts)
        pts = [_text(p) for p in article.findall("PublicationTypeList/PublicationType") if _text(p)]
        date = _pubmed_date(article, citation)
    mesh, major, quals = [], [], []
    for heading in citation.findall("MeshHeadingList/MeshHeading"):
        desc = heading.find("DescriptorName")
        if desc is None or not _text(desc):
            continue
        name = _text(desc)
        mesh.append(name)
        is_major = desc.get("MajorTopicYN") == "Y"
        for q in heading.findall("QualifierName"):
            qname = _text(q)
            quals.append(f"{name}/{qname}")
            is_major = is_major or q.get("MajorTopicYN") == "Y"  # PubMed: heading/qualifier* -> [majr]
        if is_major:
            major.append(name)
    keywords = [_text(k) for k in citation.findall("KeywordList/Keyword") if _text(k)]
    return Record(id=pmid, title=title, abstract=abstract, mesh=mesh, mesh_major=major,
                  qualifiers=quals, pt=pts, keywords=keywords, pub_date=date)


def read_pubmed_xml(path: PathLike, skips: Optional[SkipLog] = None) -> Iterator[Record]:
    """Stream a PubMed baseline/update file. Elements are cleared as soon as they are read. An
    article whose fields cannot be read is skipped (counted); malformed XML is a damaged file."""
    articles = 0
    with _open_binary(path) as fh:
        try:
            context = ET.iterparse(fh, events=("start", "end"))
            _, root = next(context)
            for event, elem in context:
                if event != "end":
                    continue
                if elem.tag == "PubmedArticle":
                    articles += 1
                    try:
                        record = record_from_pubmed_article(elem)
                        if record is None and skips is not None:
                            skips.note("no PMID")
                    except _FIELD_ERRORS as exc:
                        pmid = (elem.findtext("MedlineCitation/PMID") or "?").strip()
                        _skip(skips, "fields of the wrong type", f"{path}: article {articles} (PMID {pmid})",
                              f"{type(exc).__name__}: {exc}")
                        record = None
                    if record is not None:
                        yield record
                    root.clear()
                elif elem.tag == "DeleteCitation":
                    for pmid in elem.findall("PMID"):
                        if pmid.text and pmid.text.strip():
                            yield Record(id=pmid.text.strip(), deleted=True)
                    root.clear()
                elif elem.tag == "PubmedBookArticle":
                    if skips is not None:
                        skips.note("book record (not indexed)")
                    root.clear()  # books have no MEDLINE citation; not indexed
        except StopIteration:
            raise CorpusFormatError(f"{path}: empty XML") from None
        except ET.ParseError as exc:
            raise CorpusFormatError(f"{path}: malformed XML after {articles} articles ({exc}); "
                                    "no index was written, replace the file") from None
        except _DAMAGED as exc:
            raise _damaged(path, f"{articles} articles", exc) from None


# ----------------------------------------------------------------------------- ClinicalTrials.gov

def _get(obj: Any, *keys: str) -> Any:
    for key in keys:
        if not isinstance(obj, dict):
            return None
        obj = obj.get(key)
    return obj


def record_from_ctgov(study: Dict[str, Any]) -> Record:
    """One API v2 study: protocolSection modules plus the derived MeSH browse terms."""
    proto = study.get("protocolSection") or {}
    nct = _get(proto, "identificationModule", "nctId")
    if not nct:
        raise RecordError("no id", "ClinicalTrials.gov study without protocolSection.identificationModule.nctId")
    ident = proto.get("identificationModule", {})
    titles = [t for t in (ident.get("briefTitle"), ident.get("officialTitle")) if t]
    desc = proto.get("descriptionModule", {}) or {}
    body = " ".join(t for t in (desc.get("briefSummary"), desc.get("detailedDescription")) if t)
    cond = proto.get("conditionsModule", {}) or {}
    arms = proto.get("armsInterventionsModule", {}) or {}
    interventions = [i.get("name", "") for i in arms.get("interventions", []) or [] if i.get("name")]
    derived = study.get("derivedSection", {}) or {}
    mesh = [m.get("term") for m in _get(derived, "conditionBrowseModule", "meshes") or [] if m.get("term")]
    mesh += [m.get("term") for m in _get(derived, "interventionBrowseModule", "meshes") or [] if m.get("term")]
    design = proto.get("designModule", {}) or {}
    pts = _as_list(design.get("studyType")) + [p.replace("_", " ") for p in _as_list(design.get("phases"))]
    status = proto.get("statusModule", {}) or {}
    date = (_get(status, "studyFirstPostDateStruct", "date") or _get(status, "studyFirstSubmitDate")
            or _get(status, "startDateStruct", "date"))
    return Record(
        id=str(nct).strip(),
        title=" ".join(titles),
        abstract=body,
        mesh=mesh,
        pt=pts,
        keywords=_as_list(cond.get("keywords")),
        conditions=_as_list(cond.get("conditions")),
        interventions=interventions,
        eligibility=str(_get(proto, "eligibilityModule", "eligibilityCriteria") or ""),
        pub_date=parse_date(date),
    )


def _studies_in(obj: Any, source: str, skips: Optional[SkipLog] = None) -> Iterator[Record]:
    """Studies in a parsed CT.gov file: a study, a list of studies, an API page {"studies": [...]}
    or lists of those (walked without recursion, so nesting depth costs no stack)."""
    stack: List[Tuple[Any, str]] = [(obj, source)]
    while stack:
        item, where = stack.pop()
        if isinstance(item, list):
            stack.extend(reversed([(x, f"{where}[{i}]") for i, x in enumerate(item)]))
        elif isinstance(item, dict) and "studies" in item and "protocolSection" not in item:
            stack.append((item["studies"], f"{where}.studies"))
        elif isinstance(item, dict):
            record = _record_or_skip(item, where, skips)
            if record is not None:
                yield record
        else:
            _skip(skips, "not a study object", where, f"got a JSON {type(item).__name__}")


def _load_json(data: bytes, where: str, skips: Optional[SkipLog]) -> Tuple[bool, Any]:
    """(ok, parsed) for a whole JSON document; a bad one is skipped (or raises when strict)."""
    try:
        return True, json.loads(data.decode("utf-8-sig"))
    except UnicodeDecodeError as exc:
        _skip(skips, "not UTF-8", where, f"byte {exc.start}: {exc.reason}")
    except json.JSONDecodeError as exc:
        _skip(skips, "invalid JSON", where, f"{exc.msg} at line {exc.lineno}")
    except RecursionError:
        _skip(skips, "JSON nested too deeply", where)
    return False, None


def _zip_magic(path: PathLike) -> bool:
    """The file starts like a zip archive (whether or not its central directory survived)."""
    with open(path, "rb") as fh:
        return fh.read(4) == b"PK\x03\x04"


def read_ctgov(path: PathLike, skips: Optional[SkipLog] = None) -> Iterator[Record]:
    """A study file, a list or API page of studies, JSON Lines of studies, or a zip of study files
    (the bulk download). A study file that is not JSON is one skipped record."""
    path = Path(path)
    if _zip_magic(path) and not zipfile.is_zipfile(path):
        raise CorpusFormatError(f"{path}: a zip archive without its directory (truncated download?); "
                                "no index was written, replace the file")
    if zipfile.is_zipfile(path):
        try:
            with zipfile.ZipFile(path) as zf:
                for name in sorted(n for n in zf.namelist() if n.endswith(".json")):
                    with zf.open(name) as fh:
                        ok, obj = _load_json(fh.read(), f"{path}!{name}", skips)
                    if ok:
                        yield from _studies_in(obj, f"{path}!{name}", skips)
        except _DAMAGED as exc:
            raise _damaged(path, "some of its members", exc) from None
        return
    try:
        with _open_binary(path) as fh:
            data = fh.read()
    except _DAMAGED as exc:
        raise _damaged(path, "reading part of it", exc) from None
    try:
        obj = json.loads(data.decode("utf-8-sig"))
    except json.JSONDecodeError as exc:
        if exc.msg == "Extra data":  # a first JSON value followed by more: JSON Lines of studies
            yield from read_jsonl(path, skips)
            return
        ok, obj = False, None
    except (UnicodeDecodeError, RecursionError):
        ok, obj = False, None
    else:
        ok = True
    if not ok:
        body = data.strip()
        if body[:1] == b"{" and (b"\n" not in body or b"\n{" in body):
            yield from read_jsonl(path, skips)  # one line, or JSON Lines whose first line is the bad one
            return
        ok, obj = _load_json(data, str(path), skips)  # counts (or raises) why
        if not ok:
            return
    yield from _studies_in(obj, str(path), skips)


# ----------------------------------------------------------------------------- entry point

READERS = {"jsonl": read_jsonl, "pubmed-xml": read_pubmed_xml, "ctgov": read_ctgov}


def iter_records(paths: Union[PathLike, Sequence[PathLike]], format: Optional[str] = None,
                 skips: Optional[SkipLog] = None) -> Iterator[Record]:
    """Yield records from one or more files/directories; `format=None` detects it per file.
    With `skips`, bad records are counted there and left out; without, they raise."""
    if format is not None and format not in READERS:
        raise CorpusFormatError(f"unknown corpus format {format!r}; known: {', '.join(FORMATS)}")
    for path in expand_paths(paths):
        fmt = format or detect_format(path)
        logger.debug("reading %s as %s", path, fmt)
        yield from READERS[fmt](path, skips)
