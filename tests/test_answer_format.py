"""One answer format (rewards.parsing.format_answer) and the task input carried in `extra_info`.

The prompt texts must not change by a byte (the quickstart's numbers reproduce from them): the
digests below were computed with `_digest` from the checkout before the answer format and the
compact prompt moved (commit f313196)."""

import hashlib
import json

import pytest

from deepretrieval.data import prompts, tasks
from deepretrieval.data.prompts import render_raw_text
from deepretrieval.rewards.parsing import ERROR_NONE, check_format, format_answer, parse_answer, parse_answer_strict


def _digest(rows):
    """sha256 over each row's stored prompt (JSON) and its raw-text rendering with the row's prefix."""
    h = hashlib.sha256()
    for r in rows:
        h.update(json.dumps(r["prompt"], ensure_ascii=False).encode())
        h.update(render_raw_text(r["prompt"], r["extra_info"]["assistant_prefix"]).encode())
    return h.hexdigest()


# (task, style) -> (rows, digest) of train + test + val, as written before the change (the LEADS
# tasks pubmed / ctgov with max_train=20, max_test=20, val_size=5, set by LEADS_OPTIONS)
BEFORE = {
    ("pubmed_mini", "reasoning"): (35, "9d493d937e852140f73b7e51a70c7d457fab246a91d509fbe3b114f0a1b62b24"),
    ("pubmed_mini", "reasoning_free"): (35, "6b49f56bfab4befcc0a47442fbc7a7249d5b2d732534581b980592e5d7a8e5c8"),
    ("pubmed_mini", "no_reason"): (35, "caa7c7f714925f51bed8ed48ae000f780ee10f4ea0005c34c6517df6cacb42c7"),
    ("trials_sigir", "reasoning"): (60, "cb7cf7119f4133501c8cf46ec4d351aa3f1ae61ac1ebf002e61db95b56ca5a8f"),
    ("trials_sigir", "reasoning_free"): (60, "b1f0c5796269f7c26b525d8781562d99876be2132b5ba46c316bc47e6810a8da"),
    ("trials_sigir", "no_reason"): (60, "a2b1171607efeb7cef79b2110461b4256deb5a9727e829e101fcd7f6b7ecb776"),
    ("pubmed", "reasoning"): (25, "cde94ada5ee5561d52c1f77910f39405001c8b0fc86fde5c4c072f66a1d89c4b"),
    ("pubmed", "reasoning_free"): (25, "c0bc29aac0e70408208b3cdc03d997cc4cc797acac77485dbccc42d5cffed6c5"),
    ("pubmed", "no_reason"): (25, "d159a0fc21acf28938b96d78c7ea299d7e37ca7c5e05a46e4acaf79b1aa05be8"),
    ("pubmed", "original"): (25, "e9060d60e1979a1d2b439d4337fdd21721b318ff6caff32c122d0565ec4a7eaa"),
    ("ctgov", "reasoning"): (45, "a619793fe6bf83a76d8b2e05370884b69af4dfb3776cd72fe2872fbf1c3d67c9"),
    ("ctgov", "reasoning_free"): (45, "465089def0c353319dba88f7a783e5607d52b41938ce65bc858be693176f4679"),
    ("ctgov", "no_reason"): (45, "7098d8c1d833ebc931c886cb20ab7f188af75a1f2eb07ff0595e00edfa6a38dd"),
    ("ctgov", "original"): (45, "c84fd009eff7eae297a66bdbbc7ecfc679bc837c1a71723b62249ad3c8998c72"),
}
LEADS_OPTIONS = {"max_train": 20, "max_test": 20, "val_size": 5}
# the quickstart's train + test rows (then: no_reason rows with the prompt replaced by its own text)
BEFORE_QUICKSTART = (28, "437696fe4105b1cc052e691926826fd1c2c9be26710c28dd90732026ffecb057")
FIRST_QUICKSTART_PROMPT = (
    "Write a PubMed search query that finds the studies for a systematic review. The engine accepts AND, OR, "
    "NOT, parentheses and \"quotes\"; words without an operator must all match. Reply only with <answer>"
    "{\"query\": \"...\"}</answer>.\n\nThe review question is:\nComparative effectiveness and safety of skeletal "
    "muscle relaxants"
)


