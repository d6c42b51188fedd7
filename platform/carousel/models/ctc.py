"""The acoustic model: normalization -> SpecAugment -> frontend -> stacked (Bi)LSTM/GRU -> CTC head.

Padding never changes the result: features beyond each utterance's length are zeroed before the
frontend (a conv frontend re-zeroes between its layers, so an edge frame sees the same zeros
padded or not), the recurrent core runs on packed sequences, and the CTC loss reads only each
utterance's own output steps. The global normalization statistics are buffers of the model, so an
exported model needs nothing but its weights to transcribe raw features; with speaker normalization
the caller passes each utterance's statistics (``norm``) instead.
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from carousel.config import CTCModelConfig, SpecAugmentConfig
from carousel.models.recurrent import LockedDropout, RecurrentConfig, StackedRecurrent


def time_mask(lengths: torch.Tensor, total: int) -> torch.Tensor:
    """[B, total] bool: True at real (not padded) steps."""
    return torch.arange(total, device=lengths.device)[None, :] < lengths[:, None]


class SpecAugment(nn.Module):
    """Frequency and time masks, drawn per utterance within its own length; active in training only.

    Written here rather than taken from torchaudio: torchaudio's masks ignore per-utterance lengths
    (a mask could land in padding, or scale with the longest utterance), and no torchaudio build
    matches this torch version.
    """

    def __init__(self, cfg: SpecAugmentConfig):
        super().__init__()
        self.cfg = cfg

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        c = self.cfg
        if not self.training or (c.freq_masks == 0 and c.time_masks == 0):
            return x
        x = x.clone()
        n_mels = x.size(2)
        for b in range(x.size(0)):
            length = int(lengths[b])
            for _ in range(c.freq_masks):
                w = int(torch.randint(0, c.freq_width + 1, ()))
                f0 = int(torch.randint(0, max(1, n_mels - w), ()))
                x[b, :length, f0 : f0 + w] = 0.0
            max_w = min(c.time_width, int(c.time_ratio * length))
            for _ in range(c.time_masks):
                w = int(torch.randint(0, max_w + 1, ()))
                t0 = int(torch.randint(0, max(1, length - w), ()))
                x[b, t0 : t0 + w] = 0.0
        return x


class Frontend(nn.Module):
    def __init__(self, kind: str, stride: int, channels: int, n_mels: int):
        super().__init__()
        self.kind, self.stride = kind, stride
        if kind == "stack":
            self.output_size = n_mels * stride
        else:
            layers, f, cin = [], n_mels, 1
            for _ in range(int(math.log2(stride))):
                layers.append(nn.Conv2d(cin, channels, 3, stride=2, padding=1))
                cin, f = channels, (f - 1) // 2 + 1
            self.convs = nn.ModuleList(layers)
            self.output_size = channels * f

    def output_lengths(self, lengths: torch.Tensor) -> torch.Tensor:
        if self.kind == "stack":
            return lengths // self.stride
        for _ in self.convs:
            lengths = (lengths - 1) // 2 + 1
        return lengths

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        B, T, Fm = x.shape
        if self.kind == "stack":
            steps = T // self.stride
            return x[:, : steps * self.stride].reshape(B, steps, Fm * self.stride), lengths // self.stride
        h = x.unsqueeze(1)  # [B, 1, T, F]
        for conv in self.convs:
            h = h * time_mask(lengths, h.size(2))[:, None, :, None]
            h = F.relu(conv(h))
            lengths = (lengths - 1) // 2 + 1
        h = h * time_mask(lengths, h.size(2))[:, None, :, None]
        return h.permute(0, 2, 1, 3).reshape(B, h.size(2), -1), lengths


class CTCModel(nn.Module):
    def __init__(self, cfg: CTCModelConfig, vocab_size: int, n_mels: int,
                 mean: torch.Tensor | None = None, std: torch.Tensor | None = None):
        super().__init__()
        self.cfg, self.vocab_size, self.n_mels = cfg, vocab_size, n_mels
        self.register_buffer("mean", torch.zeros(n_mels) if mean is None else torch.as_tensor(mean, dtype=torch.float32))
        self.register_buffer("std", torch.ones(n_mels) if std is None else torch.as_tensor(std, dtype=torch.float32))
        self.specaug = SpecAugment(cfg.specaugment)
        fe = cfg.frontend
        self.frontend = Frontend(fe.kind, fe.stride, fe.channels, n_mels)
        size = self.frontend.output_size
        self.proj = nn.Linear(size, fe.size) if fe.size else nn.Identity()
        size = fe.size or size
        self.input_drop = LockedDropout(cfg.input_dropout)
        self.core = StackedRecurrent(
            RecurrentConfig(
                input_size=size, hidden=cfg.hidden, layers=cfg.layers, cell=cfg.cell, proj=cfg.proj,
                residual=cfg.residual, dropout=cfg.dropout, bidirectional=cfg.bidirectional, gate_bias=cfg.gate_bias,
            )
        )
        self.output_drop = LockedDropout(cfg.output_dropout)
        self.head = nn.Linear(cfg.output_size, vocab_size)
        nn.init.zeros_(self.head.bias)

    @property
    def stride(self) -> int:
        return self.cfg.frontend.stride

    def output_lengths(self, lengths: torch.Tensor) -> torch.Tensor:
        return self.frontend.output_lengths(lengths)

    def forward(
        self,
        feats: torch.Tensor,
        lengths: torch.Tensor,
        labels: torch.Tensor | None = None,
        label_lengths: torch.Tensor | None = None,
        norm: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Raw log-mel [B, T, n_mels] -> (log-probs [B, T', V], output lengths [B]); with labels,
        (CTC loss summed over the batch / number of labels, output lengths). ``norm`` [B, 2, n_mels]
        (per-utterance mean and std, e.g. its speaker's) replaces the global statistics.

        The loss is inside forward so DeepSpeed's engine wraps the whole computation; log-softmax
        and CTC run in fp32 whatever the model's precision.
        """
        mask = time_mask(lengths, feats.size(1))[:, :, None]
        if norm is None:
            mean, std = self.mean, self.std
        else:
            norm = norm.to(feats.dtype)
            mean, std = norm[:, 0, None, :], norm[:, 1, None, :]
        x = ((feats - mean) / std).masked_fill(~mask, 0.0).to(self.head.weight.dtype)
        x = self.specaug(x, lengths)
        x, out_lengths = self.frontend(x, lengths)
        if int(out_lengths.min()) < 1:
            raise ValueError(f"an utterance of {int(lengths.min())} frames is shorter than the frontend stride")
        x = self.input_drop(self.proj(x))
        y, _ = self.core(x, None, lengths=out_lengths)
        log_probs = F.log_softmax(self.head(self.output_drop(y)).float(), dim=-1)
        if labels is None:
            return log_probs, out_lengths
        loss = F.ctc_loss(
            log_probs.transpose(0, 1), labels, out_lengths, label_lengths,
            blank=0, reduction="sum", zero_infinity=True,
        )
        return loss / label_lengths.sum().clamp(min=1), out_lengths


