"""Prompt templates for the literature-search tasks, in one place.

A prompt is stored as chat messages (verl's `prompt` column) plus an *assistant prefix*: text the
model's turn starts with. The reasoning style prefixes `Let me solve this step by step.\\n<think>\\n`
(as the original DeepRetrieval prompts did), so the response starts mid-thought and the reward's
format check counts that `<think>` (`think_in_prompt`). The tokenizer's chat template is applied
when the dataset is loaded (`deepretrieval.data.dataset`); `render_raw_text` is the plain-text
rendering for base models without a chat template.

Styles:
  reasoning        think in <think>...</think>, answer in <answer>{"query": ...}</answer>; prompt opens <think>
  reasoning_free   same tags, but the model opens <think> itself (for templates that add their own turn text)
  no_reason        answer only: <answer>{"query": ...}</answer>
  compact          answer only, in a ~40-token instruction (the CPU recipes'; review questions and patient cases)
  expand           answer only, in a short instruction asking for terms to *add* to the input: the searched
                   query is the input's bag of words OR the answer (search.text.expanded_query; the reward
                   and evaluation read `expands` from the row's or the checkpoint's style)
  original         the original DeepRetrieval text and frame, byte for byte (`build_original_prompt`):
                   no chat template; one raw text of preamble, instruction, `User:` with the PICO,
                   then `Assistant: Let me solve this step by step. \n<think>\n`. Stored whole as
                   the single user message, as the original parquet did; the dataset feeds it to
                   the tokenizer as it is (`is_raw_frame`). See docs/original.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence

from deepretrieval.rewards.parsing import format_answer

Message = Dict[str, str]


@dataclass(frozen=True)
class PromptStyle:
    name: str
    reasoning: bool
    assistant_prefix: str
    expands: bool = False  # the answer is added to the input's bag of words (search.text.expanded_query)

    @property
    def think_in_prompt(self) -> bool:
        """Whether the prompt itself opens the `<think>` block the response must close."""
        return self.assistant_prefix.rstrip().endswith("<think>")


PROMPT_STYLES: Dict[str, PromptStyle] = {
    "reasoning": PromptStyle("reasoning", True, "Let me solve this step by step.\n<think>\n"),
    "reasoning_free": PromptStyle("reasoning_free", True, ""),
    "no_reason": PromptStyle("no_reason", False, ""),
    # the quickstart's short prompt (`COMPACT_INSTRUCTION`): answer block only, no engine syntax text
    "compact": PromptStyle("compact", False, ""),
    # the answer adds terms to the input (EXPAND_INSTRUCTION): searched as input words OR answer
    "expand": PromptStyle("expand", False, "", expands=True),
    # the prefix is already inside the stored text (see build_original_prompt); kept here so the
    # reward's format check knows the prompt opened <think>
    "original": PromptStyle("original", True, "Let me solve this step by step. \n<think>\n"),
}

# Styles whose stored prompt is the complete model input (no chat template, no prefix added).
RAW_FRAME_STYLES = ("original",)

BASE_PREAMBLE = (
    "A conversation between User and Assistant. The User asks a question, and the Assistant solves it. "
    "The Assistant first thinks about the reasoning process in the mind and then provides the User "
    "with the answer."
)

# What each engine accepts; the model is told the syntax of the engine that will run its query.
ENGINE_SYNTAX: Dict[str, str] = {
    "pubmed": (
        "The query is run on PubMed. Use PubMed Boolean syntax: the operators AND, OR, NOT (upper case, "
        'applied left to right, so group with parentheses), "double quotes" for exact phrases, optional '
        "field tags such as [Title/Abstract] or [MeSH Terms], and * for truncation."
    ),
    "ctgov": (
        "The query is run on ClinicalTrials.gov. Use its search syntax: the operators AND, OR, NOT "
        '(upper case), parentheses for grouping and "double quotes" for exact phrases.'
    ),
    "local": (
        "The query is run on a local search engine that accepts PubMed Boolean syntax: the operators "
        "AND, OR, NOT (upper case, applied left to right, so group with parentheses), "
        '"double quotes" for exact phrases, optional field tags [tiab], [ti], [ab] or [mh], and * for '
        "truncation. Terms joined without an operator must all match."
    ),
    # the trial collection holds description text only: no MeSH headings to tag
    "local_trials": (
        "The query is run on a local search engine over trial descriptions that accepts PubMed "
        "Boolean syntax: the operators AND, OR, NOT (upper case, applied left to right, so group with "
        'parentheses), "double quotes" for exact phrases and * for truncation. Terms joined without '
        "an operator must all match."
    ),
}

PICO_INTRO = (
    "The Assistant is a clinical specialist. He is conducting research and doing a medical literature "
    "review. His task is to create query terms for a search to find relevant {what} on {where}.\n\n"
    "The research is defined using the PICO framework:\n"
    "P: Patient, Problem or Population - Who or what is the research about?\n"
    "I: Intervention - What is the main intervention or exposure being considered?\n"
    "C: Comparison - What is the intervention being compared to?\n"
    "O: Outcome - What are the relevant outcomes or effects being measured?"
)

# task kind -> (instruction, how the input is introduced)
TASK_TEXT: Dict[str, Dict[str, str]] = {
    "pico_publication": {
        "instruction": PICO_INTRO.format(what="publications", where="PubMed"),
        "input_intro": "The research is defined by the following PICO:",
    },
    "pico_trial": {
        "instruction": PICO_INTRO.format(what="clinical trials", where="ClinicalTrials.gov"),
        "input_intro": "The research is defined by the following PICO:",
    },
    "review_question": {
        "instruction": (
            "The Assistant is a medical librarian preparing a systematic review. His task is to write "
            "a search query that finds, in a database of PubMed records (titles, abstracts and MeSH "
            "headings), all studies that the review should screen for the given review question."
        ),
        "input_intro": "The review question is:",
    },
    "patient_trials": {
        "instruction": (
            "The Assistant is a clinical research coordinator. His task is to write a search query that "
            "finds, in a collection of clinical trial descriptions, the trials a patient could be "
            "eligible for, given the patient's case description."
        ),
        "input_intro": "The patient case is:",
    },
}

# the example answers the prompts show, written by the reward's own writer (rewards.parsing)
_EXAMPLE_QUERY = "...."
ANSWER_FORMAT_REASONING = (
    "The Assistant should show his thinking process in <think> </think> tags. The Assistant should "
    "return the final answer in JSON format in <answer> </answer> tags, for example:\n"
    + format_answer(_EXAMPLE_QUERY, thinking="[thinking process]", lines=True, indent=4)
)
ANSWER_FORMAT_NO_REASON = (
    "The Assistant should return the final answer directly, in JSON format in <answer> </answer> tags, "
    "without any explanation, for example:\n" + format_answer(_EXAMPLE_QUERY, lines=True, indent=4)
)

_REPLY_ONLY = "Reply only with " + format_answer("...") + "."
_SYNTAX_SHORT = 'The engine accepts AND, OR, NOT, parentheses and "quotes"; words without an operator must all match.'

# The `compact` style's whole instruction, per task kind (the CPU recipes' prompt, ~100-270 tokens with
# the input: a 135M model asked for the answer block only); the two differ only in what is searched.
# It ends with the task's own input introduction, like the full prompt, so
# `legacy_task_input_from_prompt` reads both.
COMPACT_INSTRUCTION: Dict[str, str] = {
    "review_question": "Write a PubMed search query that finds the studies for a systematic review. "
                       + _SYNTAX_SHORT + " " + _REPLY_ONLY,
    "patient_trials": "Write a search query that finds clinical trials this patient could join. "
                      + _SYNTAX_SHORT + " " + _REPLY_ONLY,
}

# The `expand` style's whole instruction, per task kind: the answer is searched together with the input's
# words (search.text.expanded_query), so it asks for what to add, in the compact instruction's length.
# task kind -> (the input, what is searched for, what to add)
_EXPAND_PARTS = {
    "review_question": ("review question", "of the studies for the systematic review",
                        "key terms again to weigh them more, synonyms, related terms"),
    "patient_trials": ("patient case", "clinical trials this patient could join",
                       "the key conditions again to weigh them more, their medical names"),
}
EXPAND_INSTRUCTION: Dict[str, str] = {
    kind: (f"The search engine will look for this {need}'s words. Write search terms to add to them that find "
           f"more {target}: {what}. Join terms with OR. " + _REPLY_ONLY)
    for kind, (need, target, what) in _EXPAND_PARTS.items()
}
# the short styles: the whole instruction per task kind, before the input (no engine syntax text)
SHORT_INSTRUCTIONS: Dict[str, Dict[str, str]] = {"compact": COMPACT_INSTRUCTION, "expand": EXPAND_INSTRUCTION}


def get_style(style: str) -> PromptStyle:
    if style not in PROMPT_STYLES:
        raise ValueError(f"unknown prompt style {style!r}; known: {', '.join(PROMPT_STYLES)}")
    return PROMPT_STYLES[style]


def style_reasons(extra_info: Optional[Mapping[str, Any]]) -> bool:
    """Whether a row's prompt asked for reasoning (`<think>` before the answer): its
    `extra_info.prompt_style`'s; True for a row without a style or with one this version does not
    know (the original prompts asked for it)."""
    name = (extra_info or {}).get("prompt_style")
    return PROMPT_STYLES[name].reasoning if name in PROMPT_STYLES else True


def style_expands(extra_info: Optional[Mapping[str, Any]]) -> bool:
    """Whether a row's answer is searched added to its input (`extra_info.prompt_style`'s `expands`)."""
    name = (extra_info or {}).get("prompt_style")
    return PROMPT_STYLES[name].expands if name in PROMPT_STYLES else False


def legacy_task_input_from_prompt(messages: Sequence[Mapping[str, str]]) -> str:
    """The task input cut back out of a rendered prompt: the text after the last task input
    introduction in the last user turn (the whole turn, stripped, when it has none).

    For rows written before the task input was stored in `extra_info.task_input` (see
    `deepretrieval.data.tasks.row_task_input`), and for prompts known only as chat messages."""
    content = next((m["content"] for m in reversed(list(messages)) if m.get("role") == "user"), "")
    for text in TASK_TEXT.values():
        marker = text["input_intro"] + "\n"
        if marker in content:
            return content.rsplit(marker, 1)[1].strip()
    return content.strip()


def build_user_content(task_kind: str, task_input: str, engine: str, style: str = "reasoning") -> str:
    """The user turn: role and task, the engine's query syntax, the answer format, then the input."""
    if task_kind not in TASK_TEXT:
        raise ValueError(f"unknown task kind {task_kind!r}; known: {', '.join(TASK_TEXT)}")
    if engine not in ENGINE_SYNTAX:
        raise ValueError(f"unknown engine {engine!r} for prompts; known: {', '.join(ENGINE_SYNTAX)}")
    text = TASK_TEXT[task_kind]
    if style in SHORT_INSTRUCTIONS:
        instructions = SHORT_INSTRUCTIONS[style]
        if task_kind not in instructions:
            raise ValueError(f"prompt style {style!r} exists for the task kinds {', '.join(instructions)} "
                             f"only, not {task_kind!r}")
        return f"{instructions[task_kind]}\n\n{text['input_intro']}\n{task_input.strip()}"
    fmt = ANSWER_FORMAT_REASONING if get_style(style).reasoning else ANSWER_FORMAT_NO_REASON
    return (
        f"{text['instruction']}\n\n{ENGINE_SYNTAX[engine]}\n\n{fmt}\n\n"
        f"{text['input_intro']}\n{task_input.strip()}"
    )


