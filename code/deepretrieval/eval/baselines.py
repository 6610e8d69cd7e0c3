"""Baseline query writers: the information need itself, the reference queries shipped with the
data, and prompts for LLMs behind an OpenAI-compatible endpoint.

How each baseline is issued (the local engine speaks PubMed syntax, where bare words are an
implicit AND; the measured BM25 figures these are compared with treat text as a bag of words,
so free text is turned into a bag of words joined with OR — ranking is then the engine's BM25 over
all the words, as in the BM25 runs):

  original          the information need as written: the review question (pubmed_mini), the
                    patient case (trials_sigir) as a bag of words joined with OR; for the PICO
                    tasks (live engines) each PICO field, in parentheses, joined with OR.
  expert_boolean    pubmed_mini CLEF topics: the review's expert search (a multi-line Ovid MEDLINE
                    or PubMed search history; the local engine's parser resolves its set
                    references and Ovid syntax) with limits the local corpus cannot evaluate
                    (humans, years) taken out — see `relax_expert_search`.
  expert_boolean_raw  the same search exactly as shipped.
  clinicians        trials_sigir: each clinician's queries for the topic as one bag of words (OR),
                    one query per clinician (A-D), scored like n samples: the mean is the average
                    clinician, best-of-4 the best one.
  clinicians_pooled trials_sigir: all clinicians' queries of the topic as one bag of words.
  gpt4_conditions   trials_sigir: GPT-4-turbo's condition list, conditions joined with OR (each
  gpt35_conditions  condition a bag of its words, so "Lung Neoplasms" matches either word).
  human_summary     trials_sigir: the human-written case summary as a bag of words (OR).

A builder returns None when the topic has no such reference (a Cohen topic has no expert search):
the runner counts the topic as not applicable instead of scoring it 0.

LLM prompting modes (`build_llm_messages`): `zero_shot` (the task prompt as trained on),
`few_shot` (k worked examples from *other* topics — reference queries, never the topic's own),
`icl` (the prompt plus query-writing guidance for the engine's syntax), `icl_few_shot` (both).
"""

from __future__ import annotations

import hashlib
import re
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence

from deepretrieval.rewards.parsing import format_answer
from deepretrieval.search.text import STOPWORDS, WORD, bag_of_words, or_query  # noqa: F401 (re-exported)

# ------------------------------------------------------------------------- free text -> OR query

def conditions_query(conditions: Sequence[str]) -> Optional[str]:
    """`(w11 OR w12) OR (w21 OR ...)`: a condition list joined with OR, each condition a bag of words."""
    parts = [or_query(c) for c in conditions or []]
    parts = [f"({p})" for p in parts if p]
    return " OR ".join(parts) if parts else None


def pico_or_query(pico: Mapping[str, str]) -> Optional[str]:
    """The original DeepRetrieval baseline for PICO tasks: `(P) OR (I) OR (C) OR (O)`, each field's
    words as written (implicit AND inside a field, as PubMed reads free text)."""
    parts = []
    for key in ("P", "I", "C", "O"):
        words = [w for w in WORD.findall(pico.get(key) or "") if w.lower() not in STOPWORDS]
        if words:
            parts.append("(" + " ".join(words) + ")")
    return " OR ".join(parts) if parts else None


# ------------------------------------------------------------------------- reference baselines


def _original(sample: Any) -> Optional[str]:
    if sample.pico:
        return pico_or_query(sample.pico)
    return or_query(sample.need_text)


_TOTAL_NOTE = re.compile(r"\s*Total references\s*=\s*\d+\s*$", re.I | re.M)
_LIMIT_LINE = re.compile(r"^\s*limit\s+#?(\d+)\b.*$", re.I)


