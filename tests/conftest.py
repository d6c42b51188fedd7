import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def pytest_configure(config):
    # One intra-op thread in the test process: on a 2-core machine shared with Ray workers, two
    # threads contending with another busy process ran small matmuls ~10x slower (shared/facts.md).
    # The training processes the tests start set their own threads from their CPU grant.
    import torch

    torch.set_num_threads(1)


def pytest_collection_modifyitems(items):
    # Integration tests share a Ray cluster and the DeepSpeed JIT cache; run the fast unit tests first.
    items.sort(key=lambda it: "integration" in it.keywords)


@pytest.fixture
def carousel_bin() -> str:
    return str(BIN / "carousel")


@pytest.fixture(autouse=True)
def _no_user_tracking(monkeypatch):
    # Never write into a developer's own MLflow server from tests.
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
