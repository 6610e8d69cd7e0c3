"""Rollout engines: `BaseRollout` (interface + shared post-processing) and `HFRollout` (in-process HF)."""

from deepretrieval.workers.rollout.base import (BaseRollout, SamplingParams, build_rollout_batch, eos_token_ids,
                                                pad_responses, resolve_sampling, response_mask_from_eos)
from deepretrieval.workers.rollout.hf import HFRollout

__all__ = ["BaseRollout", "HFRollout", "SamplingParams", "build_rollout_batch", "eos_token_ids", "pad_responses",
           "resolve_sampling", "response_mask_from_eos"]