def _all_rows(splits, names=("train", "test", "val")):
    return [r for name in names for r in splits.get(name, [])]


@pytest.mark.parametrize("task,style", sorted(BEFORE))
def test_task_prompts_are_byte_identical_to_before(task, style):
    options = LEADS_OPTIONS if task in ("pubmed", "ctgov") else {}
    rows = _all_rows(tasks.build_splits(task, style=style, **options))
    assert (len(rows), _digest(rows)) == BEFORE[(task, style)]


def test_compact_style_is_the_quickstart_prompt_byte_for_byte():
    rows = _all_rows(tasks.build_splits("pubmed_mini", style="compact"), ("train", "test"))
    assert (len(rows), _digest(rows)) == BEFORE_QUICKSTART
    assert rows[0]["prompt"] == [{"role": "user", "content": FIRST_QUICKSTART_PROMPT}]
    # patient cases have a compact instruction of their own (the CPU recipe's); the LEADS PICO tasks do not
    trial = tasks.build_splits("trials_sigir", style="compact")["test"][0]
    content = trial["prompt"][0]["content"]
    assert content.startswith("Write a search query that finds clinical trials this patient could join.")
    assert content.endswith("The patient case is:\n" + trial["extra_info"]["task_input"])
    assert trial["extra_info"]["prompt_style"] == "compact"
    with pytest.raises(ValueError, match="compact.*review_question, patient_trials"):
        prompts.build_user_content("pico_trial", "P: adults", "ctgov", style="compact")


def test_instruction_answer_examples_are_the_old_literals():
    assert prompts.ANSWER_FORMAT_REASONING.endswith(
        "for example:\n<think>\n[thinking process]\n</think>\n<answer>\n{\n    \"query\": \"....\"\n}\n</answer>")
    assert prompts.ANSWER_FORMAT_NO_REASON.endswith(
        "without any explanation, for example:\n<answer>\n{\n    \"query\": \"....\"\n}\n</answer>")


def test_format_answer_layouts():
    q = 'a "b" é'
    assert format_answer(q) == '<answer>{"query": "a \\"b\\" é"}</answer>'
    assert format_answer(q, lines=True) == '<answer>\n{"query": "a \\"b\\" é"}\n</answer>'
    assert format_answer(q, thinking="A reference search for this need.", lines=True) == (
        '<think>\nA reference search for this need.\n</think>\n<answer>\n{"query": "a \\"b\\" é"}\n</answer>')
    assert format_answer("x", thinking="t") == '<think>t</think><answer>{"query": "x"}</answer>'
    assert format_answer("x", lines=True, indent=2) == '<answer>\n{\n  "query": "x"\n}\n</answer>'


@pytest.mark.parametrize("query", ["aspirin", 'a OR "b c"', "ünïcode AND (x OR y)", "back\\slash", "tab\there"])
@pytest.mark.parametrize("layout", [{}, {"lines": True}, {"lines": True, "indent": 4}, {"thinking": "plan"}])
def test_format_answer_reads_back_with_both_parsers(query, layout):
    text = format_answer(query, **layout)
    for parse in (parse_answer, parse_answer_strict):
        parsed = parse(text)
        assert (parsed.error, parsed.query) == (ERROR_NONE, query)
    assert check_format(text, reasoning="thinking" in layout)[0]


def test_few_shot_turn_bytes_unchanged():
    from deepretrieval.eval.baselines import example_answer

    assert example_answer('a "b" é') == (
        '<think>\nA reference search for this need.\n</think>\n<answer>\n{"query": "a \\"b\\" é"}\n</answer>')
    assert example_answer('a "b" é', reasoning=False) == '<answer>\n{"query": "a \\"b\\" é"}\n</answer>'