def build_messages(task_kind: str, task_input: str, engine: str, style: str = "reasoning") -> List[Message]:
    """Chat messages stored in the parquet `prompt` column (one user turn, as the original)."""
    return [{"role": "user", "content": build_user_content(task_kind, task_input, engine, style)}]


def render_raw_text(messages: List[Message], assistant_prefix: str = "") -> str:
    """Plain-text conversation for base models: preamble, `Role: content` turns, then `Assistant: `."""
    parts = [BASE_PREAMBLE, ""]
    for message in messages:
        role = message["role"]
        if role == "system":
            parts.append(message["content"])
        else:
            parts.append(f"{role.capitalize()}: {message['content']}")
    return "\n".join(parts) + "\nAssistant: " + assistant_prefix


def format_pico(pico: Dict[str, Optional[str]]) -> str:
    """LEADS PICO dict -> the `P: ...\\nI: ...\\nC: ...\\nO: ...` input text."""
    return "\n".join(f"{key}: {(pico.get(key) or '').strip()}" for key in ("P", "I", "C", "O"))


# ------------------------------------------------------------------ the original DeepRetrieval text
# The wording below is the original's (pat-jj/DeepRetrieval, examples/data_preprocess/
# literature_mining.py, template_type "base"), kept byte for byte, trailing spaces included:
# tests/test_original_fidelity.py compares it with a rendering the original code produced.

