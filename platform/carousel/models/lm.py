"""The recurrent language model: embedding -> stacked core -> (tied) softmax head."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from carousel.config import ModelConfig
from carousel.models.recurrent import LockedDropout, RecurrentConfig, StackedRecurrent, State


class LanguageModel(nn.Module):
    def __init__(self, cfg: ModelConfig, vocab_size: int):
        super().__init__()
        self.cfg, self.vocab_size = cfg, vocab_size
        self.embed = nn.Embedding(vocab_size, cfg.embed)
        nn.init.uniform_(self.embed.weight, -0.1, 0.1)
        self.input_drop = LockedDropout(cfg.input_dropout)
        self.core = StackedRecurrent(
            RecurrentConfig(
                input_size=cfg.embed,
                hidden=cfg.hidden,
                layers=cfg.layers,
                cell=cfg.cell,
                proj=cfg.proj,
                residual=cfg.residual,
                dropout=cfg.dropout,
                gate_bias=cfg.gate_bias,
            )
        )
        self.output_drop = LockedDropout(cfg.output_dropout)
        self.head = nn.Linear(cfg.output_size, vocab_size)
        nn.init.zeros_(self.head.bias)
        if cfg.tie_weights:
            self.head.weight = self.embed.weight
        else:
            nn.init.uniform_(self.head.weight, -0.1, 0.1)

    def _embed(self, tokens: torch.Tensor) -> torch.Tensor:
        w = self.embed.weight
        if self.training and self.cfg.embed_dropout > 0:
            # Drop whole words (rows of the table) for the batch, as in AWD-LSTM.
            keep = 1 - self.cfg.embed_dropout
            w = w * w.new_empty(w.size(0), 1).bernoulli_(keep) / keep
        return F.embedding(tokens, w)

    def forward(
        self, tokens: torch.Tensor, state: State | None = None, targets: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, State]:
        """(logits [B, T, V], state); with ``targets``, (mean cross-entropy per token, state).

        The loss is part of forward so that DeepSpeed's engine wraps the whole training
        computation; the softmax runs in fp32 even when the model runs in bf16/fp16.
        """
        x = self.input_drop(self._embed(tokens))
        y, state = self.core(x, state)
        logits = self.head(self.output_drop(y))
        if targets is None:
            return logits, state
        loss = F.cross_entropy(logits.float().reshape(-1, self.vocab_size), targets.reshape(-1))
        return loss, state

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def flops_per_token(self) -> int:
        """Training FLOPs per token (3x forward): recurrent matmuls + head."""
        c = self.cfg
        size, total = c.embed, 0
        gates = 4 if c.cell == "lstm" else 3
        for _ in range(c.layers):
            total += 2 * gates * c.hidden * (size + (c.proj or c.hidden))
            if c.proj:
                total += 2 * c.hidden * c.proj
            size = c.output_size
        total += 2 * c.output_size * self.vocab_size
        return 3 * total


def generate_text(model: LanguageModel, tokenizer, prompt: str, max_tokens: int, temperature: float = 0.8,
                  top_k: int | None = 40, seed: int = 0) -> str:
    """``prompt`` and its continuation by ``model`` (a ``tokenizers.Tokenizer``; <eos> becomes a
    newline). The model's train/eval mode is left as it was: rank 0 calls this mid-training."""
    from carousel.data.tokenizer import decode, eos_id

    ids = tokenizer.encode(prompt, add_special_tokens=False).ids or [eos_id(tokenizer)]
    device = next(model.parameters()).device
    g = torch.Generator(device=device).manual_seed(seed)
    was_training = model.training
    try:
        out = sample(model, ids, max_tokens, temperature, top_k, g)
    finally:
        model.train(was_training)
    return prompt + decode(tokenizer, out)


def published_samples(model: LanguageModel, tokenizer, prompts: list[str], max_tokens: int, seed: int) -> list[str]:
    """The continuations of the spec's prompts logged with a published model (temperature 0.8, top-k 40)."""
    return [generate_text(model, tokenizer, p, max_tokens, temperature=0.8, top_k=40, seed=seed) for p in prompts]


@torch.no_grad()
def sample(
    model: LanguageModel,
    prompt_ids: list[int],
    max_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    generator: torch.Generator | None = None,
    stop_id: int | None = None,
) -> list[int]:
    """Autoregressive sampling; temperature 0 means greedy."""
    model.eval()
    device = next(model.parameters()).device
    x = torch.tensor([prompt_ids], dtype=torch.long, device=device)
    logits, state = model(x)
    out: list[int] = []
    for _ in range(max_tokens):
        last = logits[0, -1].float()
        if temperature <= 0:
            nxt = int(last.argmax())
        else:
            last = last / temperature
            if top_k:
                kth = torch.topk(last, min(top_k, last.numel())).values[-1]
                last = last.masked_fill(last < kth, -math.inf)
            nxt = int(torch.multinomial(F.softmax(last, -1), 1, generator=generator))
        out.append(nxt)
        if stop_id is not None and nxt == stop_id:
            break
        logits, state = model(torch.tensor([[nxt]], device=device), state)
    return out
