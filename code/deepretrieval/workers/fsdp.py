"""FSDP2 (`torch.distributed.fsdp.fully_shard`) for the workers: wrapping, checkpoints, HF export.

- `apply_fsdp2(model, ...)` shards every transformer block (the classes HF lists in
  `_no_split_modules`) and then the root, ZeRO-3 style; works on CPU over gloo and on GPU over NCCL.
- `save_sharded` / `load_sharded` write model + optimiser state with torch.distributed.checkpoint:
  each rank writes its own shards (no full copy on one rank), and a checkpoint loads on any number
  of ranks (DCP reshards). A single unsharded process uses the same format.
- `full_state_dict(model)` gathers plain full tensors on rank 0 (CPU); `export_hf` writes them with
  the model's config, generation config and tokenizer as a folder `transformers` and `vllm serve`
  load as is (a LoRA model merged, optionally with its peft adapter next to it).
- `unsharded_for_generation(model)` gathers the parameters once for a whole `generate` call, so
  ranks can stop at different lengths without desynchronising collectives.
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path
from typing import Any, Dict, Iterator, Optional, Set

import torch
import torch.distributed as dist
from torch import nn

logger = logging.getLogger(__name__)


def _fsdp2():
    """The FSDP2 namespace: public since torch 2.6, `_composable.fsdp` before (only torch 2.13 is tested)."""
    try:
        import torch.distributed.fsdp as mod

        mod.fully_shard  # noqa: B018
        return mod
    except (ImportError, AttributeError):
        import torch.distributed._composable.fsdp as mod  # torch < 2.6

        return mod


def is_fsdp2(model: nn.Module) -> bool:
    return isinstance(model, _fsdp2().FSDPModule)


def block_class_names(model: nn.Module) -> Set[str]:
    """Names of the transformer-block classes to shard separately (HF `_no_split_modules`)."""
    names: Set[str] = set()
    for module in model.modules():
        names.update(getattr(module, "_no_split_modules", None) or [])
    return names


def mixed_precision_policy(mode: str, device_type: str):
    """auto: bf16 compute with fp32 gradient reduction on GPU, plain fp32 on CPU."""
    MixedPrecisionPolicy = _fsdp2().MixedPrecisionPolicy

    if mode == "auto":
        mode = "bf16" if device_type == "cuda" else "fp32"
    if mode == "bf16":
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32, cast_forward_inputs=True)
    if mode == "fp32":
        return MixedPrecisionPolicy()
    raise ValueError(f"fsdp_config.mixed_precision must be auto, bf16 or fp32; got {mode!r}")


def apply_fsdp2(
    model: nn.Module,
    device_type: str = "cpu",
    mixed_precision: str = "auto",
    reshard_after_forward: bool = True,
) -> nn.Module:
    """Shard `model` in place over the default process group (blocks first, then the root)."""
    fully_shard = _fsdp2().fully_shard

    if not dist.is_initialized():
        raise RuntimeError("apply_fsdp2 needs torch.distributed to be initialised")
    kwargs: Dict[str, Any] = dict(mp_policy=mixed_precision_policy(mixed_precision, device_type))
    names = block_class_names(model)
    blocks = [m for m in model.modules() if type(m).__name__ in names]
    if not blocks:
        logger.warning("no transformer blocks found (%s has no _no_split_modules): sharding the root only",
                       type(model).__name__)
    for block in blocks:
        fully_shard(block, reshard_after_forward=reshard_after_forward, **kwargs)
    # None = FSDP2's automatic choice: the root keeps its parameters gathered between forward and
    # backward (the output head's weight is used again in backward right away)
    fully_shard(model, reshard_after_forward=None if reshard_after_forward else False, **kwargs)
    return model


@contextlib.contextmanager
def unsharded_for_generation(model: nn.Module) -> Iterator[nn.Module]:
    """Keep all FSDP2 parameters gathered for the duration (no collectives inside).

    Generation runs a data-dependent number of forward passes per rank (sequences end at EOS);
    with per-layer all-gathers that would deadlock, so the full weights are gathered once.
    """
    if not is_fsdp2(model):
        yield model
        return
    FSDPModule = _fsdp2().FSDPModule
    fsdp_modules = [m for m in model.modules() if isinstance(m, FSDPModule)]
    root_state = model._get_fsdp_state()
    if hasattr(root_state, "_lazy_init"):
        root_state._lazy_init()  # fixes the root's settings first, so the restore below restores them
    saved = [_reshard_state(m) for m in fsdp_modules]
    for m in fsdp_modules:
        m.set_reshard_after_forward(False, recurse=False)
    for m in fsdp_modules:
        m.unshard()
    try:
        yield model
    finally:
        for m, state in zip(fsdp_modules, saved):
            m.reshard()
            _restore_reshard_state(m, state)


def _reshard_state(module: nn.Module) -> Any:
    # FSDP2 keeps the root's parameters gathered after forward (they are needed for backward at
    # once; the chunked log-prob head even relies on it) — a setting the public setter cannot
    # express, so the exact per-group state is saved and put back.
    st = module._get_fsdp_state()
    return st._auto_reshard_after_forward, [g.post_forward_mesh_info for g in st._fsdp_param_groups]


def _restore_reshard_state(module: nn.Module, saved: Any) -> None:
    st = module._get_fsdp_state()
    st._auto_reshard_after_forward = saved[0]
    for group, info in zip(st._fsdp_param_groups, saved[1]):
        group.post_forward_mesh_info = info


def move_model(model: nn.Module, device: Any) -> None:
    """Move (sharded) parameters and buffers, e.g. to CPU between calls when offloading (verl's
    FSDP2 offload: the whole module moves, so compute never sees parameters on two devices)."""
    model.to(device)
    if torch.cuda.is_available() and torch.device(device).type == "cpu":
        torch.cuda.empty_cache()


def move_optimizer(optimizer: Optional[torch.optim.Optimizer], device: Any) -> None:
    """Move the optimiser's state tensors (Adam moments) to `device`."""
    if optimizer is None:
        return
    for state in optimizer.state.values():
        for key, value in state.items():
            if isinstance(value, torch.Tensor) and key != "step":
                state[key] = value.to(device, non_blocking=True)
    if torch.cuda.is_available() and torch.device(device).type == "cpu":
        torch.cuda.empty_cache()


