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

Every reader yields `Record`s; `iter_records(paths, format)` is the single entry point.
"""

from __future__ import annotations

import gzip
import io
import json
import logging
import os
import re
import zipfile
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Dict, Iterator, List, Optional, Sequence, Union

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


# ----------------------------------------------------------------------------- dates

_MONTHS = {m: i + 1 for i, m in enumerate(
    ["jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec"])}
_SEASONS = {"spring": 3, "summer": 6, "fall": 9, "autumn": 9, "winter": 12}


def _month(value: Optional[str]) -> int:
    if not value:
        return 1
    value = value.strip().lower()
    if value.isdigit():
        m = int(value)
        return m if 1 <= m <= 12 else 1
    return _MONTHS.get(value[:3], _SEASONS.get(value, 1))


def parse_date(value: Any, end: bool = False) -> Optional[int]:
    """Parse "YYYY", "YYYY/MM", "YYYY/MM/DD" (also with "-" or "."), "YYYY Mon DD" or an int
    yyyymmdd into yyyymmdd. Missing parts are the first day of the period, or the last when
    `end` (so "2005" as an upper bound is 20051231). Returns None when there is no year."""
    if value is None:
        return None
    if isinstance(value, int):
        if 1000 <= value <= 9999:
            return value * 10000 + (1231 if end else 101)
        return value if 10000000 <= value <= 99991231 else None
    text = str(value).strip()
    m = re.match(r"^(\d{4})(?:[/\-. ]([A-Za-z]{3,}|\d{1,2})(?:[/\-. ](\d{1,2}))?)?", text)
    if not m:
        return None
    year = int(m.group(1))
    if m.group(2) is None:
        return year * 10000 + (1231 if end else 101)
    month = _month(m.group(2))
    if m.group(3) is None:
        day = 31 if end else 1  # an inclusive upper bound; day 31 of a short month is harmless
    else:
        day = int(m.group(3))
    return year * 10000 + month * 100 + day


# ----------------------------------------------------------------------------- opening

def open_text(path: PathLike) -> IO[str]:
    """Open a file as text, transparently gunzipping (detected by magic bytes, not name)."""
    with open(path, "rb") as fh:
        magic = fh.read(2)
    if magic == b"\x1f\x8b":
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8")
    return open(path, "r", encoding="utf-8")


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
    if zipfile.is_zipfile(path):
        return "ctgov"
    with _open_binary(path) as fh:
        head = fh.read(65536)
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
        first = text.split("\n", 1)[0]
        try:
            obj = json.loads(first)
        except json.JSONDecodeError:
            return "ctgov"  # a pretty-printed single JSON document
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
    if doc_id is None:
        raise CorpusFormatError(f"record without an id (one of {', '.join(_ID_KEYS)}): keys {sorted(obj)[:8]}")
    body = next((obj[k] for k in _BODY_KEYS if obj.get(k)), "")
    date = next((obj[k] for k in ("pub_date", "date", "publication_date", "year") if obj.get(k)), None)
    return Record(
        id=str(doc_id).strip(),
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


def read_jsonl(path: PathLike) -> Iterator[Record]:
    with open_text(path) as fh:
        for lineno, line in enumerate(fh, 1):
            line = line.strip()
            if not line:
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise CorpusFormatError(f"{path}:{lineno}: invalid JSON ({exc.msg})") from None
            if not isinstance(obj, dict):
                raise CorpusFormatError(f"{path}:{lineno}: expected a JSON object")
            try:
                yield record_from_dict(obj)
            except CorpusFormatError as exc:
                raise CorpusFormatError(f"{path}:{lineno}: {exc}") from None


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


def read_pubmed_xml(path: PathLike) -> Iterator[Record]:
    """Stream a PubMed baseline/update file. Elements are cleared as soon as they are read."""
    with _open_binary(path) as fh:
        try:
            context = ET.iterparse(fh, events=("start", "end"))
            _, root = next(context)
            for event, elem in context:
                if event != "end":
                    continue
                if elem.tag == "PubmedArticle":
                    record = record_from_pubmed_article(elem)
                    if record is not None:
                        yield record
                    root.clear()
                elif elem.tag == "DeleteCitation":
                    for pmid in elem.findall("PMID"):
                        if pmid.text and pmid.text.strip():
                            yield Record(id=pmid.text.strip(), deleted=True)
                    root.clear()
                elif elem.tag == "PubmedBookArticle":
                    root.clear()  # books have no MEDLINE citation; not indexed
        except ET.ParseError as exc:
            raise CorpusFormatError(f"{path}: malformed XML ({exc})") from None


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
        raise CorpusFormatError("ClinicalTrials.gov study without protocolSection.identificationModule.nctId")
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


def _studies_in(obj: Any, source: str) -> Iterator[Record]:
    if isinstance(obj, list):
        for item in obj:
            yield from _studies_in(item, source)
    elif isinstance(obj, dict) and "studies" in obj:
        yield from _studies_in(obj["studies"], source)
    elif isinstance(obj, dict):
        try:
            yield record_from_dict(obj)
        except CorpusFormatError as exc:
            raise CorpusFormatError(f"{source}: {exc}") from None
    else:
        raise CorpusFormatError(f"{source}: expected a study object or a list of studies")


def read_ctgov(path: PathLike) -> Iterator[Record]:
    path = Path(path)
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as zf:
            for name in sorted(n for n in zf.namelist() if n.endswith(".json")):
                with zf.open(name) as fh:
                    yield from _studies_in(json.load(fh), f"{path}!{name}")
        return
    with open_text(path) as fh:
        text = fh.read()
    try:
        obj = json.loads(text)
    except json.JSONDecodeError:
        # JSON Lines of studies
        yield from read_jsonl(path)
        return
    yield from _studies_in(obj, str(path))


# ----------------------------------------------------------------------------- entry point

READERS = {"jsonl": read_jsonl, "pubmed-xml": read_pubmed_xml, "ctgov": read_ctgov}


def iter_records(paths: Union[PathLike, Sequence[PathLike]], format: Optional[str] = None) -> Iterator[Record]:
    """Yield records from one or more files/directories; `format=None` detects it per file."""
    if format is not None and format not in READERS:
        raise CorpusFormatError(f"unknown corpus format {format!r}; known: {', '.join(FORMATS)}")
    for path in expand_paths(paths):
        fmt = format or detect_format(path)
        logger.debug("reading %s as %s", path, fmt)
        yield from READERS[fmt](path)
