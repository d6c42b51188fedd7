"""Rank 0's metric logger: never blocks the training step, loses nothing, logs each (key, step) once.

Written by hand rather than using MLflow's async logging because that queue neither bounds the
time a failing server can hold a flush nor deduplicates: here points wait in a buffer keyed by
(key, step), a background thread sends them with ``log_batch`` every few seconds, and a failed
send leaves them buffered for the next try (so the history ends complete once the server is back).
Points at or below ``skip_through_step`` were logged before a restart and are dropped, so steps a
restored worker replays appear once.

Re-sending is idempotent: a buffered point keeps its timestamp, and MLflow's SQL store treats an
identical (key, step, timestamp, value) as already there. So a batch whose answer was lost (server
killed after it committed) can be sent again without doubling a step. A batch the server refuses as
invalid (HTTP 4xx other than auth/rate limits) is not retried forever: it is sent point by point and
only the refused points are dropped, with an error naming them.
"""

from __future__ import annotations

import logging
import threading
import time

from mlflow.entities import Metric
from mlflow.tracking import MlflowClient

from carousel.tracking.store import worth_retrying

log = logging.getLogger(__name__)
_BATCH = 1000  # MLflow's log_batch limit on metrics per call


class MetricLogger:
    def __init__(
        self,
        client: MlflowClient,
        run_id: str,
        interval: float = 2.0,
        skip_through_step: int = -1,
        max_buffer: int = 1_000_000,
    ):
        self.client, self.run_id, self.interval = client, run_id, interval
        self.skip_through_step = skip_through_step
        self.max_buffer = max_buffer
        self._buf: dict[tuple[str, int], Metric] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.failures = 0
        self.dropped = 0
        self._thread = threading.Thread(target=self._run, name="carousel-metrics", daemon=True)
        self._thread.start()

    def log(self, metrics: dict[str, float], step: int) -> None:
        if step <= self.skip_through_step:
            return
        now = int(time.time() * 1000)
        with self._lock:
            for k, v in metrics.items():
                self._buf[(k, step)] = Metric(k, float(v), now, step)
            if len(self._buf) > self.max_buffer:
                for key in sorted(self._buf, key=lambda ks: ks[1])[: len(self._buf) - self.max_buffer]:
                    del self._buf[key]
                log.warning("metric buffer full (tracking server down?): dropped the oldest points")

    def unsent(self) -> list[tuple[str, float, int, int]]:
        """The points not yet confirmed by the server, as (key, value, timestamp, step).

        Rank 0 keeps them in each checkpoint: a worker killed before its next send would otherwise
        take points of steps the checkpoint already covers (and so never replays) with it."""
        with self._lock:
            return [(m.key, m.value, m.timestamp, m.step) for m in self._buf.values()]

    def resend(self, points: list[tuple[str, float, int, int]]) -> None:
        """Buffer points restored from a checkpoint as they were (same timestamp: re-sending one
        the server already has is a no-op), bypassing ``skip_through_step``."""
        with self._lock:
            for key, value, timestamp, step in points:
                self._buf.setdefault((key, step), Metric(key, value, timestamp, step))

    def flush(self) -> bool:
        """Send everything buffered; True when the buffer is empty afterwards."""
        with self._lock:
            items = list(self._buf.items())
        for i in range(0, len(items), _BATCH):
            chunk = items[i : i + _BATCH]
            try:
                self.client.log_batch(self.run_id, metrics=[m for _, m in chunk], synchronous=True)
            except Exception as e:  # noqa: BLE001 - tracking must never take training down
                self.failures += 1
                if worth_retrying(e):
                    log.warning("MLflow log_batch failed (%s); keeping %d points buffered", e, len(items) - i)
                    return False
                if not self._send_one_by_one(chunk):
                    return False
            self._forget(chunk)
        return True

    def _send_one_by_one(self, chunk) -> bool:
        """After a refused batch: send each point alone, drop the ones refused (False: server gone)."""
        for key, m in chunk:
            try:
                self.client.log_batch(self.run_id, metrics=[m], synchronous=True)
            except Exception as e:  # noqa: BLE001
                if worth_retrying(e):
                    return False
                self.dropped += 1
                log.error("MLflow refused metric %s at step %d (%s): dropped", key[0], key[1], e)
            self._forget([(key, m)])
        return True

    def _forget(self, chunk) -> None:
        with self._lock:
            for key, m in chunk:
                if self._buf.get(key) is m:  # not replaced by a newer value meanwhile
                    del self._buf[key]

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.flush()

    def close(self, timeout: float = 30.0) -> bool:
        """Stop the thread and try to drain the buffer for up to ``timeout`` seconds."""
        self._stop.set()
        self._thread.join()
        deadline = time.time() + timeout
        while not self.flush():
            if time.time() > deadline:
                with self._lock:
                    steps = sorted({step for _, step in self._buf})
                log.error("MLflow run %s is missing %d metric points (steps %s..%s): the tracking server stayed "
                          "unreachable for %.0f s after training ended", self.run_id, len(self._buf),
                          steps[0] if steps else "-", steps[-1] if steps else "-", timeout)
                return False
            time.sleep(1.0)
        return True


def last_logged_step(client: MlflowClient, run_id: str, key: str) -> int:
    """Highest step already recorded for ``key`` (-1 if none)."""
    try:
        history = client.get_metric_history(run_id, key)
    except Exception:  # noqa: BLE001 - unknown means "log everything"; duplicates beat losses
        return -1
    return max((m.step for m in history), default=-1)