ORIGINAL_INSTRUCTION = (
    "\nThe Assistant is a clinical specialist. He is conducting research and doing a medical literature "
    "review. His task is to create query terms for a search URL to find relevant literature on PubMed or "
    "ClinicalTrials.gov.\n\n"
    "The research is defined using the PICO framework:\n"
    "P: Patient, Problem or Population - Who or what is the research about?\n"
    "I: Intervention - What is the main intervention or exposure being considered?\n"
    "C: Comparison - What is the intervention being compared to?\n"
    "O: Outcome - What are the relevant outcomes or effects being measured?\n\n"
)
ORIGINAL_ANSWER_FORMAT = (
    "The Assistant should show his thinking process in <think> </think> tags. The Assistant should "
    "return the final answer in JSON format in <answer> </answer> tags, \nFor example:\n<think>\n"
    "[thinking process]\n</think>\n<answer>\n{\n    \"query\": \"....\"\n} \n</answer>. \n"
    "Note: The query should use Boolean operators (AND, OR) and parentheses for grouping terms "
    "appropriately.\n\n"
)
ORIGINAL_USER_INTRO = "User: The research is defined by the following PICO:\n"
ORIGINAL_ASSISTANT_TURN = "\nAssistant: " + PROMPT_STYLES["original"].assistant_prefix


