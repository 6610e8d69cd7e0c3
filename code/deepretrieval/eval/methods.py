"""Query writers under evaluation: reference baselines, prompted LLMs and (trained) models.

A method turns samples (deepretrieval.eval.samples) into `Generation`s: n >= 1 per topic, each a
response text to parse, a query given directly, or a classified error.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from deepretrieval.data.prompts import get_style, style_reasons
from deepretrieval.eval import baselines
from deepretrieval.eval.samples import EvalSample
from deepretrieval.trainer.checkpoint import resolve_model_dir
from deepretrieval.workers.rollout.no_repeat import RULE as NO_REPEAT_RULE, ngram_size

logger = logging.getLogger(__name__)


@dataclass
class Generation:
    """One written query: a response `text` to parse, or a `query` given directly, or an error."""

    text: Optional[str] = None
    query: Optional[str] = None
    error: Optional[str] = None
    detail: str = ""
    not_applicable: bool = False
    # whether the prompt opened <think> for the model (None: the row's extra_info says); an API
    # chat model gets no assistant prefix, so it writes its own <think>
    think_in_prompt: Optional[bool] = None
    reasoning: Optional[bool] = None  # whether the prompt asked for <think> (None: the row's style says)
    expands: Optional[bool] = None  # whether the query is added to the input (None: the row's style says)


def split_reasoning(text: str) -> str:
    """The reasoning part of a response: everything before `</think>` (or before `<answer>`)."""
    for tag in ("</think>", "<answer>"):
        if tag in text:
            return text.split(tag, 1)[0].replace("<think>", "").strip()
    return ""


class QueryMethod:
    """A query writer under evaluation. Subclasses implement `generate` and `spec`."""

    name = "method"
    n = 1

    def spec(self) -> Dict[str, Any]:
        """Everything that changes the queries; part of the resume fingerprint."""
        return {"name": self.name}

    def generate(self, samples: Sequence[EvalSample]) -> List[List[Generation]]:
        raise NotImplementedError  # abstract


class BaselineMethod(QueryMethod):
    """A reference baseline from deepretrieval.eval.baselines (one deterministic query per topic)."""

    def __init__(self, baseline: str):
        if baseline not in baselines.BASELINES:
            raise ValueError(f"unknown baseline {baseline!r}; known: {', '.join(baselines.BASELINES)}")
        self.name = baseline
        self.n = baselines.baseline_slots(baseline)

    def spec(self) -> Dict[str, Any]:
        return {"name": self.name, "kind": "baseline", "version": 1}

    def generate(self, samples: Sequence[EvalSample]) -> List[List[Generation]]:
        out = []
        for s in samples:
            q = baselines.baseline_query(self.name, s)
            queries = q if isinstance(q, list) else [q]
            out.append([Generation(query=x) if x else Generation(not_applicable=True) for x in queries])
        return out


class LLMMethod(QueryMethod):
    """An LLM behind an OpenAI-compatible endpoint, prompted in one of baselines.PROMPT_MODES.

    Few-shot examples come from `pool` (the other topics of the same task; never the topic itself).
    """

    def __init__(
        self,
        client: Any,
        mode: str = "zero_shot",
        n: int = 1,
        temperature: Optional[float] = None,
        shots: int = 3,
        pool: Sequence[EvalSample] = (),
        seed: int = 0,
        name: Optional[str] = None,
    ):
        if mode not in baselines.PROMPT_MODES:
            raise ValueError(f"unknown prompting mode {mode!r}; known: {', '.join(baselines.PROMPT_MODES)}")
        self.client, self.mode, self.n, self.shots, self.seed = client, mode, n, shots, seed
        self.temperature = temperature if temperature is not None else (0.0 if n == 1 else 1.0)
        self.pool = list(pool)
        self.name = name or f"llm-{slug(client.model)}-{mode}"
        self._warned: set = set()

    def spec(self) -> Dict[str, Any]:
        return {
            "name": self.name, "kind": "llm", "model": self.client.model, "url": self.client.base_url,
            "mode": self.mode, "n": self.n, "temperature": self.temperature, "shots": self.shots,
            "seed": self.seed, "max_tokens": self.client.max_tokens,
        }

    def messages_for(self, sample: EvalSample) -> List[Dict[str, str]]:
        examples: List[EvalSample] = []
        if self.mode in ("few_shot", "icl_few_shot"):
            pool = [p for p in (self.pool or []) if p.label == sample.label]
            examples = baselines.pick_examples(pool, sample.topic_id, self.shots, self.seed)
            if len(examples) < self.shots and sample.task not in self._warned:
                self._warned.add(sample.task)
                logger.warning("%s: only %d few-shot examples with a reference query for task %s (wanted %d)",
                               self.name, len(examples), sample.task, self.shots)
        reasoning = style_reasons(sample.extra_info)
        return baselines.build_llm_messages(sample, self.mode, examples, reasoning=reasoning)

    def generate(self, samples: Sequence[EvalSample]) -> List[List[Generation]]:
        convs = [self.messages_for(s) for s in samples]
        results = self.client.complete_many(convs, n=self.n, temperature=self.temperature)
        out = []
        for r in results:
            if not r.ok:
                out.append([Generation(error=r.error, detail=r.message)] * self.n)
            else:
                gens = [Generation(text=t, think_in_prompt=False) for t in r.texts[: self.n]]
                # an endpoint that ignores `n` answers with fewer choices: the service's shortfall
                gens += [Generation(error="llm_bad_response", detail=f"{len(r.texts)} of {self.n} choices")] * (
                    self.n - len(gens))
                out.append(gens)
        return out


def slug(text: str) -> str:
    """A name safe in a file name (method names, record folders)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", str(text)).strip("_")[:80] or "model"


