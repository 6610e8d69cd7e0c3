"""Experiment tracking: one `Tracking.log(metrics, step)` call fans out to the configured backends.

Backends (`trainer.logger`): `console` (one readable line per step), `jsonl` (one JSON object per
step in `<log_dir>/metrics.jsonl`), `wandb` (offline unless an API key is configured), `tensorboard`
(`<log_dir>/tensorboard`). The configuration given to the backends passes through
`redact_secrets` first, so API keys and tokens never reach a log.
"""

from __future__ import annotations

import json
import logging
import math
import netrc
import os
import re
from pathlib import Path
from typing import Any, Callable, Dict, Mapping, Optional, Sequence

logger = logging.getLogger(__name__)

SECRET_KEY = re.compile(r"(api[_-]?key|token|secret|password|passwd|credential|auth|cookie)", re.IGNORECASE)
# keys that match the pattern but hold no secret (token counts, tokenizer paths)
NOT_SECRET = re.compile(r"(tokenizer|tokens?_?(num|count|per|len)|max_tokens|num_batched_tokens|_tokens$|token_num)", re.IGNORECASE)
REDACTED = "***"


def _redact_all(obj: Any) -> Any:
    if isinstance(obj, Mapping):  # e.g. an `auth:` section: every leaf is secret
        return {k: _redact_all(v) for k, v in obj.items()}
    return REDACTED


def redact_secrets(obj: Any) -> Any:
    """A copy of a nested dict/list with the values of secret-looking keys replaced by '***'."""
    if isinstance(obj, Mapping):
        out = {}
        for key, value in obj.items():
            k = str(key)
            if SECRET_KEY.search(k) and not NOT_SECRET.search(k) and value not in (None, "", [], {}):
                out[key] = _redact_all(value)
            else:
                out[key] = redact_secrets(value)
        return out
    if isinstance(obj, (list, tuple)):
        return [redact_secrets(v) for v in obj]
    return obj


def _scalar(value: Any) -> Optional[float]:
    try:
        import numpy as np
        import torch

        if isinstance(value, torch.Tensor):
            value = value.detach().float().mean().item() if value.numel() else None
        elif isinstance(value, np.ndarray):
            value = float(value.mean()) if value.size else None
        elif isinstance(value, np.generic):
            value = value.item()
    except ImportError:  # pragma: no cover - torch/numpy are dependencies
        pass
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, (int, float)):
        return float(value)
    return None


def to_scalars(metrics: Mapping[str, Any]) -> Dict[str, float]:
    """Numeric metrics as floats (tensors / arrays averaged); non-numeric values are dropped."""
    out = {}
    for key, value in metrics.items():
        v = _scalar(value)
        if v is not None:
            out[str(key)] = v
    return out


# --------------------------------------------------------------------------------------------
# backends


class ConsoleBackend:
    """One line per step with the metrics people watch; everything else goes to the other backends."""

    HEADLINE = (
        ("critic/score/mean", "score"),
        ("reward/recall/mean", "recall"),
        ("critic/rewards/mean", "reward"),
        ("actor/pg_loss", "pg_loss"),
        ("actor/ppo_kl", "ppo_kl"),
        ("actor/entropy", "entropy"),
        ("actor/reward_kl_penalty", "kl"),
        ("critic/vf_loss", "vf_loss"),
        ("response_length/mean", "resp_len"),
        ("perf/throughput", "tok/s"),
        ("timing_s/step", "step_s"),
    )

    VAL_HEADLINE = ("/recall_mean", "/score_mean")

    def __init__(self, write: Optional[Callable[[str], None]] = None):
        if write is None:
            try:
                from tqdm import tqdm

                write = tqdm.write  # does not break a running progress bar
            except ImportError:  # pragma: no cover
                write = print
        self.write = write

    @staticmethod
    def _fmt(v: float) -> str:
        if v == 0 or (1e-3 <= abs(v) < 1e5):
            return f"{v:.4g}"
        return f"{v:.3e}"

    def format(self, metrics: Mapping[str, float], step: int) -> str:
        parts = [f"step {step}"]
        shown = set()
        for key, label in self.HEADLINE:
            if key in metrics:
                parts.append(f"{label} {self._fmt(metrics[key])}")
                shown.add(key)
        # validation: the headline numbers of each data source (all of them go to the other backends)
        for key in sorted(metrics):
            if key.startswith("val/") and key.endswith(self.VAL_HEADLINE) and key.count("/") == 2:
                parts.append(f"{key} {self._fmt(metrics[key])}")
        return " | ".join(parts)

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        self.write(self.format(metrics, step))

    def finish(self) -> None:
        pass


