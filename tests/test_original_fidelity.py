"""Fidelity to the original DeepRetrieval (pat-jj/DeepRetrieval, commit 2cb3e5d8): its prompt byte
for byte, its data files in, its strict answer reading, its recipe keys, and the switches the
reproduction uses (docs/original.md).

Fixtures (tests/fixtures/original/, from the original repository at that commit):
  prompt_rendering.json            the first row of its data/literature_mining/base/test.parquet:
                                   the PICO, and the prompt text its preprocessing wrote for it
  literature_test_head3.parquet    the first 3 rows of that parquet file, unchanged
"""

import json
import math
import os
import stat
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from deepretrieval.algorithms import core_algos
from deepretrieval.data import prompts, tasks
from deepretrieval.data.dataset import RLHFDataset, row_extra_info
from deepretrieval.rewards import literature
from deepretrieval.rewards.literature import RewardConfig, RewardConfigError, compute_score
from deepretrieval.search.base import SearchEngine, SearchResult
from deepretrieval.workers.config import ActorConfig, RolloutConfig, from_dict

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures" / "original"
RENDERING = json.loads((FIXTURES / "prompt_rendering.json").read_text(encoding="utf-8"))
ORIGINAL_PARQUET = FIXTURES / "literature_test_head3.parquet"


class RecordingEngine(SearchEngine):
    """Returns fixed ids for any query; records (query, k, filters)."""

    name = "recording"

    def __init__(self, ids):
        self.ids = list(ids)
        self.calls = []

    def search(self, query, k=100, **filters):
        self.calls.append((query, k, dict(filters)))
        return SearchResult(ids=self.ids[:k], total=len(self.ids), query=query, engine=self.name, k=k)


# ---------------------------------------------------------------- prompt, byte for byte


def test_original_prompt_is_byte_for_byte_the_original_rendering():
    text = prompts.build_original_prompt(prompts.format_pico_original(RENDERING["pico"]))
    assert prompts.format_pico_original(RENDERING["pico"]) == RENDERING["input"]
    assert text.encode("utf-8") == RENDERING["prompt_content"].encode("utf-8")
    # the frame the issue names: User: turn with the PICO, then the opened assistant turn
    assert "User: The research is defined by the following PICO:\nP: " in text
    assert text.endswith("\nAssistant: Let me solve this step by step. \n<think>\n")
    assert "search URL to find relevant literature on PubMed or ClinicalTrials.gov" in text
    assert "Note: The query should use Boolean operators (AND, OR) and parentheses" in text
    style = prompts.get_style("original")
    assert style.reasoning and style.think_in_prompt


def test_original_style_rows_and_dataset_feed_the_exact_text(tiny_tokenizer_dir):
    from transformers import AutoTokenizer

    raw = [{"pico": RENDERING["pico"], "publication_pmids": ["1", "2"], "pub_date": "2010/12/08"}]
    rows = tasks.leads_rows(raw, "pubmed", "train", "original")
    assert len(rows) == 1
    row = rows[0]
    assert row["prompt"] == [{"role": "user", "content": RENDERING["prompt_content"]}]
    assert row["extra_info"]["prompt_style"] == "original" and row["extra_info"]["think_in_prompt"] is True
    assert row["reward_model"]["ground_truth"] == {"target": ["1", "2"]}
    tokenizer = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    path = Path(tiny_tokenizer_dir).parent / "rows.parquet"
    pd.DataFrame(rows).to_parquet(path, index=False)
    ds = RLHFDataset(str(path), tokenizer, {"max_prompt_length": 1024})
    # no chat template (the tokenizer has one), no prefix added: the stored text as it is
    assert tokenizer.chat_template
    assert ds.render(ds.rows[0]) == RENDERING["prompt_content"]
    item = ds[0]
    ids = item["input_ids"][item["attention_mask"].bool()].tolist()
    assert ids == tokenizer(RENDERING["prompt_content"], add_special_tokens=False)["input_ids"]


def test_original_style_is_for_pico_tasks_only():
    with pytest.raises(ValueError, match="PICO tasks"):
        tasks.make_row("pubmed_mini", "review_question", "local", "q", {"target": ["1"]}, "train", 0, "t", "original")