# ------------------------------------------------------------------------ the task input in extra_info


def test_rows_store_their_task_input_and_readers_use_it():
    row = tasks.build_splits("pubmed_mini", style="reasoning")["test"][0]
    extra = row["extra_info"]
    assert extra["task_kind"] == "review_question" and extra["prompt_engine"] == "local"
    assert row["prompt"][0]["content"].endswith("\n" + extra["task_input"].strip())
    assert tasks.row_task_input(row) == extra["task_input"].strip()
    # the stored input wins over the prompt text (nothing is cut back out of a prompt)
    changed = dict(row, extra_info=dict(extra, task_input="  stored need  "))
    assert tasks.row_task_input(changed) == "stored need"
    # an older row without it: the legacy marker split, which finds the same text
    legacy = dict(row, extra_info={k: v for k, v in extra.items() if k != "task_input"})
    assert tasks.row_task_input(legacy) == extra["task_input"].strip()
    assert tasks.row_task_input({"prompt": "no marker at all  "}) == "no marker at all"


def test_pico_rows_of_the_original_style_keep_the_pico_only():
    row = tasks.build_splits("pubmed", style="original", max_train=1, max_test=1, val_size=1)["test"][0]
    need = tasks.row_task_input(row)
    assert need.startswith("P: ") and need.splitlines()[-1].startswith("O: ") and "Assistant" not in need
    # the legacy split of the same prompt carried the assistant turn along
    assert "Assistant: Let me solve" in prompts.legacy_task_input_from_prompt(row["prompt"])


def test_task_input_survives_parquet(tmp_path):
    import pandas as pd

    from deepretrieval.data.dataset import plain_python

    splits = tasks.build_splits("trials_sigir", style="no_reason")
    paths = tasks.write_splits(splits, tmp_path)
    back = [plain_python(r) for r in pd.read_parquet(paths["test"]).to_dict(orient="records")]
    assert [tasks.row_task_input(r) for r in back] == [r["extra_info"]["task_input"].strip() for r in splits["test"]]
    assert isinstance(back[0]["extra_info"], dict)


def test_restyle_row():
    full = tasks.build_splits("pubmed_mini", style="reasoning")["test"]
    compact = tasks.build_splits("pubmed_mini", style="compact")["test"]
    for a, b in zip(full, compact):
        assert tasks.restyle_row(a, "compact") == b
        assert tasks.restyle_row(b, "reasoning") == a
    assert tasks.restyle_row(full[0], "reasoning") is full[0]
    with pytest.raises(ValueError, match="unknown prompt style"):
        tasks.restyle_row(full[0], "chatty")
    with pytest.raises(ValueError, match="prepare the data with that style"):
        tasks.restyle_row(full[0], "original")
    old = dict(full[0], extra_info={k: v for k, v in full[0]["extra_info"].items() if k != "task_kind"})
    with pytest.raises(ValueError, match="without task_kind"):
        tasks.restyle_row(old, "compact")


def test_style_reasons_and_the_reward_reads_compact_rows_as_answer_only():
    from deepretrieval.rewards.literature import prepare_sample, resolve_config

    assert prompts.style_reasons({"prompt_style": "compact"}) is False
    assert prompts.style_reasons({"prompt_style": "no_reason"}) is False
    assert prompts.style_reasons({"prompt_style": "reasoning_free"}) is True
    assert prompts.style_reasons({"prompt_style": "some_future_style"}) is True
    assert prompts.style_reasons(None) is True
    cfg = resolve_config(None)
    ok = {}
    for style in ("compact", "reasoning_free"):
        row = tasks.build_splits("pubmed_mini", style=style)["test"][0]
        gt = row["reward_model"]["ground_truth"]
        ok[style] = prepare_sample("pubmed_mini", format_answer("x"), gt, row["extra_info"], cfg).format_ok
    assert ok == {"compact": True, "reasoning_free": False}  # an answer without <think> is the compact format