class JsonlBackend:
    """Appends `{"step": step, **metrics}` to `<log_dir>/metrics.jsonl` (one line per call, flushed)."""

    def __init__(self, log_dir: Path):
        log_dir.mkdir(parents=True, exist_ok=True)
        self.path = log_dir / "metrics.jsonl"
        self._fh = open(self.path, "a", encoding="utf-8")

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        row = {"step": step}
        row.update({k: (None if (isinstance(v, float) and not math.isfinite(v)) else v) for k, v in metrics.items()})
        self._fh.write(json.dumps(row, sort_keys=True) + "\n")
        self._fh.flush()

    def finish(self) -> None:
        self._fh.close()


def wandb_has_api_key() -> bool:
    """True when wandb could log in without asking: WANDB_API_KEY or a netrc entry for api.wandb.ai."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        host = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai").split("://")[-1].split("/")[0]
        auth = netrc.netrc().authenticators(host)
        return bool(auth and auth[2])
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


class WandbBackend:
    def __init__(self, project: str, name: str, config: Dict[str, Any], log_dir: Path):
        try:
            import wandb
        except ImportError:
            raise RuntimeError("trainer.logger=wandb needs the wandb package (pip install wandb)") from None

        mode = os.environ.get("WANDB_MODE") or ("online" if wandb_has_api_key() else "offline")
        if mode == "offline":
            logger.info("wandb: no API key configured, logging offline to %s (sync later with `wandb sync`)", log_dir)
        log_dir.mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(project=project, name=name, config=config, dir=str(log_dir), mode=mode, reinit=True)

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        self.run.log(dict(metrics), step=step)

    def finish(self) -> None:
        self.run.finish()


class TensorboardBackend:
    def __init__(self, log_dir: Path, config: Dict[str, Any]):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(log_dir / "tensorboard"))
        self.writer.add_text("config", "```\n" + json.dumps(config, indent=1, default=str) + "\n```", 0)

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()

    def finish(self) -> None:
        self.writer.close()


class Tracking:
    """Fans metrics out to the backends named in `backends` (any of console, jsonl, wandb, tensorboard)."""

    SUPPORTED = ("console", "jsonl", "wandb", "tensorboard")

    def __init__(
        self,
        project_name: str,
        experiment_name: str,
        backends: Sequence[str] = ("console",),
        config: Optional[Mapping[str, Any]] = None,
        log_dir: Optional[str] = None,
        console_write: Optional[Callable[[str], None]] = None,
    ):
        if isinstance(backends, str):
            backends = [backends]
        unknown = [b for b in backends if b not in self.SUPPORTED]
        if unknown:
            raise ValueError(f"unknown logger(s) {unknown}; supported: {', '.join(self.SUPPORTED)}")
        self.config = redact_secrets(dict(config or {}))
        self.log_dir = Path(log_dir or os.path.join("logs", project_name, experiment_name))
        self.backends: Dict[str, Any] = {}
        for name in backends:
            if name == "console":
                self.backends[name] = ConsoleBackend(console_write)
            elif name == "jsonl":
                self.backends[name] = JsonlBackend(self.log_dir)
            elif name == "wandb":
                self.backends[name] = WandbBackend(project_name, experiment_name, self.config, self.log_dir)
            elif name == "tensorboard":
                self.backends[name] = TensorboardBackend(self.log_dir, self.config)
        if "jsonl" in self.backends:
            (self.log_dir / "config.json").write_text(json.dumps(self.config, indent=1, default=str))

    def log(self, data: Mapping[str, Any], step: int) -> None:
        metrics = to_scalars(data)
        for name, backend in self.backends.items():
            try:
                backend.log(metrics, step)
            except Exception:  # a broken logger must not end a training run
                logger.exception("logger %s failed at step %d", name, step)

    def finish(self) -> None:
        for backend in self.backends.values():
            try:
                backend.finish()
            except Exception:
                logger.exception("closing logger failed")
        self.backends = {}

    def __del__(self):  # pragma: no cover - best effort
        try:
            for backend in getattr(self, "backends", {}).values():
                if isinstance(backend, JsonlBackend):
                    backend.finish()
        except Exception:
            pass
