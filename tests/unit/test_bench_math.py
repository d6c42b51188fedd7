"""The benchmarks' pure arithmetic (benchmarks/bench_math.py): FLOP counts, alternation, goals,
padding efficiency, /proc peak-RSS parsing, ZeRO model-state accounting."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

from bench_math import (  # noqa: E402
    steps_at,
    Goal,
    alternate,
    attainable_rate,
    cpu_by_title,
    gemm_flops,
    leaf_summary,
    lstm_lm_flops_per_token,
    padding_efficiency,
    process_title,
    ratio,
    ratio_of_medians,
    spread,
    vm_hwm_bytes,
    zero_model_state_bytes,
)


def test_flops_formula_by_hand():
    # One layer, I = H = 2, V = 3: 3 x (8*2*(2+2) + 2*2*3) = 3 x (64 + 12) = 228
    assert lstm_lm_flops_per_token([2], 2, 3) == 228
    # The benchmark model: 2 layers of 256 over a 256 embedding, 4000 words.
    assert lstm_lm_flops_per_token([256, 256], 256, 4000) == 3 * (2 * 8 * 256 * 512 + 2 * 256 * 4000)


@pytest.mark.parametrize("layers,hidden,embed", [(1, 8, 8), (2, 256, 256), (3, 64, 32)])
def test_flops_formula_matches_the_model(layers, hidden, embed):
    """The LM's own count (used for MFU elsewhere) and the issue's formula agree for LSTMs."""
    from carousel.config import ModelConfig
    from carousel.models.lm import LanguageModel

    cfg = ModelConfig(layers=layers, hidden=hidden, embed=embed, tie_weights=embed == hidden)
    model = LanguageModel(cfg, vocab_size=50)
    inputs = [embed] + [hidden] * (layers - 1)
    assert model.flops_per_token() == lstm_lm_flops_per_token(inputs, hidden, 50)


def test_flops_formula_rejects_nonsense():
    with pytest.raises(ValueError):
        lstm_lm_flops_per_token([], 8, 8)
    with pytest.raises(ValueError):
        lstm_lm_flops_per_token([8], 0, 8)


def test_gemm_flops():
    assert gemm_flops(2, 3, 4) == 48


def test_alternate_interleaves_and_reverses():
    calls = []

    def side(name, value):
        def f():
            calls.append(name)
            return value

        return f

    out = alternate({"a": side("a", 1), "b": side("b", 2), "c": side("c", 3)}, rounds=3)
    assert calls == ["a", "b", "c", "c", "b", "a", "a", "b", "c"]
    assert out == {"a": [1.0] * 3, "b": [2.0] * 3, "c": [3.0] * 3}
    with pytest.raises(ValueError):
        alternate({"a": side("a", 1)}, rounds=0)


def test_spread_and_ratio_of_medians():
    assert spread([3.0, 1.0, 2.0, 10.0]) == {"median": 2.5, "min": 1.0, "max": 10.0, "n": 4}
    assert ratio_of_medians([2, 4, 100], [1, 2, 3]) == 2.0  # one burst does not move the median
    with pytest.raises(ValueError):
        spread([])


def test_goals():
    assert Goal(">=", 0.97).met(0.97) and not Goal(">=", 0.97).met(0.96)
    assert Goal("<=", 15).met(14.9) and not Goal("<=", 15).met(15.1)
    assert str(Goal("<=", 1.01)) == "<= 1.01"
    with pytest.raises(ValueError):
        Goal("==", 1)
    r = ratio("platform", 0.99, Goal(">=", 0.97), "a / b")
    assert r["met"] is True and r["goal"] == ">= 0.97"
    assert ratio("info", 2.0, None, "x")["met"] is None


def test_padding_efficiency():
    assert padding_efficiency([[10, 10], [5]]) == 1.0
    assert padding_efficiency([[10, 5], [4, 4, 2]]) == pytest.approx(25 / 32)
    with pytest.raises(ValueError):
        padding_efficiency([])


def test_padding_efficiency_of_a_real_epoch_plan():
    """The speech batcher's plan sorts by length, so padding stays small on varied lengths."""
    import numpy as np

    from carousel.data.speech_batches import plan_epoch

    frames = np.random.default_rng(0).integers(100, 800, size=400)
    plan = plan_epoch(frames, budget=3000, world=2, seed=7, epoch=0)
    batches = [[int(frames[i]) for i in b] for step in plan for b in step]
    assert sorted(i for step in plan for b in step for i in b) == list(range(400))
    assert 0.9 < padding_efficiency(batches) <= 1.0


def test_vm_hwm_parsing():
    text = "Name:\tpython\nVmPeak:\t 9999 kB\nVmHWM:\t  123456 kB\nVmRSS:\t 100 kB\n"
    assert vm_hwm_bytes(text) == 123456 * 1024
    with pytest.raises(ValueError):
        vm_hwm_bytes("Name:\tpython\n")