@contextlib.contextmanager
def on_device(model: nn.Module, device: Any, offload: bool, optimizer: Optional[torch.optim.Optimizer] = None,
              offload_optimizer: bool = False) -> Iterator[None]:
    """With offloading, bring the model (and optimiser state) to `device` for the block and back to
    CPU afterwards; without, do nothing."""
    if offload:
        move_model(model, device)
    if offload_optimizer:
        move_optimizer(optimizer, device)
    try:
        yield
    finally:
        if offload_optimizer:
            move_optimizer(optimizer, "cpu")
        if offload:
            move_model(model, "cpu")


def _options(full: bool):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=full, cpu_offload=full)


def full_state_dict(model: nn.Module) -> Dict[str, torch.Tensor]:
    """Plain, full CPU tensors on rank 0 ({} on other ranks). Every rank must call it."""
    if not is_fsdp2(model):
        return {k: v.detach().cpu() for k, v in model.state_dict().items()}
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(model, options=_options(True))


def _dcp_options(trainable_only: bool):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    # trainable_only (LoRA): the frozen base weights are left out (they are re-read from model.path);
    # loading such a partial state needs strict=False (the base keys are "missing" by design)
    return StateDictOptions(ignore_frozen_params=trainable_only, strict=not trainable_only)


def _drop_frozen(model: nn.Module, state: Dict[str, Any]) -> Dict[str, Any]:
    """`state` without the entries of frozen parameters, tied aliases included (DCP's
    ignore_frozen_params misses the second name of a tied weight, e.g. a tied lm_head)."""
    for name, param in model.named_parameters(remove_duplicate=False):
        if not param.requires_grad:
            state.pop(name.replace("_checkpoint_wrapped_module.", "").replace("_orig_mod.", ""), None)
    return state