def relax_expert_search(search: str) -> str:
    """An expert search with what the local corpus cannot evaluate taken out.

    - `Total references = N` notes pasted after a query line (not query text) are removed;
    - a final `limit N to humans / yr="..." / english` (and a chain of such final limits) becomes
      the set N: the vendored records have no publication dates or languages and the CLEF records
      no MeSH headings, so the limit would drop every record — while the relevant records passed
      it by construction (this search found them on PubMed), so dropping a final limit can only
      give back the recall the search has there. Limits used inside the search (`30 not 32`
      where 32 is `limit 31 to reviews`) are left to the engine: relaxing them would invert them.
    """
    lines = [ln for ln in _TOTAL_NOTE.sub("", search).splitlines() if ln.strip()]
    i = len(lines) - 1
    while i >= 0:
        m = _LIMIT_LINE.match(lines[i])
        if not m:
            break
        target = int(m.group(1))
        lines[i] = f"#{target}"
        if not 1 <= target <= i:  # a malformed reference: let the engine report it
            break
        i = target - 1
    return "\n".join(lines)


def _expert_raw(sample: Any) -> Optional[str]:
    # As shipped: the engine's parser (deepretrieval.search.query) reads multi-line Ovid and
    # PubMed search histories, set references included.
    search = (sample.topic or {}).get("boolean_query")
    return search if search and search.strip() else None


def _expert(sample: Any) -> Optional[str]:
    search = _expert_raw(sample)
    return relax_expert_search(search) if search else None


def _refs(sample: Any) -> Dict[str, Any]:
    return (sample.topic or {}).get("reference_queries") or {}


CLINICIANS = ("Clinician_A", "Clinician_B", "Clinician_C", "Clinician_D")
# reference_queries keys of the LLM-written condition lists: {"summary": str, "conditions": [str, ...]}
CONDITION_MODELS = {"gpt4_conditions": "gpt-4-turbo", "gpt35_conditions": "gpt-35-turbo"}


def _clinicians(sample: Any) -> List[Optional[str]]:
    """One query per clinician (all of that clinician's queries as one bag of words); a clinician
    who wrote nothing for the topic is a not-applicable slot."""
    refs = _refs(sample)
    return [or_query(" ".join(refs.get(name) or [])) if refs.get(name) else None for name in CLINICIANS]


def _clinicians_pooled(sample: Any) -> Optional[str]:
    texts = [q for name in CLINICIANS for q in (_refs(sample).get(name) or [])]
    return or_query(" ".join(texts)) if texts else None


def _conditions(model: str) -> Callable[[Any], Optional[str]]:
    def build(sample: Any) -> Optional[str]:
        entry = _refs(sample).get(model) or {}
        return conditions_query(entry.get("conditions") or []) if entry else None

    return build


def _human_summary(sample: Any) -> Optional[str]:
    text = _refs(sample).get("human_summary")
    return or_query(text) if text else None


# A builder returns one query, None (does not apply), or a list of queries: several reference
# writers per topic, scored like n samples (the mean is the average writer, best-of-n the best).
BASELINES: Dict[str, Callable[[Any], Any]] = {
    "original": _original,
    "expert_boolean": _expert,
    "expert_boolean_raw": _expert_raw,
    "clinicians": _clinicians,
    "clinicians_pooled": _clinicians_pooled,
    "gpt4_conditions": _conditions(CONDITION_MODELS["gpt4_conditions"]),
    "gpt35_conditions": _conditions(CONDITION_MODELS["gpt35_conditions"]),
    "human_summary": _human_summary,
}

# which baselines apply to which task (others would be all "not applicable")
TASK_BASELINES: Dict[str, List[str]] = {
    "pubmed_mini": ["original", "expert_boolean", "expert_boolean_raw"],
    "trials_sigir": ["original", "clinicians", "clinicians_pooled", "gpt4_conditions", "gpt35_conditions",
                     "human_summary"],
    "pubmed": ["original"],
    "ctgov": ["original"],
}


