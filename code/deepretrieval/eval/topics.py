"""Your own topics against a vendored corpus: read, check and turn a topics file into samples.

    samples, check = load_topic_samples("my_topics.jsonl")            # corpus from the records
    samples, check = load_topic_samples("cases.jsonl", corpus="trials_sigir")

A topics file holds one topic per line (JSON Lines; a `.json` file may instead hold one array of
topics), in the format of the vendored topics (data/README.md); other keys are kept, so the
reference baselines that read them (`boolean_query`, `reference_queries`) apply:

    pubmed_mini   {"topic_id": str, "title": review question, "relevant": [pmid, ...]}
    trials_sigir  {"topic_id": str, "patient": case text, "judgements": {nct_id: grade 0|1|2}}
                  (or "relevant": [nct_id, ...], each then graded 1)

The corpus is `corpus`, else the first readable record's kind (`patient` -> trials_sigir,
`title` -> pubmed_mini). Each topic becomes the verl row the task builds for its own topics
(deepretrieval.data.tasks.pubmed_mini_row / trials_sigir_row, prompt style `reasoning`), so every
method (baselines, prompted LLMs, trained models) is evaluated on it exactly as on the vendored
topics, with the task's engine and K.

Checking, in one pass (time linear in the file and the corpus): a line that is not a topic is
skipped and counted by class, with its line number:

    json             the line is not JSON (or JSON Python cannot read: nested too deep, an integer
                     of more digits than int() converts)
    not_object       the JSON value is not an object
    missing_field    no `topic_id`, no text (`title` / `patient`) or no relevance (`relevant` /
                     `judgements`)
    bad_field        a field of the wrong type (text not a non-blank string, ids not strings or
                     integers, grades not integers; `collection`, `boolean_query` or
                     `reference_queries` not of the vendored topics' types: the topic is skipped)
    duplicate_topic  a `topic_id` seen on an earlier line
    no_relevant      no id with grade >= 1 (recall would be undefined)

Relevant ids that are not in the corpus are counted and reported (`unknown_ids`, per topic) but
kept, as trec_eval keeps qrels: they can never be retrieved, so they count as missed. A file with
no usable topic, an unreadable file or an unknown corpus raises `TopicsFileError`.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Set, Tuple

logger = logging.getLogger(__name__)

# corpus -> (the topic's text field, the verl row builder's name in deepretrieval.data.tasks)
TOPIC_TEXT: Dict[str, str] = {"pubmed_mini": "title", "trials_sigir": "patient"}
MAX_MESSAGES = 20  # line messages kept in a check (all are counted)


class TopicsFileError(ValueError):
    """The topics file cannot be used at all (unreadable, no usable topic, unknown corpus)."""


@dataclass
class TopicsCheck:
    """What reading a topics file found: the usable topics and every problem, classified."""

    path: str
    corpus: Optional[str] = None
    suite: Optional[str] = None  # the results' column (`load_topic_samples`)
    lines: int = 0
    topics: List[Dict[str, Any]] = field(default_factory=list)
    errors: Dict[str, int] = field(default_factory=dict)
    messages: List[str] = field(default_factory=list)
    relevant_ids: int = 0
    unknown_ids: int = 0
    unknown_by_topic: Dict[str, int] = field(default_factory=dict)
    unknown_examples: List[str] = field(default_factory=list)

    def skip(self, kind: str, line_no: int, message: str) -> None:
        self.errors[kind] = self.errors.get(kind, 0) + 1
        if len(self.messages) < MAX_MESSAGES:
            self.messages.append(f"{self.path}:{line_no}: {kind}: {message}")

    def summary(self) -> List[str]:
        """Human-readable lines: what was read, what was skipped, the unknown ids."""
        skipped = sum(self.errors.values())
        out = [f"{self.path}: {len(self.topics)} topics for corpus {self.corpus} ({skipped} lines skipped)"]
        if skipped:
            out.append("skipped: " + ", ".join(f"{k} {v}" for k, v in sorted(self.errors.items())))
            out.extend(self.messages)
            if skipped > len(self.messages):
                out.append(f"... {skipped - len(self.messages)} more")
        if self.unknown_ids:
            out.append(f"{self.unknown_ids} of {self.relevant_ids} relevant ids are not in the {self.corpus} corpus "
                       f"(on {len(self.unknown_by_topic)} topics; they count as missed), e.g. "
                       + ", ".join(self.unknown_examples))
        return out

    def to_dict(self) -> Dict[str, Any]:
        return {"path": self.path, "corpus": self.corpus, "suite": self.suite, "lines": self.lines, "topics": len(self.topics),
                "errors": dict(self.errors), "messages": list(self.messages), "relevant_ids": self.relevant_ids,
                "unknown_ids": self.unknown_ids, "unknown_by_topic": dict(self.unknown_by_topic),
                "unknown_examples": list(self.unknown_examples)}


def _records(path: Path) -> Iterator[Tuple[int, Any, Optional[str]]]:
    """(line number, value, JSON error) per non-blank line; a `.json` array: (index + 1, item, None)."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise TopicsFileError(f"cannot read the topics file {path}: {exc}") from None
    if path.suffix == ".json" and text.lstrip().startswith("["):
        try:
            items = json.loads(text)
        except (ValueError, RecursionError) as exc:  # bad JSON, an over-long integer, too deep a nesting
            raise TopicsFileError(f"{path}: not a JSON array: {type(exc).__name__}: {exc}") from None
        for i, item in enumerate(items, 1):
            yield i, item, None
        return
    for line_no, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except (ValueError, RecursionError) as exc:  # bad JSON, an over-long integer, too deep a nesting
            yield line_no, None, f"{type(exc).__name__}: {exc}"
            continue
        yield line_no, value, None


