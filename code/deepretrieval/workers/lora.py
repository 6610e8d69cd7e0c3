"""LoRA (peft) helpers of the trainer: merged weights under plain Hugging Face names, adapter export.

A peft-wrapped causal LM names its parameters ``base_model.model.<hf name>``, and each LoRA-adapted
linear layer ``m`` holds ``m.base_layer.weight`` (frozen ``W``), ``m.lora_A.<adapter>.weight`` (``A``,
``[r, in]``) and ``m.lora_B.<adapter>.weight`` (``B``, ``[out, r]``). The merged model, which is what a
rollout engine (vLLM) or a plain ``transformers.AutoModelForCausalLM`` needs, has under the plain name
``m.weight``::

    W_merged = W + scaling * B @ A          (scaling = lora_alpha / r, or / sqrt(r) with rsLoRA;
                                             transposed for fan_in_fan_out layers such as GPT-2's Conv1D)

:func:`merged_named_tensors` computes this as a stream over ``(name, tensor)`` pairs (a state dict, or
parameters gathered one at a time from FSDP2 shards), holding at most one layer's ``W``, ``A`` and ``B``
at once; :func:`lora_specs` reads the per-layer scaling from the model. The result equals peft's own
``merge_and_unload()`` state dict (tests/test_trainer_lora.py). Only plain LoRA on linear layers is
handled: DoRA, LoRA biases and embedding / convolution adapters raise NotImplementedError.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterable, Iterator, Optional, Tuple

import torch
from torch import nn

PEFT_PREFIX = "base_model.model."
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"

_LORA_RE = re.compile(r"^(?P<module>.+)\.lora_(?P<which>[AB])\.(?P<adapter>[^.]+)\.weight$")
_BASE_RE = re.compile(r"^(?P<module>.+)\.base_layer\.(?P<param>weight|bias)$")


def is_peft_model(model: nn.Module) -> bool:
    """A peft model (FSDP2-sharded or not): it can switch its adapter off."""
    return hasattr(model, "disable_adapter") and hasattr(model, "peft_config")


def hf_name(name: str) -> str:
    """The plain Hugging Face name of a (peft-wrapped, activation-checkpointed) parameter or module name:
    no ``base_model.model.`` prefix, no ``.base_layer`` and no checkpoint-wrapper component."""
    name = name.replace("_checkpoint_wrapped_module.", "")
    if name.startswith(PEFT_PREFIX):
        name = name[len(PEFT_PREFIX):]
    return name.replace(".base_layer.", ".").replace(".base_layer", "")


@dataclass(frozen=True)
class LoraSpec:
    """How one adapted layer merges: ``W + scaling * (B @ A)`` (transposed when ``fan_in_fan_out``)."""

    scaling: float
    fan_in_fan_out: bool = False


def active_adapter(model: nn.Module) -> str:
    name = getattr(model, "active_adapter", "default")
    if isinstance(name, (list, tuple)):
        if len(name) != 1:
            raise NotImplementedError(f"merging needs exactly one active LoRA adapter, got {name}")
        name = name[0]
    return str(name)


def lora_specs(model: nn.Module, adapter: Optional[str] = None) -> Dict[str, LoraSpec]:
    """``{plain HF module name: LoraSpec}`` of every layer of ``model`` that carries adapter ``adapter``
    (default: the active one). Works on FSDP2-sharded models (only python attributes are read)."""
    adapter = adapter or active_adapter(model)
    specs: Dict[str, LoraSpec] = {}
    for name, module in model.named_modules():
        embedding_a = getattr(module, "lora_embedding_A", None)
        if isinstance(embedding_a, (dict, nn.ParameterDict)) and adapter in embedding_a:
            raise NotImplementedError(f"merging LoRA embedding adapters ({name}) is not supported")
        lora_a = getattr(module, "lora_A", None)
        scaling = getattr(module, "scaling", None)
        if not isinstance(lora_a, nn.ModuleDict) or not isinstance(scaling, dict) or adapter not in lora_a:
            continue
        if (getattr(module, "use_dora", None) or {}).get(adapter, False):
            raise NotImplementedError(f"merging DoRA adapters ({name}) is not supported")
        if (getattr(module, "lora_bias", None) or {}).get(adapter, False):
            raise NotImplementedError(f"merging LoRA biases ({name}) is not supported")
        if not isinstance(lora_a[adapter], nn.Linear):
            raise NotImplementedError(f"merging {type(lora_a[adapter]).__name__} LoRA layers ({name}) is not supported")
        specs[hf_name(name)] = LoraSpec(float(scaling[adapter]), bool(getattr(module, "fan_in_fan_out", False)))
    return specs


def merge_lora_weight(weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, spec: LoraSpec) -> torch.Tensor:
    """``weight + scaling * (B @ A)`` computed in float32 (at least), returned in ``weight``'s dtype."""
    compute = torch.promote_types(weight.dtype, torch.float32)
    delta = lora_b.to(compute) @ lora_a.to(compute)
    if spec.fan_in_fan_out:
        delta = delta.T
    return (weight.to(compute) + delta * spec.scaling).to(weight.dtype)


