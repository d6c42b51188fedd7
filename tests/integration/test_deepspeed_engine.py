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
