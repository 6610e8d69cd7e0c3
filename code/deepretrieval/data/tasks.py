"""Search tasks -> verl training rows (parquet).

Every row follows verl's schema:
    data_source   "pubmed" | "ctgov" | "pubmed_mini" | "trials_sigir"  (selects the reward's engine)
    prompt        chat messages (see deepretrieval.data.prompts)
    ability       "literature_search"
    reward_model  {"style": "rule", "ground_truth": {"target": [ids], ...}}
    extra_info    {"split", "index", "topic_id", "pub_date", "prompt_style", "assistant_prefix",
                   "think_in_prompt", "n_targets", "task_input", "task_kind", "prompt_engine", ...}

`task_input` is the information need as it went into the prompt (the PICO text, review question or
patient case), `task_kind` and `prompt_engine` the prompt text's other two keys: readers take the
input from there (`row_task_input`) and `restyle_row` renders the same row in another style.
Rows written before these keys existed fall back to cutting the input out of the prompt text
(`prompts.legacy_task_input_from_prompt`).

One function per task turns raw records into rows (registry `TASKS`); `prepare_task` writes
`train.parquet`, `test.parquet` and a small `val.parquet` (a seeded sample of the test split, as
the original DeepRetrieval validated on a slice of its test set). Splits are deterministic for a
given seed. With `val_from="first"` the validation file is instead the first `val_size` rows of the
raw test file in its original order (the original DeepRetrieval validated on the first 101 rows of
its test.jsonl; the vendored LEADS ids `publication_test-N` number that order, so it is recovered
even from a reshuffled copy; see docs/original.md). For the local-corpus tasks `val_from="train"` holds
out `val_size` *training* topics instead (seeded, not trained on): a validation split that shares no
topic with test, to choose settings such as the step count without looking at the test topics.

Raw LEADS rows come in two spellings: the project's `{"id", "pico", "targets", "pub_date"}` and the
original DeepRetrieval's `{"pico", "publication_pmids", "pub_date"}` (`TARGET_KEYS`). Parquet files
written by the original preprocessing (`data_source="literature"`, `ability="literature_mining"`,
top-level `pub_date` and `label`) are read as they are by the dataset and routed by the reward to
the PubMed source. The trials_sigir graded judgements travel in the ground truth as parallel lists
(`judged`, `grades`): a dict keyed by trial id would become a parquet struct with one field per
trial id in the whole split.
"""

from __future__ import annotations

import json
import logging
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional

from deepretrieval.data import prompts
from deepretrieval.paths import data_root

logger = logging.getLogger(__name__)

ABILITY = "literature_search"
SPLITS = ("train", "test", "val")

Row = Dict[str, Any]


def read_jsonl(path: "str | Path") -> List[Dict[str, Any]]:
    rows = []
    with open(path, encoding="utf-8") as handle:
        for line_no, line in enumerate(handle, 1):
            line = line.strip()
            if not line:
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                logger.warning("%s:%d: skipped, not JSON (%s)", path, line_no, exc)
    return rows


def prompt_messages(task_kind: str, engine: str, task_input: str, style: str) -> List[Dict[str, str]]:
    """The `prompt` column of a row: the chat messages of `task_input` in prompt style `style`."""
    if style in prompts.RAW_FRAME_STYLES:
        if task_kind not in ("pico_publication", "pico_trial"):
            raise ValueError(f"prompt style {style!r} exists for the PICO tasks (pubmed, ctgov) only, not {task_kind!r}")
        return [{"role": "user", "content": prompts.build_original_prompt(task_input)}]
    return prompts.build_messages(task_kind, task_input, engine, style)


def style_info(style: str) -> Dict[str, Any]:
    """The `extra_info` keys a row's prompt style sets (the reward's format check reads them)."""
    prompt_style = prompts.get_style(style)
    return {"prompt_style": prompt_style.name, "assistant_prefix": prompt_style.assistant_prefix,
            "think_in_prompt": prompt_style.think_in_prompt}


