"""A short supervised warm-up on the answer format, before RL.

A small instruct model asked for `<answer>{"query": "..."}</answer>` usually answers with
something else (prose, invented records), so every rollout scores the format penalty and RL has
no signal to follow. A few optimiser steps of supervised fine-tuning on (prompt, answer) pairs
teach the tags; RL then learns which query finds the studies. Targets in the answer format are
written with `deepretrieval.rewards.parsing.format_answer`.

Loss (the usual causal-LM SFT objective, prompt tokens masked):

    L = - (1 / |T|) * sum_{t in T} log p(x_t | x_<t)      T = positions of the target tokens

The targets must come from training data only (the caller builds them); the warm-up never sees a
test topic. `run_sft` writes an ordinary Hugging Face folder (model + tokenizer) atomically, with
a completion marker, so a rerun with the same output folder skips the work.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Sequence, Tuple, Union

import torch

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
DONE_MARKER = ".sft-complete"


@dataclass(frozen=True)
class SFTExample:
    """`prompt`: the rendered prompt text exactly as the policy sees it (chat template + prefix);
    `target`: the response text to learn (the tokenizer's EOS is appended when tokenising)."""

    prompt: str
    target: str


def tokenize_example(tokenizer: Any, example: SFTExample, max_length: int) -> Tuple[List[int], List[int]]:
    """(input_ids, labels) of one example; labels are IGNORE_INDEX on the prompt tokens.

    The target gets the tokenizer's EOS appended, so the model learns to stop after `</answer>`.
    Too-long examples are cut from the left of the prompt (the target is kept whole).
    """
    prompt_ids = list(tokenizer(example.prompt, add_special_tokens=False)["input_ids"])
    target_ids = list(tokenizer(example.target, add_special_tokens=False)["input_ids"])
    if tokenizer.eos_token_id is not None:
        target_ids.append(int(tokenizer.eos_token_id))
    if len(target_ids) >= max_length:
        raise ValueError(f"target of {len(target_ids)} tokens does not fit max_length={max_length}")
    keep = max_length - len(target_ids)
    prompt_ids = prompt_ids[-keep:] if len(prompt_ids) > keep else prompt_ids
    return prompt_ids + target_ids, [IGNORE_INDEX] * len(prompt_ids) + target_ids


def collate(pairs: Sequence[Tuple[List[int], List[int]]], pad_id: int) -> Dict[str, torch.Tensor]:
    """Left-pad (input_ids, labels) pairs into input_ids / attention_mask / position_ids / labels.

    Left padding puts every target at the end of its row, so the forward pass only needs the
    logits of the last `keep` positions (`keep_positions`), not of the prompt tokens.
    """
    width = max(len(ids) for ids, _ in pairs)
    input_ids = torch.full((len(pairs), width), pad_id, dtype=torch.long)
    labels = torch.full((len(pairs), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(pairs), width), dtype=torch.long)
    for i, (ids, lab) in enumerate(pairs):
        input_ids[i, width - len(ids):] = torch.tensor(ids)
        labels[i, width - len(lab):] = torch.tensor(lab)
        mask[i, width - len(ids):] = 1
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    return {"input_ids": input_ids, "attention_mask": mask, "position_ids": position_ids, "labels": labels}


def keep_positions(labels: torch.Tensor) -> int:
    """How many trailing positions hold every target token and the position predicting the first."""
    targets = labels != IGNORE_INDEX
    first = torch.where(targets.any(-1), targets.float().argmax(-1), torch.full_like(targets[:, 0], labels.size(1), dtype=torch.long))
    return int(labels.size(1) - first.min().item() + 1) if targets.any() else 1


def sft_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over the target positions (labels != IGNORE_INDEX).

    logits [B, T, V] predict token t+1 at position t, so logits[:, :-1] are scored against labels[:, 1:].
    """
    shift_logits = logits[:, :-1].float()
    shift_labels = labels[:, 1:]
    return torch.nn.functional.cross_entropy(
        shift_logits.reshape(-1, shift_logits.size(-1)), shift_labels.reshape(-1), ignore_index=IGNORE_INDEX
    )


def sft_done(out_dir: Union[str, Path]) -> bool:
    return (Path(out_dir) / DONE_MARKER).is_file()


def run_sft(
    model_path: Union[str, Path],
    examples: Sequence[SFTExample],
    out_dir: Union[str, Path],
    epochs: int = 2,
    lr: float = 5e-5,
    batch_size: int = 8,
    max_length: int = 256,
    seed: int = 0,
    weight_decay: float = 0.0,
    grad_clip: float = 1.0,
    progress: bool = True,
    force: bool = False,
) -> Dict[str, Any]:
    """Fine-tune `model_path` on `examples` for `epochs` passes; save a HF folder to `out_dir`.

    Returns {"path", "losses" (per optimiser step), "steps", "skipped"}. A folder already marked
    complete is returned as is unless `force`. The folder is written to a temporary sibling and
    renamed, so an interrupted run never leaves a folder that looks complete.
    """
    out = Path(out_dir)
    if sft_done(out) and not force:
        logger.info("SFT warm-up already done: %s", out)
        return {"path": out, "losses": [], "steps": 0, "skipped": True}
    if not examples:
        raise ValueError("no SFT examples")
    from transformers import AutoModelForCausalLM

    from deepretrieval.models.tokenizer import load_tokenizer

    torch.manual_seed(seed)
    tokenizer = load_tokenizer(model_path)
    model = AutoModelForCausalLM.from_pretrained(str(model_path), dtype=torch.float32)
    model.train()
    encoded = [tokenize_example(tokenizer, ex, max_length) for ex in examples]
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    gen = torch.Generator().manual_seed(seed)
    steps_per_epoch = math.ceil(len(encoded) / batch_size)
    losses: List[float] = []
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=epochs * steps_per_epoch, desc="SFT warm-up", unit="step")
    for _ in range(epochs):
        order = torch.randperm(len(encoded), generator=gen).tolist()
        for start in range(0, len(order), batch_size):
            batch = collate([encoded[i] for i in order[start : start + batch_size]], tokenizer.pad_token_id)
            keep = min(keep_positions(batch["labels"]), batch["labels"].size(1))
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                           position_ids=batch["position_ids"], logits_to_keep=keep).logits
            loss = sft_loss(logits, batch["labels"][:, -keep:])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if grad_clip and grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
            optimizer.step()
            losses.append(float(loss.detach()))
            if bar is not None:
                bar.set_postfix(loss=f"{losses[-1]:.3f}")
                bar.update(1)
    if bar is not None:
        bar.close()
    model.eval()
    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    model.save_pretrained(str(tmp))
    tokenizer.save_pretrained(str(tmp))
    (tmp / "sft_losses.json").write_text(json.dumps({"losses": losses, "epochs": epochs, "lr": lr,
                                                     "batch_size": batch_size, "examples": len(encoded)}) + "\n")
    (tmp / DONE_MARKER).write_text("ok\n")
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    logger.info("SFT warm-up: %d steps, loss %.3f -> %.3f, saved %s", len(losses), losses[0], losses[-1], out)
    return {"path": out, "losses": losses, "steps": len(losses), "skipped": False}
