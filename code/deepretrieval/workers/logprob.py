"""Log-probabilities and entropies of response tokens without the full float32 logits.

For a causal LM with final hidden states ``h_t`` and output projection ``W`` (``[V, H]``), the
response token ``y_t`` at sequence position ``t`` is scored by the hidden state one position earlier::

    z_t       = W h_{t-1} / temperature                      (logits, float32)
    log p_t   = z_t[y_t] - logsumexp(z_t)
    H_t       = logsumexp(z_t) - sum_v softmax(z_t)_v z_t,v   (entropy)

The naive computation builds ``z`` for every position of the batch at once: a ``[B, T, V]`` float32
tensor (B=16, T=1024, V=151,936 is 10 GB), kept alive for backward. Here ``z`` exists for at most
``chunk_size`` tokens at a time, only at response positions, in the forward *and* in the backward
(:class:`ChunkedLinearLogProb` recomputes each chunk's logits and applies the analytic gradients)::

    d log p_t / d z_t   = onehot(y_t) - softmax(z_t)
    d H_t / d z_t,v     = -softmax(z_t)_v (log softmax(z_t)_v + H_t)

The model-level entry point :func:`response_log_probs` runs the model's own ``forward`` (so wrappers
such as FSDP2 that gather parameters around ``forward`` see an ordinary call) with hooks on the output
projection: the projection receives an empty slice and the hook computes the chunked log-probs from
the hidden states it was given. Models that post-process logits (e.g. Gemma's soft-capping) are not
supported by this path; Qwen2/Llama-style heads are.
"""

from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch
import torch.nn.functional as F

DEFAULT_CHUNK_SIZE = 0  # 0 = auto: as many tokens as fit CHUNK_BUDGET_BYTES of float32 logits
CHUNK_BUDGET_BYTES = 128 * 2**20


def auto_chunk_size(vocab_size: int, budget_bytes: int = CHUNK_BUDGET_BYTES) -> int:
    """Tokens per chunk so one ``[chunk, V]`` float32 block takes at most ``budget_bytes`` (>= 16 tokens).

    Vocab 151,936 (Qwen2) -> 220 tokens; 32,768 -> 1,024; 4,096 -> 8,192.
    """
    return max(16, int(budget_bytes) // (4 * int(vocab_size)))


def _chunk_logits(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], temperature: float) -> torch.Tensor:
    # Projection in the model's dtype (as the model's own lm_head would), statistics in float32.
    logits = F.linear(hidden, weight, bias)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    if temperature != 1.0:
        logits = logits / temperature
    return logits


class ChunkedLinearLogProb(torch.autograd.Function):
    """``(hidden [N,H], weight [V,H], bias [V]|None, targets [N]) -> (log_prob [N], entropy [N])``.

    Memory: one ``[chunk_size, V]`` float32 block at a time in forward and backward; saved for backward
    are only the inputs. When ``with_entropy`` is False the entropy output is an empty tensor.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, temperature: float, chunk_size: int, with_entropy: bool):
        n = hidden.shape[0]
        stat_dtype = torch.promote_types(hidden.dtype, torch.float32)  # float32 (float64 for gradcheck)
        log_probs = torch.empty(n, dtype=stat_dtype, device=hidden.device)
        entropy = torch.empty(n if with_entropy else 0, dtype=stat_dtype, device=hidden.device)
        for start in range(0, n, chunk_size):
            end = min(start + chunk_size, n)
            logits = _chunk_logits(hidden[start:end], weight, bias, temperature)
            lse = torch.logsumexp(logits, dim=-1)
            log_probs[start:end] = logits.gather(-1, targets[start:end, None]).squeeze(-1) - lse
            if with_entropy:
                # in place: logits -> log-softmax; at most two [chunk, V] blocks alive
                logp_all = logits.sub_(lse[:, None])
                entropy[start:end] = -logp_all.exp().mul_(logp_all).sum(-1)
            del logits
        ctx.save_for_backward(hidden, weight, bias, targets, entropy)
        ctx.temperature = temperature
        ctx.chunk_size = chunk_size
        ctx.with_entropy = with_entropy
        ctx.has_bias = bias is not None
        if not with_entropy:
            ctx.mark_non_differentiable(entropy)
        return log_probs, entropy

    @staticmethod
    def backward(ctx, grad_log_probs, grad_entropy):
        hidden, weight, bias, targets, entropy = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.has_bias and ctx.needs_input_grad[2]
        grad_h = torch.empty_like(hidden) if need_h else None
        stat_dtype = entropy.dtype
        grad_w = torch.zeros(weight.shape, dtype=stat_dtype, device=weight.device) if need_w else None
        grad_b = torch.zeros(weight.shape[0], dtype=stat_dtype, device=weight.device) if need_b else None
        use_entropy = ctx.with_entropy and grad_entropy is not None and grad_entropy.numel() > 0
        n = hidden.shape[0]
        for start in range(0, n, ctx.chunk_size):
            end = min(start + ctx.chunk_size, n)
            h = hidden[start:end]
            logits = _chunk_logits(h, weight, bias, ctx.temperature)
            # In place, two [chunk, V] blocks at most:  A = log p,  B = p,  then
            # grad_z = -p * (g_lp + g_ent * (log p + H)) + onehot(y) * g_lp
            logp_all = logits.sub_(torch.logsumexp(logits, dim=-1, keepdim=True))
            probs = logp_all.exp()
            g = (grad_log_probs[start:end, None].to(stat_dtype) if grad_log_probs is not None
                 else torch.zeros(end - start, 1, dtype=stat_dtype, device=h.device))
            if use_entropy:
                g_ent = grad_entropy[start:end, None].to(stat_dtype)
                coeff = logp_all.add_(entropy[start:end, None]).mul_(g_ent).add_(g)
                grad_z = probs.mul_(coeff).neg_()
            else:
                grad_z = probs.mul_(g).neg_()
            del logits, logp_all
            grad_z.scatter_add_(-1, targets[start:end, None], g)
            if ctx.temperature != 1.0:
                grad_z = grad_z / ctx.temperature
            if need_h:
                grad_h[start:end] = (grad_z.to(weight.dtype) @ weight).to(hidden.dtype)
            if need_w:
                grad_w += grad_z.t() @ h.to(stat_dtype)
            if need_b:
                grad_b += grad_z.sum(0)
        if grad_w is not None:
            grad_w = grad_w.to(weight.dtype)
        if grad_b is not None:
            grad_b = grad_b.to(bias.dtype)
        return grad_h, grad_w, grad_b, None, None, None, None


def chunked_log_probs_from_hidden(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    temperature: float = 1.0,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    calculate_entropy: bool = False,
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Log-probs (and entropies) of ``targets`` under ``softmax(hidden @ weight.T + bias) / temperature``.

    ``hidden`` is ``[..., H]`` and ``targets`` the matching ``[...]`` token ids; returns float32 tensors
    of the ``targets`` shape. Differentiable w.r.t. ``hidden``, ``weight`` and ``bias``.
    """
    if not chunk_size or chunk_size <= 0:
        chunk_size = auto_chunk_size(weight.shape[0])
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 for log-probabilities, got {temperature}")
    shape = targets.shape
    flat_h = hidden.reshape(-1, hidden.shape[-1])
    flat_t = targets.reshape(-1).long()
    log_probs, entropy = ChunkedLinearLogProb.apply(flat_h, weight, bias, flat_t, float(temperature), int(chunk_size), bool(calculate_entropy))
    return log_probs.view(shape), (entropy.view(shape) if calculate_entropy else None)


