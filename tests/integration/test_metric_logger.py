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


def test_a_point_the_server_refuses_is_dropped_alone(tmp_path):
    good = client(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = good.create_experiment("e", artifact_location=(tmp_path / "a").as_uri())
    run_id = good.create_run(exp).info.run_id
    logger = MetricLogger(good, run_id, interval=3600)
    logger.log({"loss": 1.0, "bad?key": 2.0}, 1)  # MLflow refuses the name (INVALID_PARAMETER_VALUE)
    logger.log({"loss": 0.9}, 2)
    assert logger.close(timeout=5)  # the refused point does not hold the rest back
    assert sorted(m.step for m in good.get_metric_history(run_id, "loss")) == [1, 2]
    assert logger.dropped == 1


def test_every_failed_send_is_bounded(monkeypatch, caplog):
    """Carousel's HTTP bounds, measured: a refused port and a server that accepts and never answers."""
    import socket

    from mlflow.entities import Metric
    from mlflow.exceptions import MlflowException

    from carousel.tracking.store import HTTP_BOUNDS

    for k, v in HTTP_BOUNDS.items():
        monkeypatch.setenv(k, v)  # what client() applies where the user chose nothing
    refused = client(f"http://127.0.0.1:{free_port()}")
    point = [Metric("loss", 1.0, 0, 1)]
    t0 = time.time()
    with pytest.raises(MlflowException):
        refused.log_batch("0" * 32, metrics=point)
    refused_s = time.time() - t0
    assert refused_s < 7  # MLflow's own defaults: ~4 minutes (7 retries, exponential backoff)

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "1")  # the real default is 10: same shape, 10x shorter
    with socket.socket() as mute:
        mute.bind(("127.0.0.1", 0))
        mute.listen(16)  # the kernel accepts the connections; nobody ever answers
        silent = client(f"http://127.0.0.1:{mute.getsockname()[1]}")
        t0 = time.time()
        with pytest.raises(MlflowException):
            silent.log_batch("0" * 32, metrics=point)
        silent_s = time.time() - t0
    retries = int(HTTP_BOUNDS["MLFLOW_HTTP_REQUEST_MAX_RETRIES"])
    assert retries + 1 <= silent_s < (retries + 1) * 1 + 2 * 2 + 1 + 1  # attempts x timeout + backoff + jitter + slack

    # A logger whose server never comes back gives up when told, and says what is missing.
    logger = MetricLogger(refused, "0" * 32, interval=3600)
    for step in (1, 2, 3):
        logger.log({"loss": 1.0}, step)
    t0 = time.time()
    assert logger.close(timeout=2) is False
    close_s = time.time() - t0
    assert close_s < 2 + refused_s + 2
    assert "missing 3 metric points (steps 1..3)" in caplog.text
    print(f"failed send: refused port {refused_s:.1f}s; silent server {silent_s:.1f}s at a 1 s timeout "
          f"(so ~{(retries + 1) * int(HTTP_BOUNDS['MLFLOW_HTTP_REQUEST_TIMEOUT']) + 5}s at Carousel's "
          f"{HTTP_BOUNDS['MLFLOW_HTTP_REQUEST_TIMEOUT']} s); close(timeout=2) gave up after {close_s:.1f}s")


def test_points_a_checkpoint_carries_arrive_once_after_a_restart(tmp_path):
    """Rank 0 puts its unsent points in each checkpoint: a worker killed before its next send must
    not take steps the checkpoint covers (which are never replayed) with it."""
    import torch

    c = client(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = c.create_experiment("e", artifact_location=(tmp_path / "a").as_uri())
    run_id = c.create_run(exp).info.run_id
    before_kill = MetricLogger(c, run_id, interval=3600)
    for step in range(1, 4):
        before_kill.log({"loss": 1.0 / step}, step)
    before_kill.flush()  # steps 1-3 reached the server
    for step in range(4, 7):
        before_kill.log({"loss": 1.0 / step}, step)  # steps 4-6 had not when the worker died
    torch.save({"unsent_metrics": before_kill.unsent()}, tmp_path / "rank-0.pt")
    state = torch.load(tmp_path / "rank-0.pt", weights_only=True)  # as the loop reads it back

    restarted = MetricLogger(c, run_id, interval=3600, skip_through_step=last_logged_step(c, run_id, "loss"))
    restarted.resend(state["unsent_metrics"])
    restarted.resend(state["unsent_metrics"])  # twice (a second restart): still once each
    assert restarted.flush()
    assert sorted(m.step for m in c.get_metric_history(run_id, "loss")) == [1, 2, 3, 4, 5, 6]