@pytest.fixture
def tiny_tokenizer_dir(tmp_path):
    from deepretrieval.models.tiny import load_tiny_tokenizer

    out = tmp_path / "tok"
    load_tiny_tokenizer().save_pretrained(str(out))
    return str(out)


# ---------------------------------------------------------------- original data files in


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def _run_preprocess(argv):
    sys.path.insert(0, str(ROOT / "examples" / "data_preprocess"))
    try:
        import literature_mining  # examples/data_preprocess/literature_mining.py, the repository's own script
    finally:
        sys.path.pop(0)
    return literature_mining.main(argv)


def test_original_raw_rows_through_literature_mining(tmp_path):
    picos = [{"P": f"p{i}", "I": f"i{i}", "C": f"c{i}", "O": f"o{i}"} for i in range(5)]
    train = [{"pico": p, "publication_pmids": [str(100 + i), str(200 + i)], "pub_date": "2001/02/03"}
             for i, p in enumerate(picos)]
    test = [{"pico": p, "publication_pmids": [str(300 + i)], "pub_date": "1999/01/01"} for i, p in enumerate(picos)]
    _write_jsonl(tmp_path / "train.jsonl", train)
    _write_jsonl(tmp_path / "test.jsonl", test)
    out = tmp_path / "out"
    assert _run_preprocess(["--task", "pubmed", "--input", str(tmp_path / "train.jsonl"),
                            "--test-input", str(tmp_path / "test.jsonl"), "--out", str(out)]) == 0
    frame = pd.read_parquet(out / "train.parquet")
    assert len(frame) == 5  # was 0 ("skipped ... without PICO or targets")
    targets = sorted(tuple(gt["ground_truth"]["target"]) for gt in frame["reward_model"])
    assert targets == [(str(100 + i), str(200 + i)) for i in range(5)]
    assert set(e["pub_date"] for e in frame["extra_info"]) == {"2001/02/03"}


def test_reproduce_original_writes_original_prompt_and_first_rows_as_val(tmp_path):
    # ids numbered as in the vendored LEADS file, written out of order: val follows the numbers
    test = [{"id": f"publication_test-{n}", "pico": {"P": f"p{n}", "I": "i", "C": "c", "O": "o"},
             "targets": [str(n)], "pub_date": "2000/01/01"} for n in (3, 0, 4, 1, 2)]
    _write_jsonl(tmp_path / "test.jsonl", test)
    _write_jsonl(tmp_path / "train.jsonl", [{"pico": RENDERING["pico"], "publication_pmids": ["9"], "pub_date": "2010/12/08"}])
    out = tmp_path / "out"
    assert _run_preprocess(["--task", "pubmed", "--reproduce", "original", "--input", str(tmp_path / "train.jsonl"),
                            "--test-input", str(tmp_path / "test.jsonl"), "--out", str(out)]) == 0
    train = pd.read_parquet(out / "train.parquet")
    assert train["prompt"][0][0]["content"] == RENDERING["prompt_content"]
    val = pd.read_parquet(out / "val.parquet")
    # 101 requested, 5 available: all, in the original order
    assert [e["topic_id"] for e in val["extra_info"]] == [f"publication_test-{n}" for n in range(5)]
    assert [e["split"] for e in val["extra_info"]] == ["val"] * 5


def test_val_first_rows_of_the_vendored_test_split_are_the_originals():
    # the original validated on the first 101 lines of its test.jsonl; its test.parquet holds
    # those rows, and they are the vendored publication_test-0 .. -100 (docs/original.md)
    splits = tasks.build_splits("pubmed", val_from="first", val_size=101, style="original", max_test=3)
    ids = [r["extra_info"]["topic_id"] for r in splits["val"]]
    assert ids == [f"publication_test-{n}" for n in range(101)]
    assert len(splits["test"]) == 3  # max_test limits the test split, not the validation slice
    with pytest.raises(ValueError, match="val_from"):
        tasks.build_splits("pubmed", val_from="last", max_test=3)
    with pytest.raises(ValueError, match="LEADS tasks"):
        tasks.build_splits("pubmed_mini", val_from="first")


