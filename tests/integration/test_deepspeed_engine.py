"""The real DeepSpeed engine, in one process (world size 1, gloo): clipping and accumulation."""

import os

import pytest
import torch

from carousel.config import ModelConfig, TrainConfig
from carousel.models.lm import LanguageModel
from carousel.train.deepspeed_config import deepspeed_config
from carousel.train.schedule import build_scheduler

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def deepspeed():
    from conftest import free_port

    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    import deepspeed as ds
    import torch.distributed as dist

    from carousel.train.loop import skip_inference_comm_op

    skip_inference_comm_op()  # as the loop does
    if not dist.is_initialized():
        dist.init_process_group("gloo", rank=0, world_size=1)
    yield ds
    dist.destroy_process_group()


def engine_for(ds, train: TrainConfig, lr=1.0):
    torch.manual_seed(0)
    model = LanguageModel(ModelConfig(layers=2, hidden=16, embed=16, dropout=0, output_dropout=0), 20)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    sched = build_scheduler(opt, train)
    engine, *_ = ds.initialize(model=model, optimizer=opt, lr_scheduler=sched, config=deepspeed_config(train, 1))
    return engine


def test_gradient_clipping_bounds_the_update(deepspeed):
    clip = 0.01
    engine = engine_for(deepspeed, TrainConfig(max_steps=10, batch_size=2, grad_clip=clip, schedule="constant"))
    before = [p.detach().clone() for p in engine.module.parameters()]
    x = torch.randint(0, 20, (2, 12))
    loss, _ = engine(x, None, targets=x)
    engine.backward(loss * 1000)  # a huge gradient
    from carousel.train.loop import local_grad_norm

    raw = local_grad_norm(engine.module)
    engine.step()
    delta = torch.sqrt(sum(((p.detach() - b) ** 2).sum() for p, b in zip(engine.module.parameters(), before)))
    assert raw > 100 * clip  # the raw gradient was far larger...
    assert clip * 0.99 <= float(delta) <= clip * 1.0001  # ...but the step (lr 1) is exactly the clip


def test_gradient_accumulation_steps_once_per_boundary(deepspeed):
    engine = engine_for(deepspeed, TrainConfig(max_steps=10, batch_size=2, grad_accum=3, grad_clip=None, schedule="constant"), lr=0.1)
    x = torch.randint(0, 20, (2, 12))
    before = [p.detach().clone() for p in engine.module.parameters()]
    for i in range(3):
        loss, _ = engine(x, None, targets=x)
        engine.backward(loss)
        engine.step()
        changed = any(not torch.equal(p, b) for p, b in zip(engine.module.parameters(), before))
        assert changed == (i == 2)
    assert engine.global_steps == 1


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_one_worker_without_the_backward_allreduce_updates_bit_identically(deepspeed, precision):
    """What the loop does with one ZeRO 0 worker (deepspeed_config.backward_allreduce_needed):
    skipping the engine's flatten / reduce / copy-back changes no bit of the training, with
    accumulation and clipping on."""
    from carousel.train.deepspeed_config import backward_allreduce_needed

    train = TrainConfig(max_steps=10, batch_size=2, grad_accum=2, grad_clip=0.05, schedule="constant",
                        precision=precision)
    assert not backward_allreduce_needed(train.zero_stage, 1)
    runs = []
    for allreduce in (True, False):
        engine = engine_for(deepspeed, train, lr=0.1)
        engine.enable_backward_allreduce = allreduce
        torch.manual_seed(1)
        losses = []
        for _ in range(6):
            x = torch.randint(0, 20, (2, 12))
            loss, _ = engine(x, None, targets=x)
            engine.backward(loss)
            engine.step()
            losses.append(float(loss))
        runs.append((losses, [p.detach().clone() for p in engine.module.parameters()], engine.global_steps))
    (l1, w1, s1), (l2, w2, s2) = runs
    assert s1 == s2 == 3 and l1 == l2
    assert all(torch.equal(a, b) for a, b in zip(w1, w2))
    assert not all(torch.equal(a, b) for a, b in zip(w1, engine_for(deepspeed, train).module.parameters()))  # it trained