def detect_corpus(record: Any) -> Optional[str]:
    """The corpus a topic record is written for (its text field), or None."""
    if isinstance(record, dict):
        for corpus, text_field in TOPIC_TEXT.items():
            if text_field in record:
                return corpus
    return None


def _ids(value: Any) -> Optional[List[str]]:
    """A list of ids as strings, or None when `value` is not a list of strings/integers."""
    if not isinstance(value, list):
        return None
    if any(isinstance(v, bool) or not isinstance(v, (str, int)) or not str(v).strip() for v in value):
        return None
    return [str(v).strip() for v in value]


def _judgements(record: Dict[str, Any]) -> Tuple[Optional[Dict[str, int]], str]:
    """The graded judgements of a trials topic ({} for an absent field), or (None, why not)."""
    raw = record.get("judgements")
    if raw is None:
        ids = _ids(record.get("relevant")) if "relevant" in record else []
        return ({doc: 1 for doc in ids}, "") if ids is not None else (None, "'relevant' must be a list of ids")
    if not isinstance(raw, dict):
        return None, "'judgements' must be an object {id: grade}"
    out = {}
    for doc, grade in raw.items():
        if isinstance(grade, bool) or not isinstance(grade, int):
            return None, f"'judgements' grade of {doc!r} must be an integer, not {grade!r}"
        out[str(doc).strip()] = grade
    return out, ""


