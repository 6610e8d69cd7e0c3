"""Checkpoint folders: atomic writes, a `latest` pointer, keep-last-N, resume resolution.

Layout of `trainer.default_local_dir` (verl's names; each spelled once, below, and imported by
every module that reads or writes it; the names inside a worker's folder, HF_DIR, LORA_ADAPTER_DIR,
SHARDS_DIR and EXTRA_STATE, are the worker's: deepretrieval.workers.checkpoint_files; the RNG
state: deepretrieval.seeding):
    global_step_<N>/      STEP_PREFIX, `step_dir_name`, `step_of`
        actor/            ACTOR_DIR: model + optimiser shards (torch.distributed.checkpoint), scheduler
                          and RNG state per rank, and `huggingface/` (HF_DIR: the actor as a Hugging
                          Face folder); with LoRA the shards hold the adapter only, `huggingface/` is
                          the merged model and `lora_adapter/` (LORA_ADAPTER_DIR) the adapter in
                          peft's format
        critic/           CRITIC_DIR: same for the value model
        trainer_state.pt  TRAINER_STATE: global step, dataloader position, KL-controller state,
                          driver RNG state
        prompt.json       PROMPT_FILE: how the policy was prompted (style, data sources, chat
                          template, prefix, prompt length): also in `actor/huggingface/`; evaluation
                          prompts that way
        COMPLETE.json     MARKER: the completion marker, written last: size and CRC-32 of every
                          other file
    latest_checkpointed_iteration.txt   LATEST_FILE: the step number of the newest complete checkpoint

`resolve_model_dir` finds the Hugging Face folder in a checkpoint (or a checkpoint root) for
evaluation.

A checkpoint is written into a hidden temporary folder next to its final place. When every part is
there, each file is fsynced, the marker (sizes and checksums) is written and fsynced, the folder is
renamed to `global_step_<N>` and the parent folder fsynced; only then does the pointer move. A
crash mid-save leaves the previous checkpoint and pointer untouched.

Resume (`resume_mode=auto`) only takes a checkpoint whose marker is present and whose files all
match it (`verify`): an empty `global_step_N`, one without `trainer_state.pt` or without a marker,
or one with a truncated or altered file is skipped with a warning, and the newest complete one
before it is used. An explicitly named checkpoint that fails the check is an error.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
import zlib
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import torch

from deepretrieval.workers.checkpoint_files import HF_DIR

logger = logging.getLogger(__name__)

LATEST_FILE = "latest_checkpointed_iteration.txt"
STEP_PREFIX = "global_step_"
STEP_DIR = re.compile(rf"^{STEP_PREFIX}(\d+)$")
TMP_PREFIX = f".tmp_{STEP_PREFIX}"
TRASH_PREFIX = f".trash_{STEP_PREFIX}"
ACTOR_DIR = "actor"
CRITIC_DIR = "critic"
TRAINER_STATE = "trainer_state.pt"
MARKER = "COMPLETE.json"
MARKER_VERSION = 1
_CHUNK = 1 << 22


class IncompleteCheckpoint(FileNotFoundError):
    """A checkpoint folder that is not a complete, intact checkpoint (the message says why)."""


def _fsync_dir(path: Path) -> None:
    """Make a rename or a new entry in `path` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(str(path), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def file_crc32(path: Path) -> int:
    """CRC-32 of a file's bytes, read in 4 MiB chunks (catches truncation and torn writes; not a
    defence against deliberate tampering)."""
    crc = 0
    with open(path, "rb") as fh:
        while True:
            chunk = fh.read(_CHUNK)
            if not chunk:
                return crc
            crc = zlib.crc32(chunk, crc)


def _files_under(folder: Path) -> List[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MARKER)


def build_manifest(folder: Path, fsync: bool = True) -> Dict[str, Dict[str, int]]:
    """{relative path: {"size", "crc32"}} of every file under `folder` (the marker excluded), each
    file fsynced first when `fsync` (the workers wrote them; their data must be on disk before the
    marker says so), then every sub-folder."""
    manifest: Dict[str, Dict[str, int]] = {}
    for path in _files_under(folder):
        if fsync:
            fd = os.open(str(path), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        manifest[path.relative_to(folder).as_posix()] = {"size": path.stat().st_size, "crc32": file_crc32(path)}
    if fsync:
        for sub in sorted({p.parent for p in folder.rglob("*")} | {folder}, key=lambda p: -len(p.parts)):
            _fsync_dir(sub)
    return manifest


def write_marker(folder: Path, step: int, manifest: Dict[str, Dict[str, int]]) -> None:
    """The completion marker, written (and fsynced) after every file it lists."""
    _write_atomic(folder / MARKER, json.dumps({"version": MARKER_VERSION, "step": int(step),
                                                "files": manifest}, indent=1, sort_keys=True))


def verify(folder: Path, required: Sequence[str] = (TRAINER_STATE,), checksums: bool = True) -> None:
    """Raise IncompleteCheckpoint unless `folder` holds a marker, every `required` file, and every
    file the marker lists with its recorded size (and CRC-32 when `checksums`)."""
    folder = Path(folder)
    marker = folder / MARKER
    if not folder.is_dir():
        raise IncompleteCheckpoint(f"{folder} is not a folder")
    if not marker.is_file():
        if not any(folder.iterdir()):
            raise IncompleteCheckpoint(f"{folder.name} is empty")
        if not (folder / TRAINER_STATE).is_file() and TRAINER_STATE in required:
            raise IncompleteCheckpoint(f"{folder.name} lacks {TRAINER_STATE} and its completion marker {MARKER}")
        raise IncompleteCheckpoint(f"{folder.name} has no completion marker {MARKER} (save interrupted, "
                                   "or written by a version without markers)")
    try:
        data = json.loads(marker.read_text(encoding="utf-8"))
        files = data["files"]
        if not isinstance(files, dict):
            raise TypeError("files is not a mapping")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise IncompleteCheckpoint(f"{folder.name}: unreadable {MARKER} ({exc})") from None
    for name in required:
        if name not in files or not (folder / name).is_file():
            raise IncompleteCheckpoint(f"{folder.name} lacks {name}")
    for rel, meta in files.items():
        path = folder / rel
        if not path.is_file():
            raise IncompleteCheckpoint(f"{folder.name}: {rel} is missing")
        size = path.stat().st_size
        if size != int(meta["size"]):
            raise IncompleteCheckpoint(f"{folder.name}: {rel} has {size} bytes, {meta['size']} were written "
                                       "(truncated or overwritten)")
        if checksums and file_crc32(path) != int(meta["crc32"]):
            raise IncompleteCheckpoint(f"{folder.name}: {rel} does not match its checksum (damaged)")


def step_dir_name(step: "int | str") -> str:
    """The folder name of the checkpoint of `step` (`global_step_<step>`)."""
    return f"{STEP_PREFIX}{step}"


def step_of(path: os.PathLike) -> Optional[int]:
    """The step of a `global_step_<N>` folder (by its name), else None."""
    m = STEP_DIR.match(Path(path).name)
    return int(m.group(1)) if m else None


class CheckpointManager:
    """Owns the checkpoint folder of one run (see the module docstring for the layout)."""

    def __init__(self, root: os.PathLike, max_to_keep: Optional[int] = None,
                 required: Sequence[str] = (TRAINER_STATE,)):
        self.root = Path(root)
        self.max_to_keep = max_to_keep
        self.required = tuple(required)

    # ---- writing
    def begin(self, step: int) -> Path:
        """A fresh temporary folder to write the checkpoint of `step` into."""
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.root / f"{TMP_PREFIX}{step}_{os.getpid()}_{int(time.time() * 1e3)}"
        tmp.mkdir()
        return tmp

    def commit(self, tmp: Path, step: int) -> Path:
        """Fsync the finished temporary folder, write its completion marker, rename it to
        `global_step_<step>`, move the pointer, prune."""
        missing = [name for name in self.required if not (tmp / name).is_file()]
        if missing:
            raise IncompleteCheckpoint(f"refusing to commit step {step}: {', '.join(missing)} not written")
        write_marker(tmp, step, build_manifest(tmp))
        final = self.root / step_dir_name(step)
        if final.exists():  # a re-run of the same step replaces the old folder
            trash = self.root / f"{TRASH_PREFIX}{step}_{os.getpid()}"
            os.replace(final, trash)
            os.replace(tmp, final)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp, final)
        _fsync_dir(self.root)
        _write_atomic(self.root / LATEST_FILE, str(step))
        self.prune()
        return final

    def abort(self, tmp: Path) -> None:
        shutil.rmtree(tmp, ignore_errors=True)

    def prune(self) -> List[Path]:
        """Delete the oldest checkpoints beyond `max_to_keep`; returns the deleted folders. Only
        folders with a completion marker count (and are deleted): a damaged newer folder never
        pushes a complete one out."""
        if not self.max_to_keep:
            return []
        steps = [s for s in self.list_steps() if (self.root / step_dir_name(s) / MARKER).is_file()]
        removed = []
        for step in steps[: max(0, len(steps) - self.max_to_keep)]:
            path = self.root / step_dir_name(step)
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
        return removed

    def clean_stale(self) -> None:
        """Remove temporary folders left by a run that died while saving."""
        if not self.root.is_dir():
            return
        for child in self.root.iterdir():
            if child.name.startswith((TMP_PREFIX, TRASH_PREFIX)):
                shutil.rmtree(child, ignore_errors=True)

    # ---- reading
    def list_steps(self) -> List[int]:
        if not self.root.is_dir():
            return []
        return sorted(s for s in (step_of(c) for c in self.root.iterdir() if c.is_dir()) if s is not None)

    def latest(self, checksums: bool = True) -> Optional[Path]:
        """The newest complete checkpoint (see `verify`), newest step first; each folder skipped on
        the way is logged with the reason. The pointer is only a hint: it can lag (a run died
        between rename and pointer write) or name a folder that was damaged since."""
        pointer = self.root / LATEST_FILE
        if pointer.is_file():
            try:
                int(pointer.read_text().strip())
            except ValueError:
                logger.warning("ignoring unreadable %s", pointer)
        for step in reversed(self.list_steps()):
            path = self.root / step_dir_name(step)
            try:
                verify(path, self.required, checksums=checksums)
            except IncompleteCheckpoint as exc:
                logger.warning("skipping checkpoint %s: %s; falling back to an older one", path, exc)
                continue
            return path
        return None

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
            path = CheckpointManager(path, required=self.required).latest() or path  # a run folder: its latest
        if step_of(path) is None or not path.is_dir():
            raise FileNotFoundError(f"resume checkpoint {str(path)!r} is not a {STEP_PREFIX}<N> folder")
        try:
            verify(path, self.required)
        except IncompleteCheckpoint as exc:
            raise IncompleteCheckpoint(f"resume checkpoint {str(path)!r} is not complete: {exc}") from None
        return path


def save_trainer_state(folder: Path, state: Dict[str, Any]) -> None:
    with open(folder / TRAINER_STATE, "wb") as fh:
        torch.save(state, fh)
        fh.flush()
        os.fsync(fh.fileno())


def load_trainer_state(folder: Path) -> Dict[str, Any]:
    # weights_only=False: the state holds numpy RNG tuples and plain python objects we wrote ourselves
    return torch.load(folder / TRAINER_STATE, map_location="cpu", weights_only=False)


# ---------------------------------------------------------------- how the policy was prompted

# Written into every checkpoint (`global_step_N/`) and its HF export (`actor/huggingface/`) by the
# trainer; evaluation (deepretrieval.eval) renders prompts the way it says.
PROMPT_FILE = "prompt.json"
HF_EXPORT_DIR = f"{ACTOR_DIR}/{HF_DIR}"  # the actor's Hugging Face folder inside a checkpoint
PROMPT_FILE_VERSION = 1
# the data settings that change the text or the tokens of a prompt (deepretrieval.data.dataset)
PROMPT_DATA_KEYS = ("prompt_key", "apply_chat_template", "assistant_prefix", "max_prompt_length", "truncation")


def prompt_settings(rows: Sequence[Dict[str, Any]], data_config: Dict[str, Any]) -> Dict[str, Any]:
    """What a policy's input depended on during training, from the training rows (each row's
    `extra_info` as the dataset completes it) and the dataset's data settings: the prompt style
    (`prompt_style`: the one style of every row, None when they mix styles or have none;
    `prompt_styles`: every style seen), the data sources, and the settings of `PROMPT_DATA_KEYS` (`assistant_prefix`:
    the override of every row's own prefix, None when the rows' own were used)."""
    from deepretrieval.data.dataset import row_extra_info

    styles, sources = set(), set()
    for row in rows:
        styles.add(row_extra_info(row).get("prompt_style"))
        sources.add(str(row.get("data_source")))
    return {
        "version": PROMPT_FILE_VERSION,
        "prompt_style": next(iter(styles)) if len(styles) == 1 else None,
        "prompt_styles": sorted(str(style) for style in styles if style),
        "data_sources": sorted(sources),
        **{key: data_config.get(key) for key in PROMPT_DATA_KEYS},
    }


def write_prompt_settings(folder: os.PathLike, settings: Dict[str, Any]) -> Path:
    """`settings` as `<folder>/prompt.json` (atomically); returns the path."""
    path = Path(folder) / PROMPT_FILE
    _write_atomic(path, json.dumps(settings, indent=1, sort_keys=True) + "\n")
    return path


def read_prompt_settings(folder: os.PathLike) -> Optional[Dict[str, Any]]:
    """The prompt settings stored in a model folder or checkpoint (`prompt.json`); None when it has
    none (a model not trained here, or a checkpoint of an older version). An unreadable file is an
    error (IncompleteCheckpoint), not a silent fallback to other prompts."""
    path = Path(folder) / PROMPT_FILE
    if not path.is_file():
        return None
    try:
        settings = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise IncompleteCheckpoint(f"unreadable {path} ({exc})") from None
    if not isinstance(settings, dict):
        raise IncompleteCheckpoint(f"{path} does not hold a JSON object")
    return settings


def save_prompt_settings(folder: os.PathLike, dataset: Any) -> Dict[str, Any]:
    """Write the prompt settings of a training `dataset` (an RLHFDataset: its `rows` and `config`)
    into the checkpoint `folder` and into its HF export (`actor/huggingface/`) when there is one,
    so the exported model carries them too; returns them."""
    settings = prompt_settings(getattr(dataset, "rows", None) or [], dict(getattr(dataset, "config", None) or {}))
    folder = Path(folder)
    write_prompt_settings(folder, settings)
    if (folder / HF_EXPORT_DIR).is_dir():
        write_prompt_settings(folder / HF_EXPORT_DIR, settings)
    return settings


def choose_prompt_style(settings: Optional[Dict[str, Any]], requested: Optional[str] = None, force: bool = False,
                        model: str = "the model") -> Optional[str]:
    """The prompt style to evaluate a model with, given its stored `settings` (`read_prompt_settings`)
    and an explicitly `requested` style: the requested one if the model has no settings or was
    trained with it (or `force`), else the stored one; None when neither says (the evaluation rows
    are used as prepared). Raises ValueError for a requested style the model was not trained with
    (unless `force`), and for a model trained on several styles when none is requested."""
    trained = (settings or {}).get("prompt_style")
    known = list((settings or {}).get("prompt_styles") or ([trained] if trained else []))
    if requested is not None:
        if known and requested not in known and not force:
            raise ValueError(
                f"{model} was trained with prompt style {' and '.join(map(repr, known))} ({PROMPT_FILE}), not "
                f"{requested!r}: leave the prompt style unset to prompt it as it was trained, or force "
                f"{requested!r} (--force-prompt-style) to evaluate it with prompts it never saw")
        return requested
    if trained is None and len(known) > 1:
        raise ValueError(f"{model} was trained on prompts of several styles ({', '.join(known)}; {PROMPT_FILE}): "
                         "choose one (--prompt-style)")
    return trained


def resolve_model_dir(path: "str | os.PathLike[str]") -> Path:
    """A Hugging Face model folder from `path`: the folder itself (it has config.json), or a trainer
    checkpoint holding one (`global_step_N/actor/huggingface`, `.../hf`), or a checkpoint root
    (the step named in latest_checkpointed_iteration.txt, else the highest global_step_N)."""
    root = Path(path)
    if (root / "config.json").exists():
        return root
    if not root.is_dir():
        raise FileNotFoundError(f"no model at {root}")
    latest = root / LATEST_FILE
    steps = sorted(
        (p for p in root.iterdir() if p.is_dir() and re.fullmatch(rf"{STEP_PREFIX}\d+", p.name)),
        key=lambda p: int(p.name.rsplit("_", 1)[1]),
    )
    if latest.exists() and (root / step_dir_name(latest.read_text().strip())).is_dir():
        return resolve_model_dir(root / step_dir_name(latest.read_text().strip()))
    if steps:
        return resolve_model_dir(steps[-1])
    # `hf` is accepted for folders exported by other tools
    for sub in (HF_EXPORT_DIR, f"{ACTOR_DIR}/hf", HF_DIR, "hf", ACTOR_DIR):
        if (root / sub / "config.json").exists():
            return root / sub
    raise FileNotFoundError(f"{root} is neither a Hugging Face model folder nor a checkpoint holding one")
