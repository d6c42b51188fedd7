"""Carousel's Ray Train backend (train/process_group.py): the pure decisions, and that neither the
driver nor Train's controller loads torch. The backend against real Ray and gloo runs in every
integration test that trains."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

from carousel.train.process_group import ProcessGroupConfig, late_variables, pick_backend

ROOT = Path(__file__).resolve().parents[2]


def run_python(code: str, env: dict[str, str] | None = None) -> str:
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, cwd=ROOT,
                         env={**os.environ, **(env or {})}, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout.strip().splitlines()[-1]


def test_a_variable_torch_already_read_is_reported_only_when_it_differs():
    env = {"OMP_WAIT_POLICY": "PASSIVE", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}
    assert late_variables(env, torch_loaded=False, current={}) == []
    assert late_variables(env, torch_loaded=True, current={"OMP_WAIT_POLICY": "PASSIVE"}) == []
    assert late_variables(env, torch_loaded=True, current={"OMP_WAIT_POLICY": "ACTIVE"}) == ["OMP_WAIT_POLICY"]
    assert late_variables(env, torch_loaded=True, current={}) == ["OMP_WAIT_POLICY"]


def test_backend_follows_the_workers_devices_unless_named():
    assert pick_backend(None, {"CPU": 1}) == "gloo"
    assert pick_backend(None, {"CPU": 1, "GPU": 1}) == "nccl"
    assert pick_backend("gloo", {"GPU": 1}) == "gloo"


def test_exported_config_names_the_variables_but_not_their_values():
    cfg = ProcessGroupConfig(backend="gloo", env={"MLFLOW_TRACKING_PASSWORD": "s3cret", "OMP_WAIT_POLICY": "PASSIVE"})
    assert cfg.to_dict() == {"backend": "gloo", "timeout_s": 1800, "env": ["MLFLOW_TRACKING_PASSWORD", "OMP_WAIT_POLICY"]}


def test_worker_env_is_set_before_torch_and_reported_after_it():
    code = """
        import os{extra}
        from carousel.train.process_group import apply_env
        late = apply_env({{"OMP_WAIT_POLICY": "PASSIVE", "CAROUSEL_PROBE": "1"}})
        print(late, os.environ["OMP_WAIT_POLICY"], os.environ["CAROUSEL_PROBE"])
    """
    env = {"OMP_WAIT_POLICY": "ACTIVE"}
    assert run_python(code.format(extra=""), env) == "[] PASSIVE 1"
    # Too late for the policy: it keeps the value torch read, and says so.
    assert run_python(code.format(extra="\n        import torch"), env) == "['OMP_WAIT_POLICY'] ACTIVE 1"


def test_driver_and_controller_load_no_torch(tmp_path):
    from test_shards import make_dataset

    make_dataset(tmp_path / "data", {s: [[list(range(400))]] for s in ("train", "valid", "test")})
    code = f"""
        import sys, cloudpickle
        from pathlib import Path
        from carousel.cli import _load  # what `carousel train JOB --set ...` runs before Ray starts
        from carousel.train.launcher import build_trainer
        spec = _load(Path("jobs/lm-kjv-tiny.yaml"), ["data.path={tmp_path / 'data'}", "run.storage_path={tmp_path / 'runs'}",
                                                     "train.batch_size=2", "train.bptt=8"])
        trainer = build_trainer(spec, "r", {{"spec": spec.model_dump(mode="json")}})
        sent = cloudpickle.dumps((trainer.backend_config, trainer.train_loop_per_worker))
        print(len(sent), "torch" in sys.modules)
        open("{tmp_path / 'sent.pkl'}", "wb").write(sent)
    """
    size, loaded = run_python(code).split()
    assert loaded == "False"
    # What Train's controller receives: it unpickles the config and the function, and builds the backend.
    code = f"""
        import pickle, sys
        cfg, fn = pickle.loads(open("{tmp_path / 'sent.pkl'}", "rb").read())
        cfg.backend_cls()
        print(cfg.backend, sorted(cfg.env)[:1], fn.__module__, "torch" in sys.modules)
    """
    assert run_python(code) == "gloo ['MLFLOW_HTTP_REQUEST_MAX_RETRIES'] carousel.train.process_group False"