def _strings(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


def _extra_field_problem(record: Dict[str, Any]) -> str:
    """Why a key the rows or the reference baselines read has the wrong type ("" when none has):
    `collection` and `boolean_query` strings; `reference_queries` an object whose clinicians'
    entries are lists of strings, whose condition lists are {"conditions": [str, ...], ...} and
    whose `human_summary` is a string (each may be null or absent)."""
    from deepretrieval.eval.baselines import CLINICIANS, CONDITION_MODELS

    for name in ("collection", "boolean_query"):
        if record.get(name) is not None and not isinstance(record[name], str):
            return f"{name!r} must be a string or null, not {type(record[name]).__name__}"
    refs = record.get("reference_queries")
    if refs is None:
        return ""
    if not isinstance(refs, dict):
        return f"'reference_queries' must be an object, not {type(refs).__name__}"
    for name in CLINICIANS:
        if refs.get(name) is not None and not _strings(refs[name]):
            return f"'reference_queries.{name}' must be a list of strings"
    for name in CONDITION_MODELS.values():
        entry = refs.get(name)
        if entry is not None and not (isinstance(entry, dict)
                                      and (entry.get("conditions") is None or _strings(entry["conditions"]))):
            return f"'reference_queries.{name}' must be an object with 'conditions': a list of strings"
    if refs.get("human_summary") is not None and not isinstance(refs["human_summary"], str):
        return "'reference_queries.human_summary' must be a string"
    return ""


def check_topic(record: Any, corpus: str, seen: Set[str]) -> Tuple[Optional[Dict[str, Any]], str, str]:
    """(normalised topic, "", "") or (None, error class, message) for one record."""
    if not isinstance(record, dict):
        return None, "not_object", f"a topic is a JSON object, not {type(record).__name__}"
    text_field = TOPIC_TEXT[corpus]
    for name in ("topic_id", text_field):
        if name not in record:
            hint = ""
            other = detect_corpus(record)
            if name == text_field and other and other != corpus:
                hint = f" (the record looks like a {other} topic; --corpus {other}?)"
            return None, "missing_field", f"no {name!r}{hint}"
    topic_id, text = record["topic_id"], record[text_field]
    if isinstance(topic_id, bool) or not isinstance(topic_id, (str, int)) or not str(topic_id).strip():
        return None, "bad_field", f"'topic_id' must be a non-blank string or integer, not {topic_id!r}"
    if not isinstance(text, str) or not text.strip():
        return None, "bad_field", f"{text_field!r} must be a non-blank string"
    problem = _extra_field_problem(record)
    if problem:
        return None, "bad_field", problem
    topic = dict(record, topic_id=str(topic_id).strip())
    if corpus == "trials_sigir":
        if "judgements" not in record and "relevant" not in record:
            return None, "missing_field", "no 'judgements' (or 'relevant')"
        judgements, why = _judgements(record)
        if judgements is None:
            return None, "bad_field", why
        topic["judgements"] = judgements
        relevant = sorted(doc for doc, grade in judgements.items() if grade >= 1)
    else:
        if "relevant" not in record:
            return None, "missing_field", "no 'relevant'"
        relevant = _ids(record["relevant"])
        if relevant is None:
            return None, "bad_field", "'relevant' must be a list of ids (strings or integers)"
    if topic["topic_id"] in seen:
        return None, "duplicate_topic", f"topic_id {topic['topic_id']!r} was given on an earlier line"
    if not relevant:
        return None, "no_relevant", f"topic {topic['topic_id']!r} has no relevant id"
    topic["relevant"] = relevant
    return topic, "", ""


def corpus_ids(corpus: str) -> Set[str]:
    """The document ids of a vendored corpus, normalised as the index normalises them."""
    from deepretrieval.search.local_index import corpus_path
    from deepretrieval.search.ingest import iter_records

    return {rec.id for rec in iter_records(corpus_path(corpus))}


def read_topics_file(
    path: "str | Path", corpus: Optional[str] = None, known_ids: Optional[Set[str]] = None
) -> TopicsCheck:
    """Read and check a topics file (see the module docstring); `known_ids` defaults to the corpus's."""
    path = Path(path)
    if corpus is not None and corpus not in TOPIC_TEXT:
        raise TopicsFileError(f"unknown corpus {corpus!r}; topics files go with: {', '.join(TOPIC_TEXT)}")
    check = TopicsCheck(path=str(path), corpus=corpus)
    seen: Set[str] = set()
    for line_no, record, json_error in _records(path):
        check.lines += 1
        if json_error is not None:
            check.skip("json", line_no, json_error)
            continue
        if check.corpus is None:
            check.corpus = detect_corpus(record)
            if check.corpus is None:
                check.skip("missing_field", line_no, f"no text field ({' or '.join(TOPIC_TEXT.values())}): "
                           "cannot tell the corpus; give --corpus")
                continue
        topic, kind, message = check_topic(record, check.corpus, seen)
        if topic is None:
            check.skip(kind, line_no, message)
            continue
        seen.add(topic["topic_id"])
        check.topics.append(topic)
    if not check.topics:
        detail = "; ".join(check.messages[:3])
        raise TopicsFileError(f"{path}: no usable topic in {check.lines} records" + (f" ({detail})" if detail else ""))
    ids = corpus_ids(check.corpus) if known_ids is None else known_ids
    for topic in check.topics:
        unknown = [doc for doc in topic["relevant"] if doc not in ids]
        check.relevant_ids += len(topic["relevant"])
        if unknown:
            check.unknown_ids += len(unknown)
            check.unknown_by_topic[topic["topic_id"]] = len(unknown)
            check.unknown_examples.extend(unknown[: max(0, 5 - len(check.unknown_examples))])
    return check


def _row_builder(corpus: str) -> Callable[..., Optional[Dict[str, Any]]]:
    from deepretrieval.data import tasks

    return {"pubmed_mini": tasks.pubmed_mini_row, "trials_sigir": tasks.trials_sigir_row}[corpus]


def suite_label(corpus: str, path: "str | Path", taken: Dict[str, str]) -> str:
    """The column of a topics file's results: `<corpus>:<file stem>`, or, when an earlier file's
    label already names the same record folder (`methods.slug`: `dev/topics.jsonl` and
    `test/topics.jsonl`, `my topics` and `my_topics`), `<corpus>:<stem>-<8 hex of the resolved
    path's SHA-256>`. `taken` (record folder -> resolved path) collects the labels given so far;
    the same file twice is a TopicsFileError."""
    from deepretrieval.eval.methods import slug

    resolved = str(Path(path).resolve())
    if resolved in taken.values():
        raise TopicsFileError(f"{path}: the same topics file is given twice")
    stem = Path(path).stem
    label = f"{corpus}:{stem}"
    if slug(label) in taken:  # the stem is cut so the hash survives slug's 80 characters
        label = f"{corpus}:{stem[:40]}-{hashlib.sha256(resolved.encode()).hexdigest()[:8]}"
    if slug(label) in taken:
        raise TopicsFileError(f"{path}: its results would share the folder {slug(label)!r} with "
                              f"{taken[slug(label)]}; rename one of the files")
    taken[slug(label)] = resolved
    return label


def load_topic_samples(
    path: "str | Path", corpus: Optional[str] = None, limit: Optional[int] = None, style: str = "reasoning",
    taken: Optional[Dict[str, str]] = None,
) -> Tuple[List[Any], TopicsCheck]:
    """(samples, check) of a topics file: one EvalSample per usable topic, labelled `<corpus>:<file
    stem>` (`suite_label`: unique among the files loaded with the same `taken`; also `check.suite`)
    so their records and table column stay apart from the vendored topics' and each other's.
    Topics come in `topic_id` order, as a task's own split does (`--limit` keeps the first N; the
    bootstrap intervals then match the task's for the same topics)."""
    from deepretrieval.eval.samples import sample_from_row

    check = read_topics_file(path, corpus)
    for line in check.summary():
        logger.info("%s", line) if not (check.errors or check.unknown_ids) else logger.warning("%s", line)
    build = _row_builder(str(check.corpus))
    suite = check.suite = suite_label(str(check.corpus), path, {} if taken is None else taken)
    ordered = sorted(check.topics, key=lambda t: t["topic_id"])
    topics = ordered if limit is None else ordered[:limit]
    samples = []
    for index, topic in enumerate(topics):
        row = build(topic, "test", index, style)
        samples.append(sample_from_row(row, topic=topic, suite=suite))
    return samples, check
