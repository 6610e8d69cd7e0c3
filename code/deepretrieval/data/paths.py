"""Where the vendored data lives and where local indexes are built, so no task needs a manual step.

- `data_root()`: the repository's `data/` folder, or `$DEEPRETRIEVAL_DATA_DIR`.
- `cache_root()`: `$DEEPRETRIEVAL_CACHE_DIR`, else the user cache dir (platformdirs).
- `default_index_dir(name)`: `<cache_root>/indexes/<name>` for the vendored corpora.
- `ensure_local_index(name)`: builds that index from the vendored corpus on first use (under a
  file lock, so parallel Ray workers build it once; `build_index` moves a finished index into
  place, so an interrupted build never looks complete).
"""

from __future__ import annotations

import fcntl
import logging
import os
from pathlib import Path
from typing import Dict, Optional

logger = logging.getLogger(__name__)

# local index name -> corpus file under data_root()
LOCAL_CORPORA: Dict[str, str] = {
    "pubmed_mini": "pubmed_mini/corpus.jsonl.gz",
    "trials_sigir": "trials_sigir/corpus.jsonl.gz",
}

# written last by deepretrieval.search.local.build_index: its presence marks a complete index
INDEX_META_FILE = "deepretrieval_index.json"


def data_root() -> Path:
    env = os.environ.get("DEEPRETRIEVAL_DATA_DIR")
    if env:
        return Path(env)
    # code/deepretrieval/data/paths.py -> repository root
    return Path(__file__).resolve().parents[3] / "data"


def cache_root() -> Path:
    """Where indexes, converted models, the search cache and the rate-limit files live."""
    env = os.environ.get("DEEPRETRIEVAL_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    import platformdirs

    return Path(platformdirs.user_cache_dir("deepretrieval"))


def corpus_path(name: str) -> Path:
    if name not in LOCAL_CORPORA:
        raise ValueError(f"no vendored corpus named {name!r}; known: {', '.join(LOCAL_CORPORA)}")
    return data_root() / LOCAL_CORPORA[name]


def default_index_dir(name: str) -> Path:
    return cache_root() / "indexes" / name


def index_ready(index_dir: Path) -> bool:
    """True when `index_dir` holds a finished index whose metadata reads; `ensure_local_index`
    rebuilds a vendored index whose metadata is missing or damaged."""
    if not (Path(index_dir) / INDEX_META_FILE).is_file():
        return False
    from deepretrieval.search.base import SearchUnavailable
    from deepretrieval.search.local import read_index_meta

    try:
        read_index_meta(index_dir)
    except SearchUnavailable as exc:
        logger.warning("%s", exc)
        return False
    return True


def ensure_local_index(name: str, index_dir: Optional[os.PathLike] = None, rebuild: bool = False) -> Path:
    """Return the directory of the local index `name`, building it from the vendored corpus if missing."""
    target = Path(index_dir) if index_dir is not None else default_index_dir(name)
    if index_ready(target) and not rebuild:
        return target
    source = corpus_path(name)
    if not source.exists():
        raise FileNotFoundError(f"corpus for {name!r} not found at {source} (set DEEPRETRIEVAL_DATA_DIR)")
    target.parent.mkdir(parents=True, exist_ok=True)
    lock_path = target.parent / f".{target.name}.lock"
    with open(lock_path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another process may be building it right now
        try:
            if index_ready(target) and not rebuild:
                return target
            from deepretrieval.search.local import build_index

            logger.info("building local index %r from %s (first use)", name, source)
            # build_index builds next to the target and moves the finished index into place
            build_index(str(source), str(target), overwrite=True, progress=False)
            logger.info("local index %r ready at %s", name, target)
            return target
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
