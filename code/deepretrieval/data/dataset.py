"""RLHFDataset: verl parquet rows -> left-padded prompt tensors plus the per-sample reward inputs.

The stored chat messages go through the tokenizer's chat template (`add_generation_prompt=True`)
when the dataset is loaded, then the row's assistant prefix (`extra_info.assistant_prefix`, e.g.
`Let me solve this step by step.\\n<think>\\n`) is appended, so the model's turn starts where the
prompt left it. With `apply_chat_template=False` (base models) the messages are rendered as
plain text by `deepretrieval.data.prompts.render_raw_text`. Rows whose stored prompt is already
the complete model input (`prompts.is_raw_frame`: the `original` style, and parquet files of the
original DeepRetrieval preprocessing) are tokenised as they are, with neither template nor prefix,
as the original did.

Original-format rows (`data_source="literature"`, top-level `pub_date` and `label`) are read as
they are: `row_extra_info` copies the top-level `pub_date` into `extra_info` (where the reward
reads the date limit) and marks the original prompt (it opens `<think>`) for the format check.

Config keys (the `data` section, or a config holding one): prompt_key ("prompt"),
max_prompt_length (1024), truncation ("error" | "left" | "right"), filter_overlong_prompts
(False), return_raw_chat (False), apply_chat_template (True), assistant_prefix (None: per row).

Items: input_ids, attention_mask, position_ids ([max_prompt_length], left-padded;
position_ids = max(cumsum(mask) - 1, 0)), data_source, reward_model, extra_info, index,
raw_prompt (the chat messages) and raw_prompt_text (the rendered prompt string).
"""

from __future__ import annotations

import logging
from typing import Any, Dict, List, Mapping, Sequence, Union

import numpy as np
import torch

from deepretrieval.data.prompts import is_raw_frame, render_raw_text

logger = logging.getLogger(__name__)

DEFAULTS: Dict[str, Any] = {
    "prompt_key": "prompt",
    "max_prompt_length": 1024,
    "truncation": "error",
    "filter_overlong_prompts": False,
    "return_raw_chat": False,
    "apply_chat_template": True,
    "assistant_prefix": None,
}


