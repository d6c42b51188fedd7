"""Rank 0's metric logger against real MLflow stores: buffered, deduplicated, never blocking."""

import time

import pytest

from carousel.tracking.metrics import MetricLogger, last_logged_step
from carousel.tracking.store import client
from conftest import free_port

pytestmark = pytest.mark.integration


def test_points_survive_an_unreachable_server_and_arrive_once(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    good = client(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = good.create_experiment("e", artifact_location=(tmp_path / "a").as_uri())
    run_id = good.create_run(exp).info.run_id

    dead = client(f"http://127.0.0.1:{free_port()}")  # nothing listens there
    logger = MetricLogger(dead, run_id, interval=3600)
    t0 = time.time()
    for step in range(1, 6):
        logger.log({"loss": 1.0 / step}, step)
    logger.log({"loss": 0.5}, 2)  # a replayed step overwrites, never duplicates
    assert time.time() - t0 < 0.5  # logging never waits for the server
    assert logger.flush() is False and logger.failures == 1

    logger.client = good  # the server is back
    assert logger.close(timeout=10)
    hist = good.get_metric_history(run_id, "loss")
    assert [m.step for m in sorted(hist, key=lambda m: m.step)] == [1, 2, 3, 4, 5]
    assert {m.step: m.value for m in hist}[2] == 0.5
    assert last_logged_step(good, run_id, "loss") == 5

    replay = MetricLogger(good, run_id, interval=3600, skip_through_step=5)
    replay.log({"loss": 9.0}, 5)
    replay.log({"loss": 0.1}, 6)
    replay.close()
    assert sorted(m.step for m in good.get_metric_history(run_id, "loss")) == [1, 2, 3, 4, 5, 6]