class _Payload:
    """Unpickling this runs a shell command: what a hostile checkpoint would carry."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("zero_stage,precision", [(0, "fp32"), (1, "fp32"), (2, "bf16")])
def test_engine_checkpoints_load_weights_only_and_refuse_pickle_payloads(deepspeed, tmp_path, zero_stage, precision):
    from carousel.train.safe_load import weights_only_engine

    train = TrainConfig(max_steps=10, batch_size=2, zero_stage=zero_stage, precision=precision)
    engine = engine_for(deepspeed, train, lr=0.01)
    x = torch.randint(0, 20, (2, 12))
    loss, _ = engine(x, None, targets=x)
    engine.backward(loss)
    engine.step()
    engine.save_checkpoint(str(tmp_path), tag="t")
    want = {k: v.clone() for k, v in engine.module.state_dict().items()}

    fresh = engine_for(deepspeed, train, lr=0.01)
    with weights_only_engine(fresh):
        fresh.load_checkpoint(str(tmp_path), tag="t")  # a genuine checkpoint loads
    assert all(torch.equal(want[k], v) for k, v in fresh.module.state_dict().items())

    model_states = tmp_path / "t" / "mp_rank_00_model_states.pt"
    state = torch.load(model_states, weights_only=False)
    marker = tmp_path / "pwned"
    state["payload"] = _Payload(marker)
    torch.save(state, model_states)
    with pytest.raises(Exception, match="[Ww]eights only load failed"):
        with weights_only_engine(fresh):
            fresh.load_checkpoint(str(tmp_path), tag="t")
    assert not marker.exists()  # the payload never ran


@pytest.mark.parametrize("zero_stage,precision", [(0, "fp32"), (1, "fp32"), (2, "fp32"), (1, "bf16")])
def test_a_nan_step_is_skipped_before_the_update(deepspeed, zero_stage, precision):
    """The loop's micro-step leaves weights and optimizer state untouched for a NaN loss, and says so."""
    from carousel.train.loop import backward_and_step

    train = TrainConfig(max_steps=10, batch_size=2, zero_stage=zero_stage, precision=precision, schedule="constant")
    model = LanguageModel(ModelConfig(layers=2, hidden=16, embed=16, dropout=0, output_dropout=0), 20)
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, lr_scheduler=build_scheduler(opt, train),
                                      config=deepspeed_config(train, 1))
    x = torch.randint(0, 20, (2, 12))

    def step(scale):
        skipped_before = engine.skipped_steps
        loss, _ = engine(x, None, targets=x)
        _, dropped = backward_and_step(engine, loss * scale, train, boundary=True)
        return dropped or engine.skipped_steps > skipped_before

    assert step(1.0) is False  # a normal step first, so the optimizer has state to protect
    before = {k: v.detach().clone() for k, v in engine.module.state_dict().items()}
    assert step(float("nan")) is True
    after = engine.module.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "a NaN step changed the weights"
    assert step(1.0) is False  # and training goes on
    assert all(bool(torch.isfinite(p).all()) for p in engine.module.parameters())


FSIZE_SCRIPT = r"""
import os, resource, signal, sys
from pathlib import Path
os.environ.update(DS_ACCELERATOR="cpu", MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[2], RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
import torch, torch.distributed as dist, deepspeed
from carousel.train.loop import skip_inference_comm_op
skip_inference_comm_op()
from carousel.config import ModelConfig, TrainConfig
from carousel.models.lm import LanguageModel
from carousel.train import checkpoint as ckpt
from carousel.train.deepspeed_config import deepspeed_config
dist.init_process_group("gloo", rank=0, world_size=1)
train = TrainConfig(max_steps=10, batch_size=2, zero_stage=1)
model = LanguageModel(ModelConfig(layers=2, hidden=64, embed=64), 200)
engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters()), config=deepspeed_config(train, 1))
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead of killing
resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, resource.RLIM_INFINITY))
export = {"state_dict": ckpt.export_state_dict(engine.module), "model": {}, "files": {}}
try:
    ckpt.save(Path(sys.argv[1]), engine, "step10", 0, {"loader": {}}, {"step": 10, "world_size": 1}, export)
except Exception as e:
    print("SAVE FAILED:", type(e).__name__, e)
    sys.exit(3)
print("SAVED")
"""


def test_a_checkpoint_cut_off_by_a_file_size_limit_is_never_taken_as_complete(tmp_path):
    """#7 item 4: the real engine writes a checkpoint under RLIMIT_FSIZE (what a full disk or a
    quota does): the write fails loudly and the directory it left is refused by verify."""
    import subprocess
    import sys

    from conftest import free_port

    from carousel.train import checkpoint as ckpt

    out = tmp_path / "ckpt"
    out.mkdir()
    proc = subprocess.run([sys.executable, "-c", FSIZE_SCRIPT, str(out), str(free_port())],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 3, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "SAVE FAILED" in proc.stdout
    assert any(p.is_file() for p in out.rglob("*")), "nothing was written: the limit did not bite mid-write"
    with pytest.raises(ckpt.CheckpointError, match="MANIFEST-rank0.json missing"):
        ckpt.verify(out, 1)