def format_pico_original(pico: Dict[str, Optional[str]]) -> str:
    """The original's PICO text: `P: ...\\n` for P, I, C, O, values as they are (no stripping;
    a missing value prints as `None`, as the original's f-string did)."""
    return "".join(f"{key}: {pico.get(key)}\n" for key in ("P", "I", "C", "O"))


def build_original_prompt(pico_text: str) -> str:
    """The complete model input of the original DeepRetrieval publication-search prompt for a PICO
    text (`format_pico_original`): preamble, instruction, answer format, `User:` turn, then the
    opened assistant turn. Fed to the tokenizer as it is, without a chat template."""
    return (
        BASE_PREAMBLE + "\n" + ORIGINAL_INSTRUCTION + ORIGINAL_ANSWER_FORMAT + ORIGINAL_USER_INTRO
        + pico_text + ORIGINAL_ASSISTANT_TURN
    )


# `ability` of the rows written by the original DeepRetrieval preprocessing (every version: data
# source "literature" in the paper's code, "pubmed"/"ctgov" later); its dataset fed their prompt
# text to the tokenizer as it was (any chat-template tokens are written into the text).
ORIGINAL_ABILITY = "literature_mining"


def is_raw_frame(row: Dict[str, object]) -> bool:
    """Whether a parquet row's stored prompt is the complete model input (no chat template): rows of
    the `original` style, and rows written by the original DeepRetrieval preprocessing
    (`ability="literature_mining"`)."""
    extra = row.get("extra_info") or {}
    if isinstance(extra, dict) and extra.get("prompt_style") in RAW_FRAME_STYLES:
        return True
    return row.get("ability") == ORIGINAL_ABILITY
