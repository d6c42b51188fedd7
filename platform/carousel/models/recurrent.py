"""The stacked recurrent core shared by every model family.

Each layer is its own single-layer ``nn.LSTM``/``nn.GRU`` rather than one multi-layer module:
that costs nothing in speed (the fused oneDNN/cuDNN kernel still runs the time loop) and lets us
put what a multi-layer module cannot between layers: residual connections and locked
(variational) dropout, whose mask is drawn once per sequence and reused at every step, as
recurrent dropout should be.

Initialization keeps long-range gradients alive: orthogonal recurrent matrices (per gate, so
each gate's map is norm-preserving), Xavier-uniform input matrices, zero biases except the
forget gate (LSTM) or update gate (GRU), which start at ``gate_bias`` (1.0) so cells remember by
default and the constant error carousel carries gradient from the first step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

# Per layer: (h, c) for an LSTM, h for a GRU; each [directions, B, H].
LayerState = tuple[torch.Tensor, torch.Tensor] | torch.Tensor
State = list[LayerState]


@dataclass(frozen=True)
class RecurrentConfig:
    input_size: int
    hidden: int
    layers: int
    cell: Literal["lstm", "gru"] = "lstm"
    proj: int | None = None
    residual: bool = True
    dropout: float = 0.0
    bidirectional: bool = False
    gate_bias: float = 1.0

    @property
    def output_size(self) -> int:
        return (self.proj or self.hidden) * (2 if self.bidirectional else 1)


class LockedDropout(nn.Module):
    """Dropout with one mask per sequence, shared across time ([B, T, D] inputs)."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        mask = x.new_empty(x.size(0), 1, x.size(2)).bernoulli_(1 - self.p) / (1 - self.p)
        return x * mask


def init_recurrent(rnn: nn.LSTM | nn.GRU, cell: str, gate_bias: float) -> None:
    gates = 4 if cell == "lstm" else 3
    for name, p in rnn.named_parameters():
        if name.startswith("weight_hh"):
            for chunk in p.data.chunk(gates, 0):
                nn.init.orthogonal_(chunk)
        elif name.startswith("weight_ih"):
            for chunk in p.data.chunk(gates, 0):
                nn.init.xavier_uniform_(chunk)
        elif name.startswith("weight_hr"):  # LSTM projection
            nn.init.xavier_uniform_(p.data)
        elif name.startswith("bias"):
            p.data.zero_()
            # Gate order: LSTM (i, f, g, o), GRU (r, z, n); b_ih + b_hh is the effective bias,
            # so set it once, on b_ih.
            if name.startswith("bias_ih"):
                h = p.size(0) // gates
                p.data[h : 2 * h] = gate_bias


class StackedRecurrent(nn.Module):
    def __init__(self, cfg: RecurrentConfig):
        super().__init__()
        self.cfg = cfg
        rnn_cls = nn.LSTM if cfg.cell == "lstm" else nn.GRU
        self.rnns = nn.ModuleList()
        size = cfg.input_size
        for _ in range(cfg.layers):
            kwargs = {"proj_size": cfg.proj} if cfg.cell == "lstm" and cfg.proj else {}
            rnn = rnn_cls(size, cfg.hidden, batch_first=True, bidirectional=cfg.bidirectional, **kwargs)
            init_recurrent(rnn, cfg.cell, cfg.gate_bias)
            self.rnns.append(rnn)
            size = cfg.output_size
        self.drop = LockedDropout(cfg.dropout)

    def forward(
        self, x: torch.Tensor, state: State | None = None, lengths: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, State]:
        """x [B, T, input_size] -> (y [B, T, output_size], new state).

        With ``lengths``, sequences are packed so padding never enters the recurrence (and the
        returned state is each sequence's state at its own last real step).
        """
        new_state: State = []
        for i, rnn in enumerate(self.rnns):
            inp = x if i == 0 else self.drop(x)
            prev = None if state is None else state[i]
            if lengths is not None:
                packed = pack_padded_sequence(inp, lengths.cpu(), batch_first=True, enforce_sorted=False)
                out, s = rnn(packed, prev)
                out, _ = pad_packed_sequence(out, batch_first=True, total_length=inp.size(1))
            else:
                out, s = rnn(inp, prev)
            if self.cfg.residual and out.shape == x.shape:
                out = out + x
            x = out
            new_state.append(s)
        return x, new_state


def detach_state(state: State | None) -> State | None:
    """Cut the graph between TBPTT windows while keeping the values."""
    if state is None:
        return None
    return [tuple(t.detach() for t in s) if isinstance(s, tuple) else s.detach() for s in state]


def flatten_state(state: State | None) -> list[torch.Tensor]:
    """State -> flat tensor list (checkpointable with weights_only loading)."""
    if state is None:
        return []
    out: list[torch.Tensor] = []
    for s in state:
        out.extend(s if isinstance(s, tuple) else (s,))
    return [t.detach().cpu().clone() for t in out]


def unflatten_state(tensors: list[torch.Tensor], cell: str, device: torch.device | str) -> State | None:
    if not tensors:
        return None
    tensors = [t.to(device) for t in tensors]
    if cell == "lstm":
        return [(tensors[i], tensors[i + 1]) for i in range(0, len(tensors), 2)]
    return list(tensors)


__all__ = [
    "LockedDropout",
    "PackedSequence",
    "RecurrentConfig",
    "StackedRecurrent",
    "State",
    "detach_state",
    "flatten_state",
    "unflatten_state",
]