def test_original_parquet_is_read_and_routed_to_pubmed(tiny_tokenizer_dir):
    from transformers import AutoTokenizer

    frame = pd.read_parquet(ORIGINAL_PARQUET)
    assert set(frame["data_source"]) == {"literature"} and set(frame["ability"]) == {"literature_mining"}
    assert "pub_date" in frame.columns and "label" in frame.columns
    tokenizer = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    ds = RLHFDataset(str(ORIGINAL_PARQUET), tokenizer, {"max_prompt_length": 1024})
    item = ds[0]
    assert item["raw_prompt_text"] == RENDERING["prompt_content"]  # tokenised raw, as the original did
    assert item["data_source"] == "literature"
    assert item["extra_info"]["pub_date"] == "2010/12/08" == frame["pub_date"][0]
    assert item["extra_info"]["think_in_prompt"] is True

    engine = RecordingEngine(list(frame["label"][0]))
    literature.set_engine("pubmed", engine)
    try:
        response = "The PICO is about screening.\n</think>\n<answer>{\"query\": \"health examination\"}</answer>"
        result = compute_score("literature", response, item["reward_model"]["ground_truth"], item["extra_info"])
    finally:
        literature.set_engine("pubmed", None)
    # format +1, recall 1.0 -> +5; searched on the pubmed source with the row's date limit
    assert result["score"] == 6.0 and result["recall"] == 1.0 and result["format_ok"]
    assert engine.calls == [("health examination", 3000, {"max_date": "2010/12/08"})]


def test_literature_reads_pubmed_settings_and_original_format_check():
    cfg = RewardConfig.from_config({"pubmed": {"k": 9999}})
    src = cfg.source("literature")
    assert src.engine == "pubmed" and src.k == 9999 and src.use_pub_date and src.think_in_prompt is True
    # the original's check on `Assistant: Let me solve this step by step. \n<think>\n` + response:
    # a response that writes a second <think> fails, one that closes the prompt's passes
    engine = RecordingEngine(["1"])
    good = compute_score("literature", "x</think><answer>{\"query\": \"q\"}</answer>", {"target": ["1"]}, {},
                         config=cfg, engine=engine)
    bad = compute_score("literature", "<think>x</think><answer>{\"query\": \"q\"}</answer>", {"target": ["1"]}, {},
                        config=cfg, engine=engine)
    assert good["score"] == 6.0 and bad["score"] == -4.0 and bad["error"] == "format"


def test_row_extra_info_keeps_what_rows_already_say():
    row = {"data_source": "pubmed", "pub_date": "2001/01/01", "extra_info": {"pub_date": "2005/05/05"}, "prompt": []}
    assert row_extra_info(row)["pub_date"] == "2005/05/05"
    assert "prompt_style" not in row_extra_info(row)


# ---------------------------------------------------------------- strict JSON switch

STRICT = {"strict_json": True}
# answer classes of the issue: (block, lenient reads a query)
ANSWER_CLASSES = {
    "valid": ('{"query": "a AND b"}', True),
    "single_quotes": ("{'query': 'a AND b'}", True),
    "code_fence": ('```json\n{"query": "a AND b"}\n```', True),
    "trailing_comma": ('{"query": "a AND b",}', True),
    "text_around": ('Here it is: {"query": "a AND b"} done', True),
    "raw_newline_in_string": ('{"query": "a AND\nb"}', True),
    "raw_tab_in_string": ('{"query": "a AND\tb"}', True),
    "two_objects": ('{"query": "a AND b"} {"query": "c"}', True),
    "python_literal": ("{'query': 'a AND b', 'final': True}", True),
    "no_query_key": ('{"q": "a"}', False),
    "not_an_object": ('["a AND b"]', False),
    "query_not_string": ('{"query": 5}', False),
    "blank_query": ('{"query": "  "}', False),
}


