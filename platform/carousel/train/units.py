"""Model-family units: what differs between families, for the one generic loop in loop.py.

A unit builds the model and its loaders, computes the training loss of one micro-batch, evaluates
a split, and owns any state that flows between batches (the LM's TBPTT hidden state), which the
loop saves in the checkpoint. It also names what the loop reports: the validation metric that
ranks checkpoints, what throughput counts (tokens, frames), the metrics of a split, and what
goes into the exported ``model/`` directory. The speech (CTC) unit lives in ctc_unit.py.
"""

from __future__ import annotations

import json
import math
from typing import Any, Protocol

import torch
import torch.distributed as dist

from carousel.config import JobSpec
from carousel.data.shards import Dataset
from carousel.data.streams import StreamLoader
from carousel.train.families import ranking_metric
from carousel.models.lm import LanguageModel
from carousel.models.recurrent import detach_state, flatten_state, unflatten_state


class Unit(Protocol):
    metric: str  # the validation metric checkpoints are ranked by (lower is better), e.g. "val_ppl"
    rate_name: str  # the throughput metric, e.g. "tokens_per_s"
    rate_unit: str  # its unit on the progress line, e.g. "tok/s"

    def build_model(self) -> torch.nn.Module: ...
    def train_loader(self, rank: int, world: int) -> Any: ...
    def train_loss(self, engine, batch) -> tuple[torch.Tensor, int]: ...  # (loss, work units of this rank)
    def evaluate(self, module: torch.nn.Module, split: str, rank: int, world: int, max_batches: int | None) -> dict[str, float]: ...
    def split_metrics(self, prefix: str, result: dict[str, float]) -> dict[str, float]: ...
    def describe(self, metrics: dict[str, float], prefix: str) -> str: ...
    def train_metrics(self, mean_loss: float) -> dict[str, float]: ...
    def summary_lines(self, params: int, world: int) -> list[str]: ...
    def export(self, module: torch.nn.Module) -> dict[str, Any]: ...  # {"model": model.json dict, "files": {name: text}}
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any], device) -> None: ...


def _all_reduce_sum(values: list[float], device) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t)
    return t.tolist()


class LMUnit:
    metric = ranking_metric("lm")
    rate_name = "tokens_per_s"
    rate_unit = "tok/s"

    def __init__(self, spec: JobSpec, device: torch.device):
        self.spec, self.device = spec, device
        self.dataset = Dataset(spec.data.path, verify_checksums=spec.data.verify_checksums)
        self.vocab_size = int(self.dataset.manifest.tokenizer["vocab_size"])
        self.hidden = None

    def build_model(self) -> LanguageModel:
        return LanguageModel(self.spec.model, self.vocab_size)

    def train_loader(self, rank: int, world: int) -> StreamLoader:
        t = self.spec.train
        return StreamLoader(self.dataset, self.spec.data.train_split, rank, world, t.batch_size, t.bptt)

    def train_loss(self, engine, batch) -> tuple[torch.Tensor, int]:
        x, y, fresh = batch
        if fresh:
            self.hidden = None  # a new pass over the streams starts from a zero state
        loss, state = engine(x.to(self.device), self.hidden, targets=y.to(self.device))
        self.hidden = detach_state(state)
        return loss, y.numel()

    @torch.no_grad()
    def evaluate(self, module, split: str, rank: int, world: int, max_batches: int | None = None) -> dict[str, float]:
        t = self.spec.train
        loader = StreamLoader(self.dataset, split, rank, world, t.batch_size, t.bptt, max_windows=max_batches)
        was_training = module.training
        module.eval()
        nll, count, state = 0.0, 0, None
        for x, y, _ in loader:
            loss, state = module(x.to(self.device), state, targets=y.to(self.device))
            nll += float(loss) * y.numel()
            count += y.numel()
        module.train(was_training)
        nll, count = _all_reduce_sum([nll, float(count)], self.device)
        loss = nll / count
        return {"loss": loss, "ppl": float(torch.exp(torch.tensor(loss))), "tokens": count}

    def split_metrics(self, prefix: str, result: dict[str, float]) -> dict[str, float]:
        return {f"{prefix}_loss": result["loss"], f"{prefix}_ppl": result["ppl"]}

    def describe(self, m: dict[str, float], prefix: str) -> str:
        return f"loss {m[prefix + '_loss']:.4f} | perplexity {m[prefix + '_ppl']:.2f}"

    def train_metrics(self, mean_loss: float) -> dict[str, float]:
        return {"train_ppl": math.exp(min(mean_loss, 50))}

    def summary_lines(self, params: int, world: int) -> list[str]:
        from carousel.train.progress import summary_lines

        t = self.spec.train
        return summary_lines(params, t.batch_size * t.bptt * t.grad_accum * world, world, self.spec)

    def export(self, module: torch.nn.Module) -> dict[str, Any]:
        """model.json, the tokenizer, and samples.json: the model's continuations of the spec's prompts
        at this step (what the driver logs when it publishes this checkpoint, without loading a model)."""
        from tokenizers import Tokenizer

        from carousel.models.lm import published_samples
        from carousel.train.checkpoint import SAMPLES

        tok = self.dataset.manifest.tokenizer
        tokenizer_json = self.dataset.root.join(tok["file"]).read_bytes().decode()
        tr = self.spec.tracking
        tokenizer = Tokenizer.from_str(tokenizer_json)
        samples = published_samples(module, tokenizer, tr.sample_prompts, tr.sample_tokens, self.spec.seed)
        return {
            "model": {
                "config": self.spec.model.model_dump(mode="json"),
                "vocab_size": self.vocab_size,
                "tokenizer_sha256": tok["sha256"],
            },
            "files": {"tokenizer.json": tokenizer_json, SAMPLES: json.dumps(samples)},
        }

    def state_dict(self) -> dict[str, Any]:
        return {"hidden": flatten_state(self.hidden)}

    def load_state_dict(self, state: dict[str, Any], device) -> None:
        self.hidden = unflatten_state(state["hidden"], self.spec.model.cell, device)


def unit_class(family: str) -> type:
    if family == "lm":
        return LMUnit
    if family == "ctc":
        from carousel.train.ctc_unit import CTCUnit

        return CTCUnit
    raise ValueError(f"model.family: no unit for {family!r}")


def make_unit(spec: JobSpec, device: torch.device) -> Unit:
    return unit_class(spec.model.family)(spec, device)