def test_vm_hwm_of_this_process_is_at_least_its_rss():
    import psutil

    hwm = vm_hwm_bytes(Path("/proc/self/status").read_text())
    assert hwm >= psutil.Process().memory_info().rss * 0.9


def test_zero_model_state_accounting():
    p = 1_000_000
    assert zero_model_state_bytes(p, 2, 0, "fp32") == 16 * p
    assert zero_model_state_bytes(p, 2, 1, "fp32") == (4 + 4 + 8 / 2) * p
    assert zero_model_state_bytes(p, 2, 2, "fp32") == (4 + 4 / 2 + 8 / 2) * p
    # The ZeRO paper's mixed precision: 2 + 2 + K=12 bytes; stage 2 with N=64 -> about 2 + 14/64.
    assert zero_model_state_bytes(p, 1, 0, "bf16") == 16 * p
    assert zero_model_state_bytes(p, 64, 2, "bf16") == round((2 + 14 / 64) * p)
    with pytest.raises(ValueError):
        zero_model_state_bytes(p, 2, 3, "fp32")
    with pytest.raises(ValueError):
        zero_model_state_bytes(p, 2, 0, "fp8")


def test_attainable_rate_is_a_time_weighted_mean():
    # 100 flops at 100/s (1 s) + 100 flops at 50/s (2 s): 200 flops in 3 s.
    assert attainable_rate([(100, 100), (100, 50)]) == pytest.approx(200 / 3)
    assert attainable_rate([(5, 7)]) == 7
    with pytest.raises(ValueError):
        attainable_rate([(1, 0)])


def test_leaf_summary_of_collapsed_stacks():
    text = "main;train;lstm (rnn.py:1) 6\nmain;train;mm (lm.py:2) 3\nmain;load;mm (lm.py:2) 1\nnot a stack line\n"
    assert leaf_summary(text) == [("lstm (rnn.py:1)", 0.6), ("mm (lm.py:2)", 0.4)]
    assert leaf_summary("") == []
    assert leaf_summary(text, within="train;") == [("lstm (rnn.py:1)", 6 / 9), ("mm (lm.py:2)", 3 / 9)]


def test_steps_between_readings_are_interpolated_between_logged_steps():
    from types import SimpleNamespace as P

    history = [P(step=5, timestamp=10_000), P(step=10, timestamp=11_000), P(step=15, timestamp=12_000)]
    assert steps_at(history, 9.0) == 0.0  # before anything was logged
    assert steps_at(history, 10.0) == 5.0
    assert steps_at(history, 10.5) == pytest.approx(7.5)  # halfway between steps 5 and 10
    assert steps_at(history, 13.0) == 15.0  # after the last logged step: no more is known
    assert steps_at(list(reversed(history)), 11.5) == pytest.approx(12.5)


@pytest.mark.parametrize("cmdline, title", [
    (["ray::TrainController.run"], "TrainController"),
    (["ray::RayTrainWorker"], "RayTrainWorker"),
    (["ray::IDLE"], "IDLE"),
    (["ray-dashboard-StateHead-0 (/venv/bin/python -B -c \"from multiprocessing.forkserver import main\")"],
     "dashboard StateHead"),
    (["/venv/bin/python", "-u", "/venv/lib/python3.11/site-packages/ray/_private/log_monitor.py", "--session-dir=/tmp/s"],
     "log_monitor"),
    (["/venv/bin/python", "/venv/lib/python3.11/site-packages/ray/dashboard/dashboard.py", "--host=127.0.0.1"],
     "dashboard"),
    (["/venv/bin/python", "-m", "ray.util.client.server", "--address=10.0.0.1:6379"], "ray.util.client.server"),
    (["/venv/bin/python3.11", "/venv/bin/carousel", "train", "jobs/lm.yaml"], "carousel train"),
    (["/venv/lib/python3.11/site-packages/ray/core/src/ray/raylet/raylet", "--raylet_socket_name=/tmp/r"], "raylet"),
    ([], "?"),
])
def test_process_titles_of_a_ray_node(cmdline, title):
    assert process_title(cmdline) == title


def test_cpu_by_title_sums_deltas_and_follows_retitled_workers():
    before = {1: ("raylet", 10.0), 2: ("IDLE", 3.0), 3: ("TrainController", 5.0), 4: ("TrainController", 1.0),
              9: ("ended", 7.0)}
    after = {1: ("raylet", 10.5), 2: ("DatasetManager", 3.25), 3: ("TrainController", 5.5),
             4: ("TrainController", 1.25), 5: ("new", 0.125)}
    got = cpu_by_title(before, after)
    assert got == {"TrainController": 0.75, "raylet": 0.5, "DatasetManager": 0.25, "new": 0.125}
    assert list(got) == ["TrainController", "raylet", "DatasetManager", "new"]  # largest first