def merged_named_tensors(named_tensors: Iterable[Tuple[str, torch.Tensor]], specs: Dict[str, LoraSpec],
                         adapter: str = "default") -> Iterator[Tuple[str, torch.Tensor]]:
    """``(plain HF name, tensor)`` of the merged model from a peft model's ``(name, tensor)`` pairs.

    Adapted layers (keys of ``specs``, see :func:`lora_specs`) yield ``name.weight = W + scaling * B @ A``
    once their ``W``, ``A`` and ``B`` have all been seen (any order; only that layer's three tensors are
    held meanwhile); their base bias passes through under the plain name. Adapter weights of other
    adapters are dropped; every other tensor passes through renamed by :func:`hf_name`. ValueError when
    the stream ends with a layer incomplete or holds a peft tensor this function does not understand.
    """
    pending: Dict[str, Dict[str, torch.Tensor]] = {}

    def complete(module: str) -> Optional[Tuple[str, torch.Tensor]]:
        parts = pending[module]
        if len(parts) < 3:
            return None
        del pending[module]
        return f"{module}.weight", merge_lora_weight(parts["W"], parts["A"], parts["B"], specs[module])

    for name, tensor in named_tensors:
        m = _LORA_RE.match(name)
        if m:
            if m.group("adapter") != adapter:
                continue
            module = hf_name(m.group("module"))
            if module not in specs:
                raise ValueError(f"{name}: LoRA weight of a layer without a LoraSpec")
            pending.setdefault(module, {})[m.group("which")] = tensor
            done = complete(module)
            if done is not None:
                yield done
            continue
        if "lora_" in name or ".modules_to_save." in name or ".original_module." in name:
            raise ValueError(f"{name}: peft tensor not supported by the LoRA merge")
        m = _BASE_RE.match(name)
        if m and m.group("param") == "weight":
            module = hf_name(m.group("module"))
            if module not in specs:
                raise ValueError(f"{name}: base layer without a LoraSpec for adapter {adapter!r}")
            pending.setdefault(module, {})["W"] = tensor
            done = complete(module)
            if done is not None:
                yield done
            continue
        yield hf_name(name), tensor
    if pending:
        missing = {k: sorted({"W", "A", "B"} - set(v)) for k, v in pending.items()}
        raise ValueError(f"LoRA merge: incomplete layers at the end of the stream: {missing}")


def merged_state_dict(model: nn.Module, state: Optional[Dict[str, torch.Tensor]] = None) -> Dict[str, torch.Tensor]:
    """The merged model's state dict under plain HF names. ``state``: the peft model's full state dict
    (default ``model.state_dict()``); it is consumed (emptied as the merge proceeds), so the unmerged
    and the merged weights of a layer are not all held at once."""
    state = dict(model.state_dict()) if state is None else state
    adapter = active_adapter(model)
    stream = ((name, state.pop(name)) for name in list(state))
    return dict(merged_named_tensors(stream, lora_specs(model, adapter), adapter))


def save_lora_adapter(model: nn.Module, state: Dict[str, torch.Tensor], out_dir: os.PathLike,
                      base_model_name_or_path: Optional[str] = None) -> str:
    """Write the active adapter in peft's format (``adapter_config.json`` + ``adapter_model.safetensors``),
    loadable with ``peft.PeftModel.from_pretrained(base_model, out_dir)``. ``state`` is the peft model's
    full state dict (e.g. gathered from FSDP2 shards); only its adapter tensors are written."""
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    adapter = active_adapter(model)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    adapter_state = get_peft_model_state_dict(model, state_dict=state, adapter_name=adapter)
    adapter_state = {k: v.detach().contiguous().cpu() for k, v in adapter_state.items()}
    save_file(adapter_state, str(out / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    config = model.peft_config[adapter]
    config.save_pretrained(str(out))
    cfg_path = out / ADAPTER_CONFIG
    data = json.loads(cfg_path.read_text())
    data["inference_mode"] = True  # as peft's own save_pretrained writes it
    if base_model_name_or_path:
        data["base_model_name_or_path"] = str(base_model_name_or_path)
    if isinstance(data.get("target_modules"), list):
        data["target_modules"] = sorted(data["target_modules"])
    cfg_path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    return str(out)


def base_hf_model(model: nn.Module) -> nn.Module:
    """The transformers model inside a peft wrapper (itself when not a peft model)."""
    return model.get_base_model() if is_peft_model(model) and hasattr(model, "get_base_model") else model
