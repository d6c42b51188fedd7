"""Shallow fusion of a Carousel character-level LM into CTC prefix beam search.

What fuses: a Carousel LM (models/lm.py) whose tokenizer is character-level (every token but
``<eos>``/``<unk>`` is one character), with CTC units of any kind: each unit stands for a piece of
text (a character, or a BPE piece with its word-initial space), which the LM scores character by
character. Word-level and BPE LMs do not fuse: their tokens do not line up with CTC prefixes.

Characters are matched case-insensitively, so an LM trained on cased text (``carousel prepare text
--kjv --tokenizer char``) fuses with lower-case transcripts: the LM's probability of "g" is that of
"g" plus "G", and the likelier of the two is what the LM is fed. Its next-character distribution
is renormalized over the characters the CTC units can produce, so mass the LM puts on punctuation
or digits the recognizer never writes is not counted as a penalty. A hypothesis starts where the
LM has just seen ``<eos>`` (a line start, as in training).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from carousel.models.lm import LanguageModel
from carousel.models.recurrent import State

SPECIAL_TOKENS = ("<eos>", "<unk>")


@dataclass
class LMNode:
    """The LM's view of one prefix: its text, cumulative log-probability and what comes next.

    A node is first *peeked* (no LM step: its score is exact for one added character and an upper
    bound for more) and *materialized* only if it is good enough to need its LM state."""

    text: str
    lm_score: float
    words: int
    state: State | None = None  # the LM state after the text; None until materialized
    next_logp: torch.Tensor | None = None  # [alphabet] log P(next character), renormalized over the alphabet
    next_list: list[float] | None = None  # the same, for fast scalar look-ups
    feed: torch.Tensor | None = None  # [alphabet] the LM token to feed for each character (its likelier case)
    parent: "LMNode | None" = None
    add: str = ""

    @property
    def ready(self) -> bool:
        return self.state is not None


def _stack(states: list[State]) -> State:
    out: State = []
    for layer in zip(*states):
        if isinstance(layer[0], tuple):
            out.append(tuple(torch.cat(parts, dim=1) for parts in zip(*layer)))
        else:
            out.append(torch.cat(layer, dim=1))
    return out


def _row(state: State, j: int) -> State:
    return [tuple(t[:, j : j + 1] for t in s) if isinstance(s, tuple) else s[:, j : j + 1] for s in state]


class CharLMFusion:
    """Implements models.ctc.Fusion with a character-level LanguageModel."""

    def __init__(self, model: LanguageModel, vocab: dict[str, int], eos_id: int, unit_texts: list[str],
                 weight: float = 0.5, word_bonus: float = 0.0):
        """``unit_texts[i]`` is the text CTC unit i stands for (unit 0, the blank, stands for none)."""
        self.model = model.eval()
        self.weight, self.word_bonus = float(weight), float(word_bonus)
        self.eos_id = eos_id
        self.unit_texts = unit_texts
        self.alphabet = sorted({c for t in unit_texts for c in t})
        self.index = {c: i for i, c in enumerate(self.alphabet)}
        variants, missing = [], []
        for c in self.alphabet:
            ids = sorted({vocab[v] for v in {c, c.lower(), c.upper()} if v in vocab})
            variants.append(ids)
            if not ids:
                missing.append(c)
        if missing:
            raise ValueError(f"the LM's vocabulary lacks characters the recognizer writes: {''.join(missing)!r}")
        width = max(len(v) for v in variants)
        self._variants = torch.tensor([v + [v[0]] * (width - len(v)) for v in variants])  # [alphabet, width]
        self._valid = torch.tensor([[k < len(v) for k in range(width)] for v in variants])

    @classmethod
    def from_tokenizer(cls, model: LanguageModel, tokenizer, unit_texts: list[str], weight: float = 0.5,
                       word_bonus: float = 0.0) -> "CharLMFusion":
        vocab = tokenizer.get_vocab()
        long = sorted(t for t in vocab if t not in SPECIAL_TOKENS and len(t) != 1)
        if long:
            raise ValueError(f"only a character-level LM fuses with CTC; this LM has multi-character tokens "
                             f"such as {long[:3]} (prepare its data with --tokenizer char)")
        if "<eos>" not in vocab:
            raise ValueError("the LM's tokenizer has no <eos> token")
        return cls(model, vocab, vocab["<eos>"], unit_texts, weight, word_bonus)

    @torch.no_grad()
    def _step(self, tokens: torch.Tensor, state: State | None) -> tuple[torch.Tensor, torch.Tensor, State]:
        """Feed one token per row -> (next_logp [B, alphabet], feed ids [B, alphabet], new state)."""
        logits, state = self.model(tokens[:, None], state)
        logp = torch.log_softmax(logits[:, -1].float(), dim=-1)
        per_variant = logp[:, self._variants].masked_fill(~self._valid, -torch.inf)  # [B, alphabet, width]
        per_char = torch.logsumexp(per_variant, dim=-1)
        feed = self._variants[torch.arange(len(self.alphabet)), per_variant.argmax(-1)]  # [B, alphabet]
        return per_char - torch.logsumexp(per_char, dim=-1, keepdim=True), feed, state

    def root(self) -> LMNode:
        next_logp, feed, state = self._step(torch.tensor([self.eos_id]), None)
        return LMNode("", 0.0, 0, state, next_logp[0], next_logp[0].tolist(), feed[0])

    def added_text(self, parent: LMNode, unit: int) -> str:
        text = self.unit_texts[unit]
        # No leading space, and never two in a row: the transcripts have neither.
        return text.lstrip(" ") if not parent.text or parent.text.endswith(" ") else text

    def peek(self, parent: LMNode, unit: int) -> LMNode:
        """The child without running the LM: exact score for one added character, else an upper bound
        (the first character's log-probability; every further one can only lower it)."""
        add = self.added_text(parent, unit)
        if not add:
            return parent
        text = parent.text + add
        return LMNode(text, parent.lm_score + parent.next_list[self.index[add[0]]], len(text.split()),
                      parent=parent, add=add)

    def materialize(self, nodes: list[LMNode]) -> list[LMNode]:
        """Peeked nodes -> exact ones with their LM state, the LM run once per character position for
        all of them (grouped by how many characters they add)."""
        out = list(nodes)
        by_length: dict[int, list[int]] = {}
        for j, n in enumerate(nodes):
            if not n.ready:
                by_length.setdefault(len(n.add), []).append(j)
        for k, rows in by_length.items():
            parents = [nodes[j].parent for j in rows]
            next_logp = torch.stack([p.next_logp for p in parents])
            feed = torch.stack([p.feed for p in parents])
            state = _stack([p.state for p in parents])
            score = torch.tensor([p.lm_score for p in parents], dtype=torch.float64)
            r = torch.arange(len(rows))
            for pos in range(k):
                chars = torch.tensor([self.index[nodes[j].add[pos]] for j in rows])
                score += next_logp[r, chars].double()
                next_logp, feed, state = self._step(feed[r, chars], state)
            for i, j in enumerate(rows):
                n = nodes[j]
                out[j] = LMNode(n.text, float(score[i]), n.words, _row(state, i), next_logp[i], next_logp[i].tolist(),
                                feed[i])
        return out

    def expand(self, pairs: list[tuple[LMNode, int]]) -> list[LMNode]:
        """Materialized children of (parent, unit) pairs."""
        return self.materialize([self.peek(p, u) for p, u in pairs])