def _strict_reference(block):
    """Independent reference: the original's calculate_answer_score path, minus the search."""
    try:
        data = json.loads(block.strip())
        query = data["query"]
    except Exception:
        return "error"
    if not isinstance(query, str) or not query.strip():
        return "error"  # the original sent it to PubMed, which rejected it: the except branch, -4
    return "search"


@pytest.mark.parametrize("name", sorted(ANSWER_CLASSES))
def test_strict_and_lenient_scores_of_the_answer_classes(name):
    block, lenient_reads = ANSWER_CLASSES[name]
    response = f"Think.\n</think>\n<answer>{block}</answer>"
    gt = {"target": ["1", "2"]}
    engine = RecordingEngine(["1", "2"])  # any searched query finds both: recall 1 -> +5
    info = {"think_in_prompt": True}
    strict = compute_score("pubmed", response, gt, info, config=STRICT, engine=engine)
    lenient = compute_score("pubmed", response, gt, info, config={}, engine=engine)
    # strict: the original's scores: +1 + 5 when json.loads reads a query, else +1 - 4
    expected_strict = 6.0 if _strict_reference(block) == "search" else -3.0
    assert strict["score"] == expected_strict
    assert (strict["score"] == 6.0) == (name == "valid")
    assert lenient["score"] == (6.0 if lenient_reads else -3.0)


def test_strict_blank_answer_block_scores_like_the_original():
    # the original skipped an empty answer (answer score 0): total = format +1; lenient: -4 -> -3
    response = "Think.\n</think>\n<answer>  </answer>"
    strict = compute_score("pubmed", response, {"target": ["1"]}, {"think_in_prompt": True}, config=STRICT,
                           engine=RecordingEngine(["1"]))
    lenient = compute_score("pubmed", response, {"target": ["1"]}, {"think_in_prompt": True}, config={},
                            engine=RecordingEngine(["1"]))
    assert (strict["score"], strict["error"]) == (1.0, "empty_answer")
    assert (lenient["score"], lenient["error"]) == (-3.0, "json")


def test_strict_switch_per_source_and_default_lenient():
    cfg = RewardConfig.from_config({"strict_json": True, "pubmed_mini": {"strict_json": False}})
    assert cfg.source("pubmed").strict_json and not cfg.source("pubmed_mini").strict_json
    assert not RewardConfig.from_config({}).source("pubmed").strict_json


# ---------------------------------------------------------------- no key silently ignored


def test_source_keys_at_top_level_take_effect():
    assert RewardConfig.from_config({"pubmed": {"k": 9999}}).source("pubmed").k == 9999
    assert RewardConfig.from_config({"sources": {"pubmed": {"k": 9999}}}).source("pubmed").k == 9999
    cfg = RewardConfig.from_config({"pubmed": {"sort": "none", "open_min_date": "1970/01/01"}})
    assert dict(cfg.source("pubmed").engine_options) == {"sort": "none", "open_min_date": "1970/01/01"}


@pytest.mark.parametrize(
    "section, key, accepted",
    [
        ({"k": 9999}, "reward.k", "reward.<source>.k"),
        ({"pubmed": {"kk": 9999}}, "reward.pubmed.kk", "open_min_date"),
        ({"sources": {"pubmed": {"sortt": "none"}}}, "reward.sources.pubmed.sortt", "sort"),
        ({"pubmedd": {"k": 9999}}, "reward.pubmedd.engine", "pubmed_mini"),
        ({"literature": {"k": 9999}}, "reward.literature", "reward.pubmed.<key>"),
        ({"format_scor": 2}, "reward.format_scor", "format_score"),
        ({"mini": {"engine": "local", "index_dirr": "x"}}, "reward.mini.index_dirr", "index_dir"),
    ],
)
def test_unknown_or_misplaced_reward_keys_name_key_and_spellings(section, key, accepted):
    with pytest.raises(RewardConfigError) as info:
        RewardConfig.from_config(section)
    assert info.value.key == key
    assert f"config key '{key}'" in str(info.value) and accepted in str(info.value)


