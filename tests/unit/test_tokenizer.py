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


def test_user_text_with_invalid_utf8_is_reported_by_file_and_line_and_the_rest_kept(tmp_path):
    """#7 item 10: a bad line costs only itself, and the report names where it was."""
    from carousel.data.corpus import read_text_files

    good = tmp_path / "psalms.txt"
    good.write_text("The LORD is my shepherd; I shall not want.\n" * 40)
    bad = tmp_path / "mixed.txt"
    bad.write_bytes(b"He maketh me to lie down in green pastures:\n" b"caf\xe9 latin-1 here\n" b"he leadeth me beside the still waters.\n" + b"He restoreth my soul.\n" * 30)
    corpus = read_text_files([str(tmp_path)], valid_fraction=0.0, test_fraction=0.0)
    assert corpus.rejected == [{"file": str(bad), "line": 2, "reason": "invalid UTF-8 at byte 3"}]
    kept = [text for records in corpus.records.values() for _, text in records]
    assert sum("still waters" in t for t in kept) == 1 and sum("green pastures" in t for t in kept) == 1
    assert not any("latin-1" in t for t in kept)