def naive_log_probs_from_logits(logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0,
                                calculate_entropy: bool = False) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Reference computation on materialised logits ``[..., V]`` (float32 log_softmax of all of them)."""
    logits = logits.float() / temperature
    logp_all = torch.log_softmax(logits, dim=-1)
    log_probs = logp_all.gather(-1, targets.long().unsqueeze(-1)).squeeze(-1)
    entropy = -(logp_all.exp() * logp_all).sum(-1) if calculate_entropy else None
    return log_probs, entropy


def _output_projection(model: torch.nn.Module) -> torch.nn.Module:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None or not hasattr(head, "weight"):
        raise TypeError(f"{type(model).__name__} has no linear output projection (get_output_embeddings)")
    return head


def response_log_probs(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    position_ids: torch.Tensor,
    response_length: int,
    temperature: float = 1.0,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    calculate_entropy: bool = False,
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Log-probs ``[B, R]`` (and entropies) of the last ``response_length`` tokens of ``input_ids``.

    One ordinary ``model(...)`` call with ``logits_to_keep=R+1`` (:func:`score_at_head`): a pre-hook on the output projection
    captures its input (hidden states of the last R+1 positions) and hands it an empty slice, and the
    post-hook scores positions ``-R-1 .. -2`` against tokens ``-R .. -1`` in chunks.
    """
    return score_at_head(
        model, dict(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                    use_cache=False, logits_to_keep=response_length + 1),
        lambda hidden: hidden[:, -response_length - 1:-1, :], input_ids[:, -response_length:],
        temperature=temperature, chunk_size=chunk_size, calculate_entropy=calculate_entropy)


def score_at_head(
    model: torch.nn.Module,
    forward_kwargs: dict,
    select_hidden: Callable[[torch.Tensor], torch.Tensor],
    targets: torch.Tensor,
    temperature: float = 1.0,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    calculate_entropy: bool = False,
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Run ``model(**forward_kwargs)`` and score ``targets`` from the hidden states its output projection
    receives, without the projection computing full logits.

    A pre-hook on the projection captures its input and hands it an empty slice; the post-hook scores
    ``select_hidden(input)`` (one hidden state per target, same leading shape as ``targets``) against
    ``targets`` in chunks (:func:`chunked_log_probs_from_hidden`).
    """
    head = _output_projection(model)
    captured: dict = {}

    def pre_hook(module, args):
        captured["hidden"] = args[0]
        return (args[0][..., :0, :],) + tuple(args[1:])

    def post_hook(module, args, output):
        lp, ent = chunked_log_probs_from_hidden(
            select_hidden(captured.pop("hidden")), module.weight, targets, bias=getattr(module, "bias", None),
            temperature=temperature, chunk_size=chunk_size, calculate_entropy=calculate_entropy,
        )
        captured["log_probs"], captured["entropy"] = lp, ent
        return output

    h1 = head.register_forward_pre_hook(pre_hook)
    h2 = head.register_forward_hook(post_hook)
    try:
        model(**forward_kwargs)
    finally:
        h1.remove()
        h2.remove()
    if "log_probs" not in captured:
        raise RuntimeError(f"{type(model).__name__}.forward did not call its output projection")
    return captured["log_probs"], captured["entropy"]


def naive_response_log_probs(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    position_ids: torch.Tensor,
    response_length: int,
    temperature: float = 1.0,
    calculate_entropy: bool = False,
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """The textbook version (full ``[B, T, V]`` float32 logits); for tests and the memory benchmark."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False).logits
    logits = logits[:, -response_length - 1:-1, :]
    return naive_log_probs_from_logits(logits.float(), input_ids[:, -response_length:], temperature, calculate_entropy)