def test_trainer_rejects_bad_reward_keys_and_ignored_compat_values():
    from deepretrieval.trainer.config import ConfigError, compose_config, validate_config

    base = ["data.train_files=x.parquet", "actor_rollout_ref.model.path=m", "trainer.n_gpus_per_node=1",
            "data.train_batch_size=8", "actor_rollout_ref.actor.ppo_mini_batch_size=4",
            "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=2", "critic.ppo_micro_batch_size_per_gpu=2",
            "trainer.device=cpu"]
    validate_config(compose_config(base + ["reward.pubmed.k=9999", "actor_rollout_ref.actor.clip_ratio_c=null"],
                                   validate=False))
    cases = [
        (["reward.pubmed.kk=9999"], "reward.pubmed.kk"),
        (["reward.k=9999"], "reward.k"),
        (["reward_model.reward_manager=prime"], "reward_model.reward_manager"),
        (["actor_rollout_ref.hybrid_engine=false"], "actor_rollout_ref.hybrid_engine"),
        (["trainer.max_critic_ckpt_to_keep=2"], "trainer.max_critic_ckpt_to_keep"),
        (["actor_rollout_ref.actor.clip_ratio_c=1.0"], "actor_rollout_ref.actor.clip_ratio_c"),
        (["critic.model.tokenizer_path=other"], "critic.model.tokenizer_path"),
        (["custom_reward_function.name=my_score"], "custom_reward_function.name"),
    ]
    for extra, key in cases:
        with pytest.raises(ConfigError) as info:
            validate_config(compose_config(base + extra, validate=False))
        assert info.value.key == key, (extra, info.value)
    with pytest.raises(ConfigError, match="did you mean 'actor_rollout_ref.actor.entropy_coeff'"):
        compose_config(base + ["actor_rollout_ref.rollout.entropy_coeff=0.001"], validate=False)


# ---------------------------------------------------------------- recipe keys