def make_row(
    data_source: str,
    task_kind: str,
    engine: str,
    task_input: str,
    ground_truth: Dict[str, Any],
    split: str,
    index: int,
    topic_id: str,
    style: str,
    pub_date: Optional[str] = None,
    extra: Optional[Dict[str, Any]] = None,
) -> Row:
    messages = prompt_messages(task_kind, engine, task_input, style)
    extra_info = {
        "split": split,
        "index": index,
        "topic_id": str(topic_id),
        "pub_date": pub_date,
        **style_info(style),
        "n_targets": len(ground_truth["target"]),
        "task_input": task_input,
        "task_kind": task_kind,
        "prompt_engine": engine,
    }
    extra_info.update(extra or {})
    return {
        "data_source": data_source,
        "prompt": messages,
        "ability": ABILITY,
        "reward_model": {"style": "rule", "ground_truth": ground_truth},
        "extra_info": extra_info,
    }


def row_task_input(row: Dict[str, Any]) -> str:
    """The information need of a verl row, stripped: `extra_info.task_input`, or for rows written
    before it was stored, the text cut out of the prompt (`prompts.legacy_task_input_from_prompt`)."""
    extra = row.get("extra_info") or {}
    stored = extra.get("task_input") if isinstance(extra, dict) else None
    if isinstance(stored, str):
        return stored.strip()
    messages = row.get("prompt") or []
    if isinstance(messages, str):
        messages = [{"role": "user", "content": messages}]
    return prompts.legacy_task_input_from_prompt(messages)


def restyle_row(row: Dict[str, Any], style: str) -> Row:
    """`row` with its prompt (and the style keys of `extra_info`) rendered in prompt style `style`;
    the row itself when it is in that style already. Needs the keys `make_row` stores (task input,
    task kind, prompt engine); moving a row into or out of a raw-frame style (`original`, whose
    PICO text is formatted differently) is refused: prepare the data in that style instead."""
    extra = dict(row.get("extra_info") or {})
    current = extra.get("prompt_style")
    if current == style:
        return row
    prompts.get_style(style)  # an unknown style: its own error first
    if style in prompts.RAW_FRAME_STYLES or current in prompts.RAW_FRAME_STYLES or prompts.is_raw_frame(row):
        raise ValueError(f"cannot re-render a {current or 'raw-frame'} prompt in style {style!r}: prepare the "
                         f"data with that style (deepretrieval prepare --style {style})")
    missing = [k for k in ("task_input", "task_kind", "prompt_engine") if not isinstance(extra.get(k), str)]
    if missing:
        raise ValueError(f"row {extra.get('topic_id', '?')} was written without {', '.join(missing)} in "
                         f"extra_info (an older version): prepare the data again, with --style {style}")
    messages = prompt_messages(extra["task_kind"], extra["prompt_engine"], extra["task_input"], style)
    return dict(row, prompt=messages, extra_info=dict(extra, **style_info(style)))


def _reindex(rows: List[Row], split: str) -> List[Row]:
    out = []
    for i, row in enumerate(rows):
        row = dict(row)
        row["extra_info"] = dict(row["extra_info"], split=split, index=i)
        out.append(row)
    return out