def save_sharded(folder: os.PathLike, model: nn.Module, optimizer: Optional[torch.optim.Optimizer],
                 trainable_only: bool = False) -> None:
    """Write model (+ optimiser) state with torch.distributed.checkpoint; every rank calls it.
    `trainable_only`: only the parameters with requires_grad (a LoRA adapter), not the frozen base."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    Path(folder).mkdir(parents=True, exist_ok=True)
    options = _dcp_options(trainable_only)
    if optimizer is not None:
        model_sd, optim_sd = get_state_dict(model, optimizer, options=options)
        state = {"model": model_sd, "optim": optim_sd}
    else:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        state = {"model": get_model_state_dict(model, options=options)}
    if trainable_only:
        _drop_frozen(model, state["model"])
    dcp.save(state, checkpoint_id=str(folder))


def load_sharded(folder: os.PathLike, model: nn.Module, optimizer: Optional[torch.optim.Optimizer],
                 trainable_only: bool = False) -> None:
    """Restore what `save_sharded` wrote, in place (any number of ranks). `trainable_only` as there:
    the frozen parameters keep their current values."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_state_dict,
        set_model_state_dict,
        set_state_dict,
    )

    options = _dcp_options(trainable_only)
    if optimizer is not None:
        model_sd, optim_sd = get_state_dict(model, optimizer, options=options)
        state = {"model": _drop_frozen(model, model_sd) if trainable_only else model_sd, "optim": optim_sd}
        dcp.load(state, checkpoint_id=str(folder))
        result = set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"],
                                options=options)
    else:
        model_sd = get_model_state_dict(model, options=options)
        state = {"model": _drop_frozen(model, model_sd) if trainable_only else model_sd}
        dcp.load(state, checkpoint_id=str(folder))
        result = set_model_state_dict(model, state["model"], options=options)
    unexpected = list(getattr(result, "unexpected_keys", None) or [])
    if trainable_only and unexpected:
        raise RuntimeError(f"checkpoint {folder}: unexpected model keys {unexpected[:5]}")


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def tied_output_keys(model: nn.Module) -> Set[str]:
    """State-dict keys of an output projection that shares its weight with the input embedding."""
    if not getattr(getattr(model, "config", None), "tie_word_embeddings", False):
        return set()
    out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    in_emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if out_emb is None or in_emb is None or out_emb.weight is not in_emb.weight:
        return set()
    return {f"{name}.weight" for name, module in model.named_modules() if module is out_emb}


def _fix_exported_config(path: Path, dtype: Optional[torch.dtype]) -> None:
    """Make config.json describe the stored model, not the training wrapper: the architecture name
    without FSDP2's `FSDP` class prefix (vLLM picks its implementation by it) and the precision of
    the stored weights (save_pretrained records the in-memory fp32 master precision)."""
    import json

    cfg = json.loads(path.read_text())
    archs = cfg.get("architectures") or []
    cfg["architectures"] = [a[4:] if a.startswith("FSDP") and len(a) > 4 else a for a in archs] or archs
    if dtype is not None:
        name = str(dtype).replace("torch.", "")
        cfg["dtype"] = name
        if "torch_dtype" in cfg:
            cfg["torch_dtype"] = name
    path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def export_hf(model: nn.Module, out_dir: os.PathLike, tokenizer: Any = None, dtype: Optional[torch.dtype] = None,
              adapter_dir: Optional[os.PathLike] = None) -> Optional[str]:
    """Write `model` (a transformers PreTrainedModel, sharded or not) as a Hugging Face folder:
    safetensors weights, config.json, generation_config.json and the tokenizer. Every rank calls
    it (the weights are gathered); rank 0 writes and returns the path, other ranks return None.
    `dtype` converts the weights (e.g. back to the checkpoint's bf16) before writing.

    A LoRA (peft) model is written merged (W + scaling * B @ A, plain HF names: a folder plain
    `transformers` and `vllm serve` load); with `adapter_dir` its adapter is also written there in
    peft's format (adapter_config.json + adapter_model.safetensors, float32 as trained)."""
    from deepretrieval.workers import lora

    state = full_state_dict(model)
    if _rank() != 0:
        return None
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    hf_model = model
    if lora.is_peft_model(model):
        if adapter_dir is not None:
            base_path = getattr(getattr(lora.base_hf_model(model), "config", None), "_name_or_path", None)
            lora.save_lora_adapter(model, state, adapter_dir, base_model_name_or_path=base_path)
        state = lora.merged_state_dict(model, state)  # consumes `state`; merged in the master precision, cast below
        hf_model = lora.base_hf_model(model)
    if dtype is not None:
        state = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in state.items()}
    for key in tied_output_keys(hf_model):
        state.pop(key, None)  # tied to the input embedding: HF folders store it once
    hf_model.save_pretrained(str(out), state_dict=state, safe_serialization=True)
    _fix_exported_config(out / "config.json", dtype)
    gen = getattr(hf_model, "generation_config", None)
    if gen is not None:
        gen.save_pretrained(str(out))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out))
    return str(out)