# ------------------------------------------------------------------------- trained models


def vllm_available() -> bool:
    try:
        import vllm  # noqa: F401  (only whether it imports)
    except Exception:  # not installed, or installed without a usable GPU runtime
        return False
    return True


class ModelMethod(QueryMethod):
    """A (trained) query writer: a HF model folder or trainer checkpoint, prompted with the task's
    own prompt (chat template + assistant prefix, exactly as in training: data.dataset.RLHFDataset).

    The prompt is the one the model was trained with: its `prompt.json` (written by the trainer,
    trainer.checkpoint) names the prompt style and the data settings that shape the input, and each
    sample's row is re-rendered in that style (data.tasks.restyle_row). `prompt_style` asks for a
    style explicitly; one that differs from the stored style is refused unless `force_prompt_style`
    (trainer.checkpoint.choose_prompt_style). Without either, the rows are used as prepared.

    Backends: `hf` generates with the trainer's rollout (workers.rollout.HFRollout) in batches on
    CPU or GPU; `vllm` uses vllm.LLM when the package is importable; `auto` picks vllm when
    importable and a GPU is present, else hf. Greedy (n=1, temperature 0) by default; n > 1 samples
    with `temperature`, and the report adds best-of-n next to the mean. `no_repeat_ngram_size` > 0 (hf
    only): the answer never repeats an n-gram of its own tokens (workers.rollout.no_repeat).
    """

    def __init__(
        self,
        model_path: "str | os.PathLike[str]",
        name: Optional[str] = None,
        backend: str = "auto",
        n: int = 1,
        temperature: float = 1.0,
        top_p: float = 1.0,
        max_new_tokens: int = 512,
        max_prompt_length: int = 1024,
        batch_size: int = 8,
        device: Optional[str] = None,
        dtype: str = "auto",
        seed: int = 0,
        prompt_style: Optional[str] = None,
        force_prompt_style: bool = False,
        no_repeat_ngram_size: int = 0,
    ):
        from deepretrieval.trainer.checkpoint import choose_prompt_style, read_prompt_settings

        self.model_dir = resolve_model_dir(model_path)
        self.prompt_settings = read_prompt_settings(self.model_dir) or {}
        self.prompt_style = choose_prompt_style(self.prompt_settings, prompt_style, force_prompt_style,
                                                model=str(model_path))
        if self.prompt_style is not None:
            get_style(self.prompt_style)  # an unknown style fails here, not at the first chunk
        self.name = name or slug(Path(model_path).name)
        self.n = max(1, int(n))
        self.temperature = float(temperature) if self.n > 1 else 0.0
        self.top_p, self.max_new_tokens, self.max_prompt_length = top_p, max_new_tokens, max_prompt_length
        self.batch_size, self.device, self.dtype, self.seed = batch_size, device, dtype, seed
        self.chunk_size = batch_size  # evaluate() saves records after every generation batch
        if backend == "auto":
            import torch

            backend = "vllm" if vllm_available() and torch.cuda.is_available() else "hf"
        if backend not in ("hf", "vllm"):
            raise ValueError(f"backend must be hf, vllm or auto, not {backend!r}")
        if backend == "vllm" and not vllm_available():
            raise RuntimeError("backend vllm requested but vllm is not importable; use --backend hf")
        self.no_repeat_ngram_size = ngram_size(no_repeat_ngram_size)
        if self.no_repeat_ngram_size and backend == "vllm":
            raise ValueError("no_repeat_ngram_size is offered by the hf backend only (workers.rollout.no_repeat); "
                             "use --backend hf")
        self.backend = backend
        self._model = self._tokenizer = self._llm = None

    def trained_rendering(self) -> Dict[str, Any]:
        """The chat-template switch and assistant-prefix override the model was trained with
        (prompt.json; those it sets)."""
        return {k: self.prompt_settings[k] for k in ("apply_chat_template", "assistant_prefix")
                if self.prompt_settings.get(k) is not None}

    def spec(self) -> Dict[str, Any]:
        from deepretrieval.data.dataset import DEFAULTS

        weights = sorted(self.model_dir.glob("*.safetensors")) or sorted(self.model_dir.glob("*.bin"))
        stamp = [(p.name, p.stat().st_size, int(p.stat().st_mtime)) for p in weights]
        # only settings that render otherwise than the dataset's defaults: a model trained with the
        # defaults (the quickstart's) keeps the spec, and so the records, it had before they counted
        rendering = {k: v for k, v in self.trained_rendering().items() if v != DEFAULTS[k]}
        return {
            "name": self.name, "kind": "model", "path": str(self.model_dir.resolve()), "weights": stamp,
            "n": self.n, "temperature": self.temperature, "top_p": self.top_p,
            "max_new_tokens": self.max_new_tokens, "seed": self.seed,
            **({"prompt_style": self.prompt_style} if self.prompt_style is not None else {}),
            **({"no_repeat_ngram_size": self.no_repeat_ngram_size, "no_repeat_rule": NO_REPEAT_RULE}
               if self.no_repeat_ngram_size else {}),
            **rendering,
        }

    # -- loading ---------------------------------------------------------------------------
    def _load_hf(self) -> None:
        import torch
        from transformers import AutoModelForCausalLM

        from deepretrieval.models.tokenizer import load_tokenizer

        device = self.device or ("cuda" if torch.cuda.is_available() else "cpu")
        tok = load_tokenizer(self.model_dir, padding_side="left")
        dtype = {"auto": (torch.bfloat16 if device.startswith("cuda") else torch.float32),
                 "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[self.dtype]
        model = AutoModelForCausalLM.from_pretrained(str(self.model_dir), dtype=dtype)
        model.to(device).eval()
        self._model, self._tokenizer = model, tok

    def _dataset(self, samples: Sequence[EvalSample], tokenizer: Any) -> Any:
        """The task prompts rendered and tokenised exactly as the trainer does."""
        import tempfile

        import pandas as pd

        from deepretrieval.data.dataset import RLHFDataset
        from deepretrieval.data.tasks import restyle_row

        rows = [s.row if self.prompt_style is None else restyle_row(s.row, self.prompt_style) for s in samples]
        trained = self.trained_rendering()
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "rows.parquet"
            pd.DataFrame(rows).to_parquet(path, index=False)
            return RLHFDataset(str(path), tokenizer, {"max_prompt_length": self.max_prompt_length,
                                                      "truncation": "left", **trained})

    # -- generation ------------------------------------------------------------------------
    def generate(self, samples: Sequence[EvalSample]) -> List[List[Generation]]:
        texts = self._generate_vllm(samples) if self.backend == "vllm" else self._generate_hf(samples)
        style: Dict[str, Any] = {}
        if self.prompt_style is not None:  # the format check follows the style the model was prompted in
            s = get_style(self.prompt_style)
            style = {"think_in_prompt": s.think_in_prompt, "reasoning": s.reasoning, "expands": s.expands}
        return [[Generation(text=t, **style) for t in texts[i * self.n : (i + 1) * self.n]] for i in range(len(samples))]

    def _generate_hf(self, samples: Sequence[EvalSample]) -> List[str]:
        import torch

        from deepretrieval.data.dataset import collate_fn
        from deepretrieval.protocol import Batch
        from deepretrieval.workers.config import RolloutConfig, from_dict
        from deepretrieval.workers.rollout import HFRollout

        if self._model is None:
            self._load_hf()
        greedy = self.n == 1
        config = {
            "prompt_length": self.max_prompt_length, "response_length": self.max_new_tokens,
            "temperature": self.temperature, "top_p": self.top_p, "top_k": -1, "n": self.n,
            "do_sample": not greedy,
            "val_kwargs": {"temperature": 0.0, "top_p": 1.0, "top_k": -1, "n": 1, "do_sample": False},
        }
        rollout = HFRollout(self._model, self._tokenizer, from_dict(RolloutConfig, config))
        dataset = self._dataset(samples, self._tokenizer)
        device = next(self._model.parameters()).device
        texts: List[str] = []
        for start in range(0, len(dataset), self.batch_size):
            items = [dataset[i] for i in range(start, min(start + self.batch_size, len(dataset)))]
            batch = Batch.from_single_dict(collate_fn(items))
            batch.meta_info.update({"validate": greedy, "do_sample": not greedy, "n": self.n,
                                    "temperature": self.temperature, "seed": self.seed + start,
                                    "no_repeat_ngram_size": self.no_repeat_ngram_size})
            with torch.no_grad():
                out = rollout.generate_sequences(batch.to(device))
            responses, mask = out.batch["responses"], out.batch["response_mask"]
            for row, m in zip(responses, mask):
                ids = row[m.bool()].tolist()
                texts.append(self._tokenizer.decode(ids, skip_special_tokens=True))
        return texts

    def _generate_vllm(self, samples: Sequence[EvalSample]) -> List[str]:
        from vllm import LLM, SamplingParams

        from deepretrieval.models.tokenizer import load_tokenizer

        if self._llm is None:
            self._tokenizer = load_tokenizer(self.model_dir)
            self._llm = LLM(model=str(self.model_dir), seed=self.seed)
        dataset = self._dataset(samples, self._tokenizer)
        prompts = [dataset.render(row) for row in dataset.rows]
        params = SamplingParams(n=self.n, temperature=self.temperature, top_p=self.top_p,
                                max_tokens=self.max_new_tokens, seed=self.seed)
        outputs = self._llm.generate(prompts, params)
        return [c.text for o in outputs for c in o.outputs]
