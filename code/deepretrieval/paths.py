"""Where the vendored data lives and where caches (indexes, models, search results) go.

- `data_root()`: the repository's `data/` folder, or `$DEEPRETRIEVAL_DATA_DIR`.
- `cache_root()`: `$DEEPRETRIEVAL_CACHE_DIR`, else the user cache dir (platformdirs).

The vendored corpora's local indexes (built on first use) are `deepretrieval.search.local_index`'s.
"""

from __future__ import annotations

import os
from pathlib import Path


def data_root() -> Path:
    env = os.environ.get("DEEPRETRIEVAL_DATA_DIR")
    if env:
        return Path(env)
    # code/deepretrieval/paths.py -> repository root
    return Path(__file__).resolve().parents[2] / "data"


def cache_root() -> Path:
    """Where indexes, converted models, the search cache and the rate-limit files live."""
    env = os.environ.get("DEEPRETRIEVAL_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    import platformdirs

    return Path(platformdirs.user_cache_dir("deepretrieval"))
