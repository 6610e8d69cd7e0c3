import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "data"
sys.path.insert(0, str(ROOT / "code"))

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: long-running test, excluded from the default suite")
    config.addinivalue_line("markers", "gpu: needs CUDA; skipped without it")


@pytest.fixture(scope="session")
def data_dir() -> Path:
    return DATA