def plain_python(value: Any) -> Any:
    """Parquet gives numpy arrays for lists; the reward and templates want Python objects."""
    if isinstance(value, np.ndarray):
        return [plain_python(v) for v in value.tolist()]
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Mapping):
        return {k: plain_python(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain_python(v) for v in value]
    return value


def _data_section(config: Any) -> Dict[str, Any]:
    if config is None:
        return dict(DEFAULTS)
    getter = config.get if hasattr(config, "get") else lambda k, d=None: getattr(config, k, d)
    section = getter("data", None)
    if section is not None and not isinstance(section, (str, int, float)):
        config = section
        getter = config.get if hasattr(config, "get") else lambda k, d=None: getattr(config, k, d)
    out = dict(DEFAULTS)
    for key in DEFAULTS:
        value = getter(key, None)
        if value is not None:
            out[key] = value
    return out


def row_extra_info(row: Mapping[str, Any]) -> Dict[str, Any]:
    """A row's `extra_info` completed for original-format rows: the top-level `pub_date` when
    extra_info has none, and for a raw-frame prompt without a style, `prompt_style="original"`
    and `think_in_prompt` (whether the stored text ends by opening `<think>`)."""
    extra = dict(row.get("extra_info") or {})
    if extra.get("pub_date") in (None, "") and row.get("pub_date") not in (None, ""):
        extra["pub_date"] = str(row["pub_date"])
    if is_raw_frame(row) and extra.get("prompt_style") is None:
        messages = row.get("prompt")
        text = messages if isinstance(messages, str) else (messages[-1].get("content", "") if messages else "")
        extra["prompt_style"] = "original"
        extra["think_in_prompt"] = text.rstrip().endswith("<think>")
    return extra


def compute_position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """verl's position ids for left padding: max(cumsum(mask) - 1, 0)."""
    return torch.clamp(torch.cumsum(attention_mask, dim=-1) - 1, min=0)


class RLHFDataset(torch.utils.data.Dataset):
    """Prompts of one or more parquet files, tokenised on access."""

    def __init__(self, parquet_files: Union[str, Sequence[str]], tokenizer: Any, config: Any = None):
        import pandas as pd

        files = [parquet_files] if isinstance(parquet_files, str) else list(parquet_files)
        self.files = [str(f) for f in files]
        self.tokenizer = tokenizer
        self.config = _data_section(config)
        if self.config["truncation"] not in ("error", "left", "right"):
            raise ValueError(f"data.truncation must be error, left or right, not {self.config['truncation']!r}")
        frames = [pd.read_parquet(f) for f in self.files]
        frame = pd.concat(frames, ignore_index=True) if len(frames) > 1 else frames[0]
        self.rows: List[Dict[str, Any]] = [plain_python(r) for r in frame.to_dict(orient="records")]
        self._warned_no_template = False
        if self.tokenizer.pad_token_id is None:
            raise ValueError("the tokenizer has no pad token; set tokenizer.pad_token first")
        if self.config["filter_overlong_prompts"]:
            limit = int(self.config["max_prompt_length"])
            before = len(self.rows)
            self.rows = [r for r in self.rows if len(self._encode(self.render(r))) <= limit]
            if len(self.rows) < before:
                logger.info("filtered %d prompts longer than %d tokens", before - len(self.rows), limit)

    def __len__(self) -> int:
        return len(self.rows)

    def render(self, row: Mapping[str, Any]) -> str:
        """The prompt text fed to the model: chat template (or raw text) + assistant prefix."""
        messages = row[self.config["prompt_key"]]
        if is_raw_frame(row):  # the stored text is the whole model input (the original's frame)
            return messages if isinstance(messages, str) else "".join(m["content"] for m in messages)
        if isinstance(messages, str):
            messages = [{"role": "user", "content": messages}]
        prefix = self.config["assistant_prefix"]
        if prefix is None:
            prefix = (row.get("extra_info") or {}).get("assistant_prefix") or ""
        use_template = bool(self.config["apply_chat_template"])
        if use_template and not getattr(self.tokenizer, "chat_template", None):
            if not self._warned_no_template:
                logger.warning("tokenizer has no chat template; rendering prompts as raw text")
                self._warned_no_template = True
            use_template = False
        if use_template:
            text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            return text + prefix
        return render_raw_text(messages, prefix)

    def _encode(self, text: str) -> List[int]:
        # the chat template already holds any special tokens the model needs
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def _pad(self, ids: List[int], index: int) -> Dict[str, torch.Tensor]:
        limit = int(self.config["max_prompt_length"])
        if len(ids) > limit:
            mode = self.config["truncation"]
            if mode == "error":
                raise ValueError(
                    f"prompt {index} has {len(ids)} tokens > max_prompt_length={limit} "
                    "(set data.truncation or data.filter_overlong_prompts)"
                )
            ids = ids[-limit:] if mode == "left" else ids[:limit]
        pad = limit - len(ids)
        input_ids = torch.tensor([self.tokenizer.pad_token_id] * pad + ids, dtype=torch.long)
        attention_mask = torch.tensor([0] * pad + [1] * len(ids), dtype=torch.long)
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "position_ids": compute_position_ids(attention_mask),
        }

    def __getitem__(self, index: int) -> Dict[str, Any]:
        row = self.rows[index]
        text = self.render(row)
        item: Dict[str, Any] = self._pad(self._encode(text), index)
        extra_info = row_extra_info(row)
        item.update(
            data_source=row.get("data_source"),
            reward_model=row.get("reward_model"),
            extra_info=extra_info,
            index=extra_info.get("index", index),
            raw_prompt=row[self.config["prompt_key"]],
            raw_prompt_text=text,
        )
        if row.get("ability") is not None:
            item["ability"] = row["ability"]
        return item


def collate_fn(items: Sequence[Mapping[str, Any]]) -> Dict[str, Any]:
    """Stack tensors; everything else becomes a 1-D object array (for Batch.from_single_dict)."""
    out: Dict[str, Any] = {}
    for key in items[0].keys():
        values = [item[key] for item in items]
        if isinstance(values[0], torch.Tensor):
            out[key] = torch.stack(values)
        else:
            array = np.empty(len(values), dtype=object)
            for i, value in enumerate(values):
                array[i] = value
            out[key] = array
    return out
