"""Padding-free ("remove padding") forward passes: the valid tokens of a micro-batch packed into one row.

A padded micro-batch ``[B, T]`` spends compute on every pad token (left-padded prompts, right-padded
responses). Packing keeps only the tokens with ``attention_mask == 1``, concatenated in order into a
``[1, N]`` row (``N = attention_mask.sum()``) with each sequence's own ``position_ids``::

    row      = [a_0 .. a_{La-1}, b_0 .. b_{Lb-1}, ...]
    position = [0 .. La-1,       0 .. Lb-1,       ...]      (the rollout's ids: restart per sequence)

and the model is called with ``attention_mask=None``, ``use_cache=False``. transformers (checked with
5.24, Qwen2, ``attn_implementation`` "sdpa" on CPU and "flash_attention_2") then derives the sequence
boundaries from the position ids — a new sequence starts wherever ``position[i] != position[i-1] + 1``
(``masking_utils.find_packed_sequence_indices``) — and builds a block-diagonal causal mask (SDPA) or
varlen ``cu_seqlens`` (flash-attn), so no token attends across sequences. :func:`pack_inputs` checks
that the position ids really segment the row into the original sequences and raises otherwise (e.g.
positions that do not restart), rather than silently mixing sequences.

Response token ``y`` at packed index ``j`` is scored by the hidden state at ``j - 1`` — the previous
valid token of the same sequence, exactly the state the padded computation uses — so log-probs and
values equal the padded ones at every valid response position (tests: ``tests/test_packing.py``, to
1e-5 including gradients). Positions with ``attention_mask == 0`` get 0.

Cost: with flash-attn (varlen) attention work is per sequence, so packing saves all the pad work.
With SDPA the packed row is attended as one ``N x N`` block with a mask, i.e. quadratic in the
micro-batch's *total* tokens: measured on CPU (docs/benchmarks.md, "GPU path (issue 7)") packing
wins for short micro-batches and loses about 2x for 8 x ~400-token ones. Without flash-attn keep
micro-batches (or ``*_max_token_len_per_gpu`` budgets) small when packing; a one-time warning says so.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional, Tuple

import torch

from deepretrieval.workers.logprob import DEFAULT_CHUNK_SIZE, score_at_head


logger = logging.getLogger(__name__)
_warned_attention = False


def _warn_if_not_varlen(model: torch.nn.Module) -> None:
    global _warned_attention
    impl = str(getattr(getattr(model, "config", None), "_attn_implementation", "") or "")
    if not _warned_attention and "flash" not in impl:
        _warned_attention = True
        logger.warning("use_remove_padding with attn_implementation=%r: the packed row is attended as one "
                       "masked block (quadratic in the micro-batch's total tokens); flash_attention_2 "
                       "computes it per sequence. Keep micro-batches small or install flash-attn.", impl)


@dataclass
class PackedInputs:
    """One packed row and the maps back to the padded ``[B, R]`` response layout."""

    input_ids: torch.Tensor      # [1, N]
    position_ids: torch.Tensor   # [1, N]
    resp_rows: torch.Tensor      # [M] batch row of each valid response token
    resp_cols: torch.Tensor      # [M] column (0..R-1) of each valid response token
    resp_targets: torch.Tensor   # [M] its token id
    prev_index: torch.Tensor     # [M] packed index of the hidden state that predicts it
    shape: Tuple[int, int]       # (B, R)


def sequence_segments(position_ids: torch.Tensor) -> torch.Tensor:
    """Segment index of each token of a packed row ``[N]``: a new segment starts where the position is
    not the previous one + 1 (the rule transformers applies to packed rows)."""
    first = position_ids[:1] - 1
    diff = torch.diff(position_ids, prepend=first)
    return (diff != 1).long().cumsum(-1)


def pack_inputs(input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                response_length: int) -> PackedInputs:
    """Pack ``[B, T]`` padded inputs (responses = last ``response_length`` columns) into one row.

    Raises ValueError when the position ids would not separate the sequences, or when a valid
    response token has no earlier valid token in its sequence to be predicted from.
    """
    if position_ids.dim() != 2:
        raise ValueError(f"packing needs 2-D position_ids [B, T], got shape {tuple(position_ids.shape)}")
    bsz, total = input_ids.shape
    valid = attention_mask.bool()
    lengths = valid.sum(-1)
    if bool((lengths == 0).any()):
        raise ValueError("packing: a sequence has no valid token (attention_mask all zero)")
    ids = input_ids[valid]
    pos = position_ids[valid]
    seq_of_token = torch.repeat_interleave(torch.arange(bsz, device=input_ids.device), lengths)
    if not torch.equal(sequence_segments(pos), seq_of_token):
        raise ValueError("packing: position_ids must run consecutively within each sequence and restart "
                         "between sequences (they are how the attention kernel finds the boundaries)")
    # packed index of every valid (row, col); -1 elsewhere
    packed_index = torch.full((bsz, total), -1, dtype=torch.long, device=input_ids.device)
    packed_index[valid] = torch.arange(ids.shape[0], device=input_ids.device)
    resp_valid = valid[:, total - response_length:]
    rows, cols = resp_valid.nonzero(as_tuple=True)
    j = packed_index[rows, cols + (total - response_length)]
    starts = torch.cumsum(lengths, 0) - lengths
    if bool((j == starts[rows]).any()):
        raise ValueError("packing: a response token is the first valid token of its sequence (empty prompt)")
    return PackedInputs(ids[None], pos[None], rows, cols, input_ids[rows, cols + (total - response_length)], j - 1,
                        (bsz, response_length))


def unpack_to_responses(values: torch.Tensor, packed: PackedInputs) -> torch.Tensor:
    """``[M]`` per-response-token values -> ``[B, R]`` (0 at padding), differentiable."""
    out = values.new_zeros(packed.shape)
    return out.index_put((packed.resp_rows, packed.resp_cols), values)


def packed_response_log_probs(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    position_ids: torch.Tensor,
    response_length: int,
    temperature: float = 1.0,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    calculate_entropy: bool = False,
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """:func:`deepretrieval.workers.logprob.response_log_probs` on the packed row: same results at valid
    response positions, 0 at padding; the chunked head (no full logits) is used as there."""
    packed = pack_inputs(input_ids, attention_mask, position_ids, response_length)
    _warn_if_not_varlen(model)
    # logits_to_keep=0 keeps every position: the hidden states across the whole row are needed
    lp, ent = score_at_head(
        model, dict(input_ids=packed.input_ids, attention_mask=None, position_ids=packed.position_ids,
                    use_cache=False, logits_to_keep=0),
        lambda hidden: hidden[0].index_select(0, packed.prev_index), packed.resp_targets,
        temperature=temperature, chunk_size=chunk_size, calculate_entropy=calculate_entropy)
    return unpack_to_responses(lp, packed), (unpack_to_responses(ent, packed) if calculate_entropy else None)


def packed_values(value_model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                  position_ids: torch.Tensor, response_length: int) -> torch.Tensor:
    """Values ``[B, R]`` of the response positions from one packed forward of a
    :class:`~deepretrieval.workers.critic.ValueModel` (0 at padding)."""
    packed = pack_inputs(input_ids, attention_mask, position_ids, response_length)
    _warn_if_not_varlen(value_model)
    all_values = value_model(input_ids=packed.input_ids, attention_mask=None, position_ids=packed.position_ids)
    return unpack_to_responses(all_values[0].index_select(0, packed.prev_index), packed)
