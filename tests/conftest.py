import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


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