# ----------------------------------------------------------------------------- decoding


def greedy_decode(log_probs: torch.Tensor | np.ndarray, length: int | None = None, blank: int = 0) -> list[int]:
    """Best path: argmax per step, merge repeats, drop blanks."""
    lp = log_probs[:length] if length is not None else log_probs
    best = lp.argmax(-1).tolist() if isinstance(lp, torch.Tensor) else np.asarray(lp).argmax(-1).tolist()
    out, prev = [], None
    for i in best:
        if i != prev and i != blank:
            out.append(i)
        prev = i
    return out


def _lse(a: float, b: float) -> float:
    if a == -math.inf:
        return b
    if b == -math.inf:
        return a
    m = max(a, b)
    return m + math.log1p(math.exp(-abs(a - b)))


class Fusion(Protocol):
    """A language model scoring the text of a CTC prefix (see models/lm_fusion.py).

    A node knows its cumulative LM log-probability (``lm_score``) and word count. ``peek`` makes a
    child cheaply, with ``lm_score`` exact or an upper bound; ``materialize`` makes peeked nodes
    exact and ``ready`` to be extended, in one batch."""

    weight: float
    word_bonus: float

    def root(self) -> Any: ...
    def peek(self, parent: Any, unit: int) -> Any: ...
    def materialize(self, nodes: list[Any]) -> list[Any]: ...