def _script_args(script, tmp_path, env=None):
    dump = tmp_path / "dump_args"
    dump.write_text("#!/bin/sh\nshift 2\nexec \"%s\" -c 'import json,sys; print(json.dumps(sys.argv[1:]))' \"$@\"\n"
                    % sys.executable)
    dump.chmod(dump.stat().st_mode | stat.S_IEXEC)
    import subprocess

    out = subprocess.run(["sh", str(ROOT / "code" / "scripts" / script)], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHON": str(dump), **(env or {})}, timeout=60)
    return json.loads(out.stdout)


def test_original_script_composes_the_original_recipe(tmp_path):
    from deepretrieval.trainer.config import (
        _check_compat_keys,
        _check_reward_section,
        _check_unknown,
        compose_config,
        default_config,
    )

    cfg = compose_config(_script_args("literature_search_train_original.sh", tmp_path), validate=False)
    _check_unknown(cfg, default_config())
    _check_reward_section(cfg)
    _check_compat_keys(cfg)
    actor = cfg.actor_rollout_ref.actor
    expected = {
        # from the original script
        "data.train_batch_size": 64, "data.val_batch_size": 64, "data.max_prompt_length": 500,
        "data.max_response_length": 500, "actor_rollout_ref.actor.optim.lr": 1e-6,
        "actor_rollout_ref.actor.ppo_mini_batch_size": 16, "actor_rollout_ref.actor.ppo_micro_batch_size": 8,
        "critic.ppo_micro_batch_size": 8, "actor_rollout_ref.rollout.log_prob_micro_batch_size": 2,
        "actor_rollout_ref.rollout.tensor_model_parallel_size": 2,
        "actor_rollout_ref.rollout.gpu_memory_utilization": 0.2,
        "actor_rollout_ref.ref.log_prob_micro_batch_size": 2, "actor_rollout_ref.ref.fsdp_config.param_offload": True,
        "actor_rollout_ref.model.enable_gradient_checkpointing": True, "critic.model.enable_gradient_checkpointing": True,
        "critic.optim.lr": 1e-5, "algorithm.kl_ctrl.kl_coef": 0.001, "trainer.val_before_train": False,
        "trainer.n_gpus_per_node": 2, "trainer.save_freq": 50, "trainer.test_freq": 200,
        "trainer.total_epochs": 15, "trainer.project_name": "literature_search",
        "actor_rollout_ref.model.path": "Qwen/Qwen2.5-3B-Instruct", "critic.model.path": "Qwen/Qwen2.5-3B-Instruct",
        # from the original verl config defaults
        "actor_rollout_ref.actor.entropy_coeff": 0.001, "actor_rollout_ref.actor.clip_ratio": 0.2,
        "actor_rollout_ref.actor.clip_ratio_c": None, "actor_rollout_ref.actor.grad_clip": 1.0,
        "actor_rollout_ref.actor.use_kl_loss": False, "actor_rollout_ref.actor.ppo_epochs": 1,
        "actor_rollout_ref.rollout.n": 1, "actor_rollout_ref.rollout.temperature": 1.0,
        "actor_rollout_ref.rollout.name": "vllm", "critic.cliprange_value": 0.5, "algorithm.gamma": 1.0,
        "algorithm.lam": 1.0, "algorithm.adv_estimator": "gae", "algorithm.kl_penalty": "kl",
        "algorithm.use_kl_in_reward": True,
        # the original reward: strict json.loads, all results up to 9,999, no sort, floor 1970/01/01
        "reward.strict_json": True, "reward.pubmed.k": 9999, "reward.pubmed.sort": "none",
        "reward.pubmed.open_min_date": "1970/01/01",
    }
    from omegaconf import OmegaConf

    got = {key: OmegaConf.select(cfg, key) for key in expected}
    assert got == expected
    assert actor.optim.warmup_style == "constant" and actor.optim.lr_warmup_steps_ratio == 0.0
    assert cfg.data.val_files.endswith("val.parquet")
    stage2 = compose_config(_script_args("literature_search_train_original.sh", tmp_path,
                                         {"RECALL_K": "3000", "TOTAL_EPOCHS": "17"}), validate=False)
    assert stage2.reward.pubmed.k == 3000 and stage2.trainer.total_epochs == 17
    source = RewardConfig.from_config(OmegaConf.to_container(cfg.reward)).source("literature")
    assert (source.k, source.strict_json, source.think_in_prompt) == (9999, True, True)


def test_project_script_has_the_original_entropy_bonus(tmp_path):
    from deepretrieval.trainer.config import compose_config

    cfg = compose_config(_script_args("literature_search_train.sh", tmp_path), validate=False)
    assert cfg.actor_rollout_ref.actor.entropy_coeff == 0.001


# ---------------------------------------------------------------- dual clip


def test_dual_clip_by_hand_and_switched_off():
    # tokens: (A, rho) = (-1, 5.0), (-1, 0.5), (+1, 2.0); eps 0.2, c = 3
    adv = torch.tensor([[-1.0, -1.0, 1.0]])
    old = torch.zeros(1, 3)
    new = torch.log(torch.tensor([[5.0, 0.5, 2.0]]))
    mask = torch.ones(1, 3)
    # L^clip = max(-A rho, -A clip(rho)): 5, 0.8, -1.2; dual clip caps the first at -A c = 3
    loss_c, clipfrac, _, lower = core_algos.compute_policy_loss(old, new, adv, mask, cliprange=0.2, clip_ratio_c=3.0)
    loss_n, clipfrac_n, _, lower_n = core_algos.compute_policy_loss(old, new, adv, mask, cliprange=0.2,
                                                                     clip_ratio_c=None)
    assert math.isclose(loss_c.item(), (3.0 + 0.8 - 1.2) / 3, rel_tol=1e-5)
    assert math.isclose(loss_n.item(), (5.0 + 0.8 - 1.2) / 3, rel_tol=1e-5)
    assert math.isclose(clipfrac.item(), 2 / 3, rel_tol=1e-6) and math.isclose(clipfrac_n.item(), 2 / 3, rel_tol=1e-6)
    assert math.isclose(lower.item(), 1 / 3, rel_tol=1e-6) and lower_n.item() == 0.0
    with pytest.raises(ValueError, match="None to disable"):
        core_algos.compute_policy_loss(old, new, adv, mask, clip_ratio_c=1.0)


@pytest.mark.usefixtures("single_thread")
def test_actor_reads_null_clip_ratio_c_as_off(tok, monkeypatch):
    from deepretrieval.models.tiny import make_prompt_batch, make_tiny_qwen2
    from deepretrieval.workers import actor as actor_module
    from deepretrieval.workers.rollout import HFRollout

    seen = []
    real = core_algos.compute_policy_loss

    def spy(*args, **kwargs):
        seen.append(kwargs.get("clip_ratio_c"))
        return real(*args, **kwargs)

    monkeypatch.setitem(core_algos.POLICY_LOSSES, "vanilla", spy)  # the actor takes its loss from the registry
    model = make_tiny_qwen2(tok, hidden_size=32, seed=4)
    batch = HFRollout(model, tok, from_dict(RolloutConfig, {"response_length": 3, "n": 1})).generate_sequences(
        make_prompt_batch(tok, ["asthma", "stroke"], meta_info={"seed": 0}))
    for value, expected in ((None, None), (5, 5.0), ("absent", 3.0)):
        cfg = {"ppo_mini_batch_size": 2, "ppo_micro_batch_size_per_gpu": 2, "optim": {"lr": 1e-4}}
        if value != "absent":
            cfg["clip_ratio_c"] = value
        actor = actor_module.Actor(model, from_dict(ActorConfig, cfg))
        b = batch.clone()
        b.batch["old_log_probs"], _ = actor.compute_log_prob(b)
        b.batch["advantages"] = -torch.ones_like(b.batch["old_log_probs"])
        actor.update_policy(b)
        assert seen[-1] == expected


# ---------------------------------------------------------------- PubMed: sort and date floor


def test_pubmed_sort_none_and_date_floor_in_the_request(tmp_path):
    from deepretrieval.search.fakes import FakeAnswer, FakePubMedServer
    from deepretrieval.search.pubmed import PubMedSearchEngine

    with FakePubMedServer(answers={"asthma": FakeAnswer(ids=["1", "2"])}) as srv:
        options = dict(base_url=srv.url, cache=False, rate_limit=0, timeout=2.0, max_retries=1,
                       ratelimit_dir=tmp_path / "rl")
        original = PubMedSearchEngine(sort="none", open_min_date="1970/01/01", **options)
        default = PubMedSearchEngine(**options)
        try:
            original.search("asthma", k=10, max_date="2010/12/08")
            default.search("asthma", k=10, max_date="2010/12/08")
        finally:
            original.close()
            default.close()
        first, second = srv.requests[0].params, srv.requests[1].params
    assert "sort" not in first and (first["mindate"], first["maxdate"]) == ("1970/01/01", "2010/12/08")
    assert second["sort"] == "relevance" and second["mindate"] == "1000/01/01"
    with pytest.raises(ValueError):
        PubMedSearchEngine(open_min_date="yesterday", cache=False, ratelimit_dir=tmp_path / "rl")


# ---------------------------------------------------------------- evaluation: both means


def test_report_gives_both_means_and_says_which():
    from deepretrieval.eval.report import markdown_table, summarize

    def rec(topic, recall, error="none"):
        return {"task": "pubmed", "method": "m", "k": 3000, "topic_id": topic, "error": error,
                "metrics": {"recall@3000": recall}}

    records = [rec("a", 1.0), rec("b", 0.5), rec("c", 0.0, "json")]
    (summary,) = summarize(records, n_resamples=50)
    assert math.isclose(summary["metrics"]["recall@3000"]["mean"], 0.5)  # failure counted as 0
    assert math.isclose(summary["metrics"]["recall@3000/parsed_only"]["mean"], 0.75)  # left out (original)
    assert summary["metrics"]["recall@3000/parsed_only"]["n"] == 2 and summary["n_parse_failures"] == 1
    table = markdown_table([summary])
    assert "0.500" in table and "parsed only 0.750" in table and "as the original DeepRetrieval evaluation did" in table
    (clean,) = summarize([rec("a", 1.0), rec("b", 0.5)], n_resamples=50)
    assert "parsed only" not in markdown_table([clean])
