import pytest

from carousel.data.tokenizer import EOS, decode, encode_lines, eos_id, train_tokenizer

LINES = [
    "In the beginning God created the heaven and the earth.",
    "And the earth was without form, and void; and darkness was upon the face of the deep.",
    "And God said, Let there be light: and there was light.",
] * 20


@pytest.mark.parametrize("kind,size", [("bpe", 300), ("char", 100)])
def test_round_trip_is_exact(kind, size):
    tok = train_tokenizer(kind, LINES, size)
    ids = encode_lines(tok, LINES[:3])
    assert all(seq[-1] == eos_id(tok) for seq in ids)
    assert decode(tok, [i for seq in ids for i in seq]) == "\n".join(LINES[:3]) + "\n"


def test_word_tokenizer_splits_punctuation_and_maps_unknown_words():
    tok = train_tokenizer("word", LINES, 1000)
    assert tok.token_to_id(EOS) is not None
    ids = encode_lines(tok, ["And God said, Let there be zebras."])[0]
    words = [tok.id_to_token(i) for i in ids]
    assert words[:4] == ["And", "God", "said", ","]
    assert "<unk>" in words  # "zebras" was never seen


def test_bpe_vocab_size_is_respected():
    tok = train_tokenizer("bpe", LINES, 300)
    assert tok.get_vocab_size() <= 300


def test_unknown_kind():
    with pytest.raises(ValueError, match="unknown kind"):
        train_tokenizer("morse", LINES, 10)