def beam_decode(log_probs: torch.Tensor | np.ndarray, length: int | None = None, beam_width: int = 16,
                blank: int = 0, prune: float = 8.0, fusion: Fusion | None = None) -> list[int]:
    """CTC prefix beam search, optionally with shallow fusion of a language model.

    Hand-written because pyctcdecode, the usual library, pins numpy<2 (this platform needs numpy 2)
    and torchaudio's flashlight decoder has no build for this torch. Each prefix keeps the log
    probability of ending in blank and in non-blank, so "aa" (with a blank between) and "a" stay
    distinct; symbols more than ``prune`` nats below a step's best are not expanded.

    With ``fusion``, prefixes are ranked by log P_ctc + weight * log P_lm(text) + word_bonus * words
    (Hannun et al. 2014, shallow fusion), so the LM can promote a prefix the acoustic model alone
    would have pruned. Every new prefix is peeked (its parent's next-character distribution gives
    its score, or an upper bound for a multi-character unit); only those in the top ``beam_width``
    are run through the LM, in one batch, repeating until the top ones are all exact. That keeps
    the LM's work to about ``beam_width`` prefixes per step however flat the acoustic scores are.
    """
    lp = np.asarray(log_probs[:length] if length is not None else log_probs, dtype=np.float64)
    beams: dict[tuple[int, ...], tuple[float, float]] = {(): (0.0, -math.inf)}
    nodes: dict[tuple[int, ...], Any] = {(): fusion.root()} if fusion is not None else {}

    def rank(item) -> float:
        prefix, (pb, pnb) = item
        score = _lse(pb, pnb)
        if fusion is not None:
            node = nodes[prefix]
            score += fusion.weight * node.lm_score + fusion.word_bonus * node.words
        return score

    for row in lp:
        cands = np.flatnonzero(row >= row.max() - prune)
        nxt: dict[tuple[int, ...], list[float]] = defaultdict(lambda: [-math.inf, -math.inf])
        for prefix, (pb, pnb) in beams.items():
            total = _lse(pb, pnb)
            last = prefix[-1] if prefix else None
            for c in cands:
                p = float(row[c])
                if c == blank:
                    e = nxt[prefix]
                    e[0] = _lse(e[0], total + p)
                    continue
                ext = nxt[prefix + (int(c),)]
                if c == last:
                    ext[1] = _lse(ext[1], pb + p)  # a repeat only after a blank
                    same = nxt[prefix]
                    same[1] = _lse(same[1], pnb + p)  # otherwise it merges
                else:
                    ext[1] = _lse(ext[1], total + p)
        if fusion is None:
            top = sorted(nxt.items(), key=lambda kv: -rank(kv))[:beam_width]
        else:
            for k in nxt:
                if k not in nodes:
                    nodes[k] = fusion.peek(nodes[k[:-1]], k[-1])
            while True:
                top = sorted(nxt.items(), key=lambda kv: -rank(kv))[:beam_width]
                pending = [k for k, _ in top if not nodes[k].ready]
                if not pending:
                    break
                for k, node in zip(pending, fusion.materialize([nodes[k] for k in pending])):
                    nodes[k] = node
        beams = {k: (v[0], v[1]) for k, v in top}
        if fusion is not None:
            # Only live prefixes are extended next step, so only their nodes are needed again.
            nodes = {k: nodes[k] for k in beams}
    return list(max(beams.items(), key=rank)[0])
