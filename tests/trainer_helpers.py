"""Shared pieces of the end-to-end trainer tests: the tiny-model / pubmed_mini assets, the common
overrides, a scripted rollout, and readers of the metrics log and of exported weights."""

import json
import re
from pathlib import Path
from types import SimpleNamespace

# metrics that measure time or memory differ between runs by nature
NOISY = ("timing", "perf/", "timing_s/", "timing_per_token_ms/", "reward/search_time")


def make_assets(root, index):
    """A tiny Qwen2 folder and the pubmed_mini task as parquet under `root`; `index`: the local index."""
    from deepretrieval.data.tasks import prepare_task
    from deepretrieval.models.tiny import save_tiny_model

    paths = prepare_task("pubmed_mini", root / "data", seed=42, val_size=4)
    model = save_tiny_model(root / "model", hidden_size=64, num_layers=2)
    return SimpleNamespace(root=root, train=str(paths["train"]), val=str(paths["val"]), model=model, index=str(index))


def overrides(a, out_dir, **extra):
    """`key=value` arguments of a small CPU run (batch 4, n=2, 16 response tokens), `extra` last."""
    base = {
        "data.train_files": a.train, "data.val_files": a.val,
        "data.train_batch_size": 4, "data.max_prompt_length": 384, "data.max_response_length": 16,
        "actor_rollout_ref.model.path": a.model,
        "actor_rollout_ref.actor.ppo_mini_batch_size": 2,
        "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu": 2,
        "actor_rollout_ref.actor.optim.lr": 1e-3,
        "actor_rollout_ref.rollout.n": 2,
        "critic.ppo_micro_batch_size_per_gpu": 2, "critic.optim.lr": 1e-3,
        "reward.sources.pubmed_mini.index_dir": a.index,
        "trainer.device": "cpu", "trainer.logger": "[console,jsonl]",
        "trainer.default_local_dir": str(out_dir), "trainer.deterministic": True,
        "trainer.ray_init.num_cpus": 2, "trainer.ray_init.timeout_s": 120, "trainer.call_timeout_s": 300,
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


QUESTION_MARKER = "The review question is:"


def review_question(prompt_text):
    """The review question line of a pubmed_mini prompt."""
    return prompt_text.split(QUESTION_MARKER)[1].strip().splitlines()[0]


def words_query(question):
    """A query that ORs the question's words (operator words dropped): a search with a spread of recalls."""
    return " OR ".join(w for w in re.findall(r"[A-Za-z0-9]+", question) if w.lower() not in ("and", "or", "not"))


def scripted_rollout(tok, answers, record=None):
    """A replacement for `HFRollout.generate_sequences` (a tiny random model never writes a parsable answer).

    `answers(question)` gives the texts of the prompt's n samples (after `<think>`); each is tokenised with an
    EOS. The samples are interleaved like the real rollout's (`repeat(n, interleave=True)`). The batches it
    returns are appended to `record` when given."""
    import torch

    from deepretrieval.workers.rollout.base import build_rollout_batch

    def generate_sequences(self, prompts):
        texts = []
        for ids, mask in zip(prompts.batch["input_ids"], prompts.batch["attention_mask"]):
            texts.extend(answers(review_question(tok.decode(ids[mask.bool()], skip_special_tokens=True))))
        n = len(texts) // len(prompts)
        responses = torch.full((len(texts), self.response_length), self.pad_id, dtype=torch.long)
        for i, text in enumerate(texts):
            answer_ids = tok.encode(text, add_special_tokens=False) + [tok.eos_token_id]
            assert len(answer_ids) <= self.response_length, (len(answer_ids), text)
            responses[i, : len(answer_ids)] = torch.tensor(answer_ids)
        repeated = prompts.repeat(n, interleave=True) if n > 1 else prompts
        out = build_rollout_batch(repeated, responses, self.eos_ids, self.pad_id)
        out.meta_info.update({"temperature": 1.0, "do_sample": True})
        if record is not None:
            record.append(out)
        return out

    return generate_sequences


def read_metrics(out_dir, prefixes=("critic/", "actor/")):
    """(training rows by step, all rows) of a run's `logs/metrics.jsonl`."""
    rows = [json.loads(line) for line in open(Path(out_dir) / "logs" / "metrics.jsonl")]
    return {r["step"]: r for r in rows if any(k.startswith(tuple(prefixes)) for k in r)}, rows


def stable(row):
    return {k: v for k, v in row.items() if not k.startswith(NOISY)}


def hf_weights(folder):
    from safetensors.torch import load_file

    return load_file(str(Path(folder) / "model.safetensors"))