def original_order(raw: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Raw LEADS rows in the order of the original files: by the number N of ids `<name>-N` when
    every row has one (the vendored files are reshuffled copies), else as given."""
    numbers = []
    for record in raw:
        head, _, tail = str(record.get("id", "")).rpartition("-")
        if not head or not tail.isdigit():
            return list(raw)
        numbers.append(int(tail))
    return [record for _, record in sorted(zip(numbers, raw), key=lambda pair: pair[0])]


def _val_from_test(test_rows: List[Row], val_size: int, seed: int) -> List[Row]:
    rng = random.Random(seed + 1)
    picked = sorted(rng.sample(range(len(test_rows)), min(val_size, len(test_rows))))
    return _reindex([test_rows[i] for i in picked], "val")


def _shuffled(items: List[Any], seed: int) -> List[Any]:
    items = list(items)
    random.Random(seed).shuffle(items)
    return items


def _limit(rows: List[Any], limit: Optional[int]) -> List[Any]:
    return rows if limit is None else rows[:limit]


# ---------------------------------------------------------------- LEADS PICO tasks (live engines)


# Where raw LEADS rows keep their relevant ids: the project's spelling, then the original
# DeepRetrieval's (publication_pmids; its trial files used trial_nctids).
TARGET_KEYS = ("targets", "publication_pmids", "trial_nctids")


def raw_targets(record: Dict[str, Any]) -> List[Any]:
    """The relevant ids of a raw LEADS row under the first of `TARGET_KEYS` it has (empty if none)."""
    for key in TARGET_KEYS:
        value = record.get(key)
        if value:
            return list(value) if not isinstance(value, str) else [value]
    return []


def leads_rows(
    raw: Iterable[Dict[str, Any]], data_source: str, split: str, style: str, engine: Optional[str] = None
) -> List[Row]:
    """LEADS raw rows `{"id", "pico": {P,I,C,O}, "targets": [...], "pub_date"}` (or the original's
    `{"pico", "publication_pmids", "pub_date"}`) -> verl rows."""
    task_kind = "pico_publication" if data_source == "pubmed" else "pico_trial"
    engine = engine or data_source
    format_pico = prompts.format_pico_original if style in prompts.RAW_FRAME_STYLES else prompts.format_pico
    rows, skipped = [], 0
    for record in raw:
        pico, targets = record.get("pico"), raw_targets(record)
        if not isinstance(pico, dict) or not targets:
            skipped += 1
            continue
        rows.append(
            make_row(
                data_source,
                task_kind,
                engine,
                format_pico(pico),
                {"target": [str(t) for t in targets]},
                split=split,
                index=len(rows),
                topic_id=str(record.get("id", len(rows))),
                style=style,
                pub_date=record.get("pub_date") or None,
            )
        )
    if skipped:
        logger.warning("%s/%s: skipped %d raw rows without PICO or targets", data_source, split, skipped)
    return rows


def _prepare_leads(
    data_source: str,
    default_train: Optional[str],
    default_test: str,
    input: Optional[str] = None,
    test_input: Optional[str] = None,
    seed: int = 42,
    val_size: int = 100,
    style: str = "reasoning",
    max_train: Optional[int] = None,
    max_test: Optional[int] = None,
    val_from: str = "sample",
    fold: int = 0,
    **_: Any,
) -> Dict[str, List[Row]]:
    if fold:
        raise ValueError(f"{data_source}: the LEADS tasks have fixed train and test files; folds "
                         "(fold != 0) exist for the local-corpus tasks (pubmed_mini, trials_sigir)")
    train_path = input or (str(data_root() / default_train) if default_train else None)
    test_path = test_input or str(data_root() / default_test)
    splits: Dict[str, List[Row]] = {}
    if train_path is None:
        logger.warning(
            "%s: no training split is vendored (LEADS publication training split); pass --input "
            "with it in the LEADS raw format. Writing test and val only.",
            data_source,
        )
    else:
        raw = _limit(_shuffled(read_jsonl(train_path), seed), max_train)
        splits["train"] = leads_rows(raw, data_source, "train", style)
    raw_test_all = read_jsonl(test_path)
    raw_test = _limit(_shuffled(raw_test_all, seed), max_test)
    splits["test"] = leads_rows(raw_test, data_source, "test", style)
    if val_from == "first":
        splits["val"] = leads_rows(original_order(raw_test_all)[:val_size], data_source, "val", style)
    elif val_from == "sample":
        splits["val"] = _val_from_test(splits["test"], val_size, seed)
    else:
        raise ValueError(f"val_from must be 'sample' or 'first', not {val_from!r}")
    return splits


def prepare_pubmed(**options: Any) -> Dict[str, List[Row]]:
    """LEADS publication search on live PubMed; searches restricted to records up to `pub_date`."""
    return _prepare_leads("pubmed", None, "leads/publication_test.jsonl", **options)


def prepare_ctgov(**options: Any) -> Dict[str, List[Row]]:
    """LEADS trial search on live ClinicalTrials.gov."""
    return _prepare_leads("ctgov", "leads/trial_train.jsonl", "leads/trial_test.jsonl", **options)


# ---------------------------------------------------------------- local-corpus tasks


def topic_folds(test_fraction: float) -> int:
    """How many folds `split_topics` offers: disjoint test blocks of `test_fraction` each (0.25 -> 4)."""
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must be between 0 and 1, got {test_fraction}")
    return max(1, int(1 / test_fraction + 1e-9))


def split_topics(topics: List[Dict[str, Any]], test_fraction: float, seed: int, fold: int = 0) -> Dict[str, str]:
    """Seeded topic split, stratified by collection: topic_id -> "train" | "test".

    Per collection the topic ids are shuffled with `seed` and cut into blocks of n_test =
    round(n * test_fraction) (at least 1; none for a collection of one topic); fold f tests block f,
    ids[f*n_test : (f+1)*n_test], and trains on the rest (ids that rounding leaves outside every
    block are always trained on). Fold 0 is the split every earlier run used; the folds' test topics
    are disjoint, so a setting chosen on one fold's test topics can be checked on another fold's,
    which it never saw."""
    folds = topic_folds(test_fraction)
    if not 0 <= fold < folds:
        raise ValueError(f"fold must be 0 to {folds - 1} with test_fraction {test_fraction}, got {fold}")
    by_collection: Dict[str, List[str]] = {}
    for topic in topics:
        by_collection.setdefault(str(topic.get("collection", "")), []).append(str(topic["topic_id"]))
    assignment = {}
    for collection in sorted(by_collection):
        ids = _shuffled(sorted(by_collection[collection]), seed)
        n_test = max(1, int(round(len(ids) * test_fraction))) if len(ids) > 1 else 0
        lo, hi = fold * n_test, (fold + 1) * n_test
        for i, topic_id in enumerate(ids):
            assignment[topic_id] = "test" if lo <= i < hi else "train"
    return assignment


TOPIC_VAL_FROM = ("sample", "train")  # val.parquet of a local-corpus task: a sample of test, or held-out train topics


def _prepare_topics(
    data_source: str,
    topics_file: str,
    to_row: Callable[[Dict[str, Any], str, int, str], Optional[Row]],
    input: Optional[str] = None,
    seed: int = 42,
    test_fraction: float = 0.25,
    val_size: int = 100,
    style: str = "reasoning",
    val_from: str = "sample",
    fold: int = 0,
    **_: Any,
) -> Dict[str, List[Row]]:
    if val_from not in TOPIC_VAL_FROM:
        raise ValueError(f"{data_source}: val_from={val_from!r} exists for the LEADS tasks (pubmed, ctgov) only; "
                         f"the local-corpus tasks take {' or '.join(map(repr, TOPIC_VAL_FROM))}")
    topics = read_jsonl(input or (data_root() / topics_file))
    assignment = split_topics(topics, test_fraction, seed, fold)
    splits: Dict[str, List[Row]] = {"train": [], "test": []}
    for topic in sorted(topics, key=lambda t: str(t["topic_id"])):
        split = assignment[str(topic["topic_id"])]
        row = to_row(topic, split, len(splits[split]), style)
        if row is None:
            logger.warning("%s: topic %s has no relevant documents, skipped", data_source, topic["topic_id"])
            continue
        splits[split].append(row)
    train = _shuffled(splits["train"], seed)
    if val_from == "train":  # held-out training topics: the first val_size of the seeded shuffle
        if not 1 <= val_size < len(train):
            raise ValueError(f"{data_source}: val_from='train' holds out 1 to {len(train) - 1} of the "
                             f"{len(train)} training topics, not {val_size}")
        splits["val"] = _reindex(train[:val_size], "val")
        splits["train"] = _reindex(train[val_size:], "train")
    else:
        splits["train"] = _reindex(train, "train")
        splits["val"] = _val_from_test(splits["test"], val_size, seed)
    return splits


def pubmed_mini_row(topic: Dict[str, Any], split: str, index: int, style: str) -> Optional[Row]:
    relevant = [str(p) for p in topic.get("relevant") or []]
    if not relevant:
        return None
    return make_row(
        "pubmed_mini",
        "review_question",
        "local",
        topic["title"],
        {"target": relevant},
        split=split,
        index=index,
        topic_id=topic["topic_id"],
        style=style,
        extra={"collection": topic.get("collection")},
    )


def trials_sigir_row(topic: Dict[str, Any], split: str, index: int, style: str) -> Optional[Row]:
    judgements = {str(k): int(v) for k, v in (topic.get("judgements") or {}).items()}
    judged = sorted(judgements)
    relevant = [doc for doc in judged if judgements[doc] >= 1]
    if not relevant:
        return None
    ground_truth = {"target": relevant, "judged": judged, "grades": [judgements[d] for d in judged]}
    return make_row(
        "trials_sigir",
        "patient_trials",
        "local_trials",
        topic["patient"],
        ground_truth,
        split=split,
        index=index,
        topic_id=topic["topic_id"],
        style=style,
        extra={"collection": topic.get("collection")},
    )


def prepare_pubmed_mini(**options: Any) -> Dict[str, List[Row]]:
    """Systematic-review question -> relevant PMIDs in the vendored PubMed subset (local engine)."""
    return _prepare_topics("pubmed_mini", "pubmed_mini/topics.jsonl", pubmed_mini_row, **options)


def prepare_trials_sigir(**options: Any) -> Dict[str, List[Row]]:
    """Patient case -> trials judged eligible (grade >= 1) in the vendored SIGIR 2016 collection."""
    return _prepare_topics("trials_sigir", "trials_sigir/topics.jsonl", trials_sigir_row, **options)


def judgements_from_ground_truth(ground_truth: Dict[str, Any]) -> Dict[str, int]:
    """The graded judgements of a trials_sigir row as {trial_id: grade}."""
    judged = ground_truth.get("judged")
    grades = ground_truth.get("grades")
    if judged is None or grades is None:
        return {str(t): 1 for t in ground_truth.get("target", [])}
    return {str(d): int(g) for d, g in zip(judged, grades)}


# ---------------------------------------------------------------- registry and writer


@dataclass(frozen=True)
class Task:
    name: str
    prepare: Callable[..., Dict[str, List[Row]]]
    engine: str
    description: str
    options: Dict[str, Any] = field(default_factory=dict)


TASKS: Dict[str, Task] = {
    "pubmed": Task("pubmed", prepare_pubmed, "pubmed", "LEADS PICO -> PubMed publications (live API)"),
    "ctgov": Task("ctgov", prepare_ctgov, "ctgov", "LEADS PICO -> ClinicalTrials.gov trials (live API)"),
    "pubmed_mini": Task("pubmed_mini", prepare_pubmed_mini, "local", "review question -> PMIDs (local index)"),
    "trials_sigir": Task("trials_sigir", prepare_trials_sigir, "local", "patient case -> trials (local index)"),
}


def build_splits(task: str, **options: Any) -> Dict[str, List[Row]]:
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; known: {', '.join(TASKS)}")
    return TASKS[task].prepare(**options)


def write_splits(splits: Dict[str, List[Row]], out_dir: "str | Path") -> Dict[str, Path]:
    import pandas as pd

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for split in SPLITS:
        if split not in splits:
            continue
        path = out / f"{split}.parquet"
        pd.DataFrame(splits[split]).to_parquet(path, index=False)
        paths[split] = path
    return paths


def prepare_task(task: str, out_dir: "str | Path", **options: Any) -> Dict[str, Path]:
    """Build the task's splits and write them as parquet under `out_dir`; returns split -> path."""
    splits = build_splits(task, **options)
    paths = write_splits(splits, out_dir)
    for split, path in paths.items():
        logger.info("%s %s: %d rows -> %s", task, split, len(splits[split]), path)
    return paths
