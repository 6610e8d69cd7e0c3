"""Checkpoint folders: atomic writes, a `latest` pointer, keep-last-N, resume resolution, RNG state.

Layout of `trainer.default_local_dir` (verl's names):
    global_step_<N>/
        actor/            model + optimiser shards (torch.distributed.checkpoint), scheduler and RNG
                          state per rank, and `huggingface/` (the actor as a Hugging Face folder);
                          with LoRA the shards hold the adapter only, `huggingface/` is the merged
                          model and `lora_adapter/` the adapter in peft's format
        critic/           same for the value model
        trainer_state.pt  global step, dataloader position, KL-controller state, driver RNG state
    latest_checkpointed_iteration.txt   the step number of the newest complete checkpoint

A checkpoint is written into a hidden temporary folder next to its final place and renamed when
every part is on disk; a crash mid-save leaves the previous checkpoint and pointer untouched.
"""

from __future__ import annotations

import logging
import os
import random
import re
import shutil
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np
import torch

logger = logging.getLogger(__name__)

LATEST_FILE = "latest_checkpointed_iteration.txt"
STEP_DIR = re.compile(r"^global_step_(\d+)$")
TMP_PREFIX = ".tmp_global_step_"
TRAINER_STATE = "trainer_state.pt"


def get_rng_state() -> Dict[str, Any]:
    """The state of every RNG a training step draws from (python, numpy, torch CPU and CUDA)."""
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def step_of(path: os.PathLike) -> Optional[int]:
    m = STEP_DIR.match(Path(path).name)
    return int(m.group(1)) if m else None


class CheckpointManager:
    """Owns the checkpoint folder of one run (see the module docstring for the layout)."""

    def __init__(self, root: os.PathLike, max_to_keep: Optional[int] = None):
        self.root = Path(root)
        self.max_to_keep = max_to_keep

    # ---- writing
    def begin(self, step: int) -> Path:
        """A fresh temporary folder to write the checkpoint of `step` into."""
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.root / f"{TMP_PREFIX}{step}_{os.getpid()}_{int(time.time() * 1e3)}"
        tmp.mkdir()
        return tmp

    def commit(self, tmp: Path, step: int) -> Path:
        """Rename the finished temporary folder to `global_step_<step>`, move the pointer, prune."""
        final = self.root / f"global_step_{step}"
        if final.exists():  # a re-run of the same step replaces the old folder
            trash = self.root / f".trash_global_step_{step}_{os.getpid()}"
            os.replace(final, trash)
            os.replace(tmp, final)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp, final)
        _write_atomic(self.root / LATEST_FILE, str(step))
        self.prune()
        return final

    def abort(self, tmp: Path) -> None:
        shutil.rmtree(tmp, ignore_errors=True)

    def prune(self) -> List[Path]:
        """Delete the oldest checkpoints beyond `max_to_keep`; returns the deleted folders."""
        if not self.max_to_keep:
            return []
        steps = self.list_steps()
        removed = []
        for step in steps[: max(0, len(steps) - self.max_to_keep)]:
            path = self.root / f"global_step_{step}"
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
        return removed

    def clean_stale(self) -> None:
        """Remove temporary folders left by a run that died while saving."""
        if not self.root.is_dir():
            return
        for child in self.root.iterdir():
            if child.name.startswith((TMP_PREFIX, ".trash_global_step_")):
                shutil.rmtree(child, ignore_errors=True)

    # ---- reading
    def list_steps(self) -> List[int]:
        if not self.root.is_dir():
            return []
        return sorted(s for s in (step_of(c) for c in self.root.iterdir() if c.is_dir()) if s is not None)

    def latest(self) -> Optional[Path]:
        """The newest complete checkpoint: the pointer when it names an existing folder, else the
        highest-numbered folder (a pointer can lag if a run died between rename and pointer write)."""
        pointer = self.root / LATEST_FILE
        steps = self.list_steps()
        if pointer.is_file():
            try:
                step = int(pointer.read_text().strip())
                path = self.root / f"global_step_{step}"
                if path.is_dir() and (not steps or step >= steps[-1]):
                    return path
            except ValueError:
                logger.warning("ignoring unreadable %s", pointer)
        return self.root / f"global_step_{steps[-1]}" if steps else None

    def resolve_resume(self, mode: str, resume_from_path: Optional[str] = None) -> Optional[Path]:
        """`resume_mode` -> the folder to resume from, or None to start fresh.
        auto: the latest checkpoint if there is one; disable: none; resume_path: `resume_from_path`;
        anything else: that path. An explicit path that is not a checkpoint folder is an error."""
        if mode == "disable":
            return None
        if mode == "auto":
            return self.latest()
        path = Path(resume_from_path if mode == "resume_path" else mode)
        if step_of(path) is None and (path / LATEST_FILE).is_file():
            path = CheckpointManager(path).latest() or path  # a run folder: take its latest
        if step_of(path) is None or not path.is_dir():
            raise FileNotFoundError(f"resume checkpoint {str(path)!r} is not a global_step_<N> folder")
        return path


def save_trainer_state(folder: Path, state: Dict[str, Any]) -> None:
    torch.save(state, folder / TRAINER_STATE)


def load_trainer_state(folder: Path) -> Dict[str, Any]:
    # weights_only=False: the state holds numpy RNG tuples and plain python objects we wrote ourselves
    return torch.load(folder / TRAINER_STATE, map_location="cpu", weights_only=False)
