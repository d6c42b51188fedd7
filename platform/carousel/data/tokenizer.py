"""Tokenizers (HF ``tokenizers``): byte-level BPE, characters, or words.

Every tokenizer has ``<eos>``, appended after each line so the LM learns where lines end; char and
word tokenizers also have ``<unk>`` (byte-level BPE never needs one).
"""

from __future__ import annotations

from typing import Literal

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

Kind = Literal["bpe", "char", "word"]
EOS = "<eos>"
UNK = "<unk>"


def train_tokenizer(kind: Kind, lines: list[str], vocab_size: int) -> Tokenizer:
    if kind == "bpe":
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=[EOS],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
    elif kind == "char":
        tok = Tokenizer(models.WordLevel(unk_token=UNK))
        tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"(?m)."), behavior="isolated")
        tok.decoder = decoders.Fuse()
        trainer = trainers.WordLevelTrainer(vocab_size=vocab_size, special_tokens=[EOS, UNK], show_progress=False)
    elif kind == "word":
        tok = Tokenizer(models.WordLevel(unk_token=UNK))
        # Punctuation becomes its own word, so "earth." and "earth" share an entry.
        tok.pre_tokenizer = pre_tokenizers.Whitespace()
        trainer = trainers.WordLevelTrainer(vocab_size=vocab_size, special_tokens=[EOS, UNK], show_progress=False)
    else:
        raise ValueError(f"tokenizer: unknown kind {kind!r} (bpe, char, word)")
    tok.train_from_iterator(lines, trainer=trainer, length=len(lines))
    return tok


def eos_id(tok: Tokenizer) -> int:
    i = tok.token_to_id(EOS)
    if i is None:
        raise ValueError(f"tokenizer has no {EOS} token")
    return i


def encode_lines(tok: Tokenizer, lines: list[str]) -> list[list[int]]:
    eos = eos_id(tok)
    return [enc.ids + [eos] for enc in tok.encode_batch(lines, add_special_tokens=False)]


def decode(tok: Tokenizer, ids: list[int]) -> str:
    """Decode ids, turning each <eos> into a newline."""
    eos = eos_id(tok)
    pieces, run = [], []
    for i in ids:
        if i == eos:
            pieces.append(tok.decode(run) + "\n")
            run = []
        else:
            run.append(i)
    pieces.append(tok.decode(run))
    return "".join(pieces)