def baseline_slots(name: str) -> int:
    """How many queries per topic baseline `name` writes."""
    return len(CLINICIANS) if name == "clinicians" else 1


def baseline_query(name: str, sample: Any) -> Any:
    """The query baseline `name` issues for `sample` (a list for multi-writer baselines), or None
    if it does not apply."""
    if name not in BASELINES:
        raise ValueError(f"unknown baseline {name!r}; known: {', '.join(BASELINES)}")
    return BASELINES[name](sample)


# ------------------------------------------------------------------------- LLM prompting

PROMPT_MODES = ("zero_shot", "few_shot", "icl", "icl_few_shot")

# Query-writing guidance for the ICL modes, by engine: how to use the syntax well, beyond the
# syntax summary the task prompt already gives.
ICL_GUIDANCE: Dict[str, str] = {
    "pubmed_like": (
        "How to write a high-recall Boolean search:\n"
        "1. Split the information need into 2-3 key concepts (e.g. condition, intervention or test).\n"
        "2. For each concept list synonyms, abbreviations, spelling variants and the MeSH heading; "
        "join them with OR inside parentheses; use * to truncate word stems (diagnos*).\n"
        "3. Join the concept groups with AND. Do not add a concept for outcomes or study design "
        "unless it is essential: every AND loses relevant records.\n"
        "4. Quote multi-word phrases (\"proton pump inhibitor\"); upper-case AND, OR, NOT.\n"
        'Example: ("proton pump inhibitor*"[tiab] OR omeprazole[tiab] OR "Proton Pump Inhibitors"[mh]) '
        "AND (reflux[tiab] OR GERD[tiab] OR \"Gastroesophageal Reflux\"[mh])"
    ),
    "trials": (
        "How to write a high-recall trial search:\n"
        "1. List the patient's conditions and diagnoses, including likely underlying diseases, "
        "synonyms and broader disease names (e.g. \"non-small cell lung cancer\" OR \"lung cancer\").\n"
        "2. Join the conditions with OR; leave out age, sex and findings that every trial mentions.\n"
        "3. Quote multi-word phrases; upper-case OR, AND, NOT."
    ),
}


def _guidance_key(data_source: str) -> str:
    return "trials" if data_source in ("trials_sigir", "ctgov") else "pubmed_like"


def example_answer(query: str, reasoning: bool = True) -> str:
    """An assistant turn in the task's answer format (rewards.parsing: format_answer, parse_answer)."""
    return format_answer(query, thinking="A reference search for this need." if reasoning else None, lines=True)


def pick_examples(samples: Sequence[Any], exclude_topic: str, k: int, seed: int = 0) -> List[Any]:
    """k other topics with a reference query, chosen by a seeded hash (stable across runs)."""
    pool = [s for s in samples if s.topic_id != exclude_topic and s.example_query]
    pool.sort(key=lambda s: hashlib.sha256(f"{seed}:{exclude_topic}:{s.topic_id}".encode()).hexdigest())
    return pool[:k]


def build_llm_messages(
    sample: Any,
    mode: str,
    examples: Sequence[Any] = (),
    reasoning: bool = True,
) -> List[Dict[str, str]]:
    """Chat messages for prompting mode `mode` (see PROMPT_MODES)."""
    if mode not in PROMPT_MODES:
        raise ValueError(f"unknown prompting mode {mode!r}; known: {', '.join(PROMPT_MODES)}")
    base = [dict(m) for m in sample.prompt]
    messages: List[Dict[str, str]] = []
    if mode in ("icl", "icl_few_shot"):
        messages.append({"role": "system", "content": ICL_GUIDANCE[_guidance_key(sample.data_source)]})
    if mode in ("few_shot", "icl_few_shot"):
        for ex in examples:
            messages.extend(dict(m) for m in ex.prompt if m["role"] != "system")
            messages.append({"role": "assistant", "content": example_answer(ex.example_query, reasoning)})
    messages.extend(base)
    return messages
