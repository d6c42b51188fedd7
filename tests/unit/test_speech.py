"""Speech data, batching, model and decoding: everything that needs no Ray."""

import json

import numpy as np
import pytest
import soundfile as sf
import torch

from carousel.config import CTCModelConfig, SpecError, apply_overrides, spec_from_dict
from carousel.data.shards import Dataset
from carousel.data.speech import (
    DEFAULT_CHARS,
    FeatureSettings,
    Item,
    Vocabulary,
    ctc_need,
    fbank,
    load_audio,
    max_stride,
    normalize_transcript,
    prepare_speech,
    read_speech_manifest,
)
from carousel.data.speech_batches import BucketLoader, plan_epoch, plan_eval
from carousel.models.ctc import CTCModel, beam_decode, greedy_decode

SETTINGS = FeatureSettings()


def tone(seconds: float, rate: int, freq: float = 440.0, seed: int = 0) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    noise = np.random.default_rng(seed).normal(0, 0.01, len(t))
    return (0.3 * np.sin(2 * np.pi * freq * t) + noise).astype(np.float32)


# ----------------------------------------------------------------------------- features


def test_fbank_shape_follows_kaldi_framing():
    audio = tone(1.0, 16000)
    feats = fbank(audio, SETTINGS)
    # 25 ms windows every 10 ms, no partial frames: 1 + (16000 - 400) // 160
    assert feats.shape == (98, 80) and feats.dtype == np.float32
    assert np.isfinite(feats).all()
    assert np.array_equal(feats, fbank(audio, SETTINGS))  # no dither: deterministic


def test_audio_of_any_rate_and_channels_is_resampled_to_mono(tmp_path):
    stereo = np.stack([tone(0.5, 8000), tone(0.5, 8000, 220)], axis=1)
    sf.write(tmp_path / "a.flac", stereo, 8000)
    audio = load_audio(tmp_path / "a.flac", 16000)
    assert audio.ndim == 1 and abs(len(audio) - 8000) <= 2
    assert fbank(audio, SETTINGS).shape[1] == 80


def test_transcripts_normalize_and_out_of_vocabulary_is_named():
    v = Vocabulary()
    assert normalize_transcript("And God said, Let there be light: and there was light.") == \
        "and god said let there be light and there was light"
    assert normalize_transcript("Don\u2019t\u2014STOP") == "don't stop"
    assert v.oov("caf\u00e9 42") == ["2", "4", "\u00e9"]
    assert v.decode(v.encode("hello world")) == "hello world" and v.encode("a") == [3]  # blank 0, space 1, ' 2
    assert v.decode(v.encode(" two  spaces ")) == "two spaces"  # hypotheses are spaced as transcripts are


def make_corpus(tmp_path, n_train=12, n_held=3):
    """WAV files of tones of different lengths + a JSONL manifest with explicit splits."""
    lines = []
    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("valid", n_held), ("test", n_held)):
        for i in range(n):
            secs = float(rng.uniform(0.6, 1.6))
            sf.write(tmp_path / f"{split}{i}.wav", tone(secs, 22050, 200 + 40 * i, seed=i), 22050)
            lines.append(json.dumps({"audio": f"{split}{i}.wav", "text": f"word {split} {'abc'[i % 3]}", "split": split,
                                     "speaker": f"s{i % 2}"}))
    (tmp_path / "m.jsonl").write_text("\n".join(lines) + "\n")
    return tmp_path / "m.jsonl"


def test_prepared_features_and_normalization_stats(tmp_path):
    m = make_corpus(tmp_path)
    items, rejected, source = read_speech_manifest(m, Vocabulary())
    assert not rejected and [len(items[s]) for s in ("train", "valid", "test")] == [12, 3, 3]
    res = prepare_speech(items, str(tmp_path / "ds"), source, rejected, shard_utts=5, parallel=False)
    ds = Dataset(str(tmp_path / "ds"))
    assert ds.verify()["train"] == {"shards": 3, "rows": 12, "tokens": ds.split("train").tokens}
    sp = res.manifest.speech
    # The stats are the train split's per-bin mean and std, computed from what the shards hold.
    from carousel.data.speech_batches import SpeechSplit

    train = SpeechSplit(ds, "train")
    allf = np.concatenate([train.features(i).astype(np.float64) for i in range(len(train))])
    assert len(allf) == sp["splits"]["train"]["frames"]
    np.testing.assert_allclose(sp["normalization"]["mean"], allf.mean(0), atol=0.02)
    np.testing.assert_allclose(sp["normalization"]["std"], allf.std(0), rtol=0.01, atol=0.02)
    model = CTCModel(CTCModelConfig(family="ctc", layers=1, hidden=8), 29, 80,
                     torch.tensor(sp["normalization"]["mean"]), torch.tensor(sp["normalization"]["std"]))
    normed = (torch.from_numpy(allf).float() - model.mean) / model.std
    assert normed.mean(0).abs().max() < 0.05 and (normed.std(0) - 1).abs().max() < 0.05


def test_bad_manifest_lines_are_named_counted_and_kept_out(tmp_path):
    sf.write(tmp_path / "ok.wav", tone(1.0, 16000), 16000)
    (tmp_path / "garbage.wav").write_bytes(b"RIFF\x00\x00not really audio")
    rows = [
        {"audio": "ok.wav", "text": "fine line"},
        {"audio": "missing.wav", "text": "no such file"},
        {"audio": "garbage.wav", "text": "cannot decode"},
        {"audio": "ok.wav", "text": "  ...  "},
        {"audio": "ok.wav", "text": "price 42 \u20ac"},
        {"text": "no audio"},
    ]
    lines = [json.dumps(r) for r in rows[:3]] + ["{not json"] + [json.dumps(r) for r in rows[3:]]
    (tmp_path / "m.jsonl").write_text("\n".join(lines) + "\n")
    items, rejected, _ = read_speech_manifest(tmp_path / "m.jsonl", Vocabulary())
    by_line = {r["line"]: r["reason"] for r in rejected}
    assert "not valid JSON" in by_line[4]
    assert by_line[5] == "empty transcript"
    assert "outside the vocabulary" in by_line[6] and "4" in by_line[6]
    assert "no audio path" in by_line[7]
    from carousel.data.speech import _shard_task

    flat = [it for s in items.values() for it in s]
    assert sorted(it.where.rsplit(":", 1)[1] for it in flat) == ["1", "2", "3"]
    out = _shard_task(flat, SETTINGS, Vocabulary().to_json(), str(tmp_path / "x.arrow"))
    reasons = {r["where"].rsplit(":", 1)[1]: r["reason"] for r in out["rejected"]}
    assert "does not exist" in reasons["2"] and "cannot decode" in reasons["3"]
    assert out["shard"].rows == 1


def test_csv_manifest_holds_out_whole_speakers(tmp_path):
    sf.write(tmp_path / "a.wav", tone(0.5, 16000), 16000)
    rows = ["audio,text,speaker"] + [f"a.wav,hello there,spk{i % 10}" for i in range(200)]
    (tmp_path / "m.csv").write_text("\n".join(rows) + "\n")
    items, rejected, source = read_speech_manifest(tmp_path / "m.csv", Vocabulary(), 0.2, 0.2)
    assert not rejected and source["held_out_by"] == "speaker"
    speakers = {s: {it.speaker for it in items[s]} for s in items}
    assert not speakers["train"] & speakers["valid"] and not speakers["train"] & speakers["test"]
    lines = {int(it.where.rsplit(":", 1)[1]) for split in items.values() for it in split}
    assert lines == set(range(2, 202))  # CSV line numbers count the header


# ----------------------------------------------------------------------------- batching


@pytest.mark.parametrize("world", [1, 2, 3])
def test_bucketing_stays_under_budget_and_yields_every_utterance_once(world):
    frames = np.random.default_rng(1).integers(50, 400, size=237)
    budget = 1600
    for epoch in range(3):
        plan = plan_epoch(frames, budget, world, seed=7, epoch=epoch)
        seen = []
        for step in plan:
            assert len(step) == world  # every rank has a batch at every step
            for batch in step:
                assert len(batch) * max(frames[i] for i in batch) <= budget
                seen.extend(batch)
        assert sorted(seen) == list(range(len(frames)))
    assert plan_epoch(frames, budget, world, 7, 1) == plan_epoch(frames, budget, world, 7, 1)
    assert plan_epoch(frames, budget, world, 7, 1) != plan_epoch(frames, budget, world, 7, 2)
    evals = [i for r in range(world) for b in plan_eval(frames, budget, world, r) for i in b]
    assert sorted(evals) == list(range(len(frames)))


def test_loader_resumes_exactly_and_ranks_are_disjoint(tmp_path):
    m = make_corpus(tmp_path, n_train=20)
    items, rejected, source = read_speech_manifest(m, Vocabulary())
    prepare_speech(items, str(tmp_path / "ds"), source, rejected, shard_utts=8, parallel=False)
    ds = Dataset(str(tmp_path / "ds"))
    a = BucketLoader(ds, "train", 0, 2, 800, seed=3)
    b = BucketLoader(ds, "train", 1, 2, 800, seed=3)
    assert len(a) == len(b)
    texts_a = [t for _ in range(len(a)) for t in a.next().texts]
    texts_b = [t for _ in range(len(b)) for t in b.next().texts]
    assert len(texts_a) + len(texts_b) == 20
    for _ in range(3):
        a.next()
    state = a.state_dict()
    expected = [a.next() for _ in range(5)]
    c = BucketLoader(ds, "train", 0, 2, 800, seed=3)
    c.load_state_dict(state)
    for want in expected:
        got = c.next()
        assert got.texts == want.texts and torch.equal(got.feats, want.feats)
    with pytest.raises(Exception, match="budget"):
        BucketLoader(ds, "train", 0, 2, 900, seed=3).load_state_dict(state)


# ----------------------------------------------------------------------------- model


def model(kind="stack", stride=3, bidirectional=True, seed=0):
    torch.manual_seed(seed)
    cfg = CTCModelConfig(family="ctc", layers=2, hidden=16, bidirectional=bidirectional,
                         frontend={"kind": kind, "stride": stride, "channels": 4})
    return CTCModel(cfg, vocab_size=29, n_mels=20).eval()


@pytest.mark.parametrize("kind,stride", [("stack", 1), ("stack", 3), ("stack", 4), ("conv", 2), ("conv", 4)])
def test_ctc_output_length_covers_the_labels_whenever_the_stride_fits(kind, stride):
    m = model(kind, stride)
    rng = np.random.default_rng(0)
    for _ in range(200):
        frames = int(rng.integers(5, 400))
        ids = rng.integers(1, 29, size=int(rng.integers(1, 60))).tolist()
        if max_stride(frames, ctc_need(ids)) >= stride:
            assert int(m.output_lengths(torch.tensor([frames]))) >= ctc_need(ids)
    assert ctc_need([5, 5, 6]) == 4 and max_stride(100, 30) == 3 and max_stride(10, 11) == 0


@pytest.mark.parametrize("kind,stride", [("stack", 3), ("conv", 4)])
def test_padding_does_not_change_the_loss_or_the_outputs(kind, stride):
    m = model(kind, stride)
    g = torch.Generator().manual_seed(0)
    lengths = [90, 47, 64]
    feats = [torch.randn(n, 20, generator=g) for n in lengths]
    labels = [torch.randint(1, 29, (k,), generator=g) for k in (9, 5, 7)]
    padded = torch.zeros(3, 120, 20)  # more padding than the longest needs
    for i, f in enumerate(feats):
        padded[i, : len(f)] = f
    with torch.no_grad():
        loss, _ = m(padded, torch.tensor(lengths), torch.cat(labels), torch.tensor([9, 5, 7]))
        total = 0.0
        for f, y in zip(feats, labels):
            single, _ = m(f[None], torch.tensor([len(f)]), y, torch.tensor([len(y)]))
            total += float(single) * len(y)
        lp_pad, out_len = m(padded, torch.tensor(lengths))
        lp_one, _ = m(feats[1][None], torch.tensor([lengths[1]]))
    assert abs(float(loss) - total / 21) < 1e-5
    torch.testing.assert_close(lp_pad[1, : int(out_len[1])], lp_one[0], atol=1e-5, rtol=1e-5)


def test_specaugment_only_in_training_and_within_each_utterance():
    m = model()
    m.specaug.train()
    x = torch.ones(2, 100, 20)
    y = m.specaug(x, torch.tensor([100, 40]))
    assert (y[1, 40:] == 1).all()  # padding untouched
    assert (y == 0).any()
    m.specaug.eval()
    assert torch.equal(m.specaug(x, torch.tensor([100, 40])), x)


# ----------------------------------------------------------------------------- decoding


def emissions(rows):
    p = np.asarray(rows, dtype=np.float64)
    return np.log(p / p.sum(1, keepdims=True))


def test_greedy_decoding_of_a_known_emission_matrix():
    # symbols: 0 blank, 1 'a', 2 'b'; best path a a - a b b -> "aab"
    lp = emissions([[.1, .8, .1], [.1, .7, .2], [.8, .1, .1], [.2, .7, .1], [.1, .1, .8], [.3, .1, .6], [.9, .05, .05]])
    assert greedy_decode(lp) == [1, 1, 2]
    assert greedy_decode(torch.tensor(lp), length=2) == [1]
    assert beam_decode(lp, beam_width=8) == [1, 1, 2]


def test_beam_search_finds_the_likelier_label_sequence_than_the_best_path():
    # Best path is blank-blank (""), but "a" collects more probability over its many alignments:
    # P("") = .6*.6 = .36 < P("a") = .4*.4 + .4*.6 + .6*.4 = .64
    lp = emissions([[.6, .4], [.6, .4]])
    assert greedy_decode(lp) == []
    assert beam_decode(lp, beam_width=4) == [1]


# ----------------------------------------------------------------------------- config


BASE = {"name": "t", "data": {"path": "x"}, "model": {"family": "ctc"},
        "train": {"max_steps": 10, "eval_every": 5}, "run": {"checkpoint_every": 5}}


def test_ctc_specs_parse_and_errors_name_the_dotted_field():
    spec = spec_from_dict(BASE)
    assert spec.model.family == "ctc" and spec.model.bidirectional and spec.speech.frames_per_batch == 6000
    with pytest.raises(SpecError) as e:
        spec_from_dict(apply_overrides(BASE, ["model.frontend.kind=conv", "model.frontend.stride=3",
                                              "model.embed=64", "speech.beam=3"]))
    p = e.value.problems
    assert any(x.startswith("model.frontend.stride:") for x in p)
    assert "model.embed: unknown field" in p and "speech.beam: unknown field" in p
    with pytest.raises(SpecError, match="model.family: must be one of lm, ctc"):
        spec_from_dict(apply_overrides(BASE, ["model.family=rnnt"]))
    with pytest.raises(SpecError, match="speech: only for model.family ctc"):
        spec_from_dict(apply_overrides(BASE, ["model.family=lm", "speech.decoder=beam"]))


def test_repo_speech_job_specs_are_valid():
    from pathlib import Path

    from carousel.config import load_spec

    jobs = sorted(Path(__file__).resolve().parents[2].glob("jobs/asr-*.yaml"))
    assert jobs
    for job in jobs:
        assert load_spec(job).model.family == "ctc"


# ----------------------------------------------------------------------------- speaker normalization


def prepared(tmp_path):
    items, rejected, source = read_speech_manifest(make_corpus(tmp_path), Vocabulary())
    prepare_speech(items, str(tmp_path / "ds"), source, rejected, shard_utts=5, parallel=False)
    return Dataset(str(tmp_path / "ds"))


def test_speaker_statistics_are_each_speakers_own_over_every_split(tmp_path):
    from carousel.data.speech_batches import SpeechSplit, speaker_stats_table

    ds = prepared(tmp_path)
    table = ds.manifest.speech["normalization"]["speakers"]
    assert sorted(table) == ["s0", "s1"]
    frames = {"s0": [], "s1": []}
    for split in ("train", "valid", "test"):
        data = SpeechSplit(ds, split)
        for i in range(len(data)):
            frames[data.speakers[i]].append(data.features(i).astype(np.float64))
    for spk, fs in frames.items():
        allf = np.concatenate(fs)
        assert table[spk]["frames"] == len(allf)
        np.testing.assert_allclose(table[spk]["mean"], allf.mean(0), atol=0.02)
        np.testing.assert_allclose(table[spk]["std"], np.maximum(allf.std(0), 1e-2), rtol=0.01, atol=0.02)
    # A batch carries each utterance's speaker statistics; the model then centres each speaker.
    test = SpeechSplit(ds, "test", normalization="speaker")
    b = test.batch(list(range(len(test))))
    stats = speaker_stats_table(ds)
    for j, spk in enumerate(test.speakers):
        assert torch.equal(b.norm[j], torch.from_numpy(stats[spk]))
    assert SpeechSplit(ds, "test").batch([0]).norm is None
    # The model applies a batch's statistics exactly as it applies its global buffers.
    cfg = CTCModelConfig(family="ctc", layers=1, hidden=8)
    torch.manual_seed(0)
    m = CTCModel(cfg, 29, 80).eval()
    for j, spk in enumerate(test.speakers):
        with_stats = CTCModel(cfg, 29, 80, *map(torch.from_numpy, stats[spk])).eval()
        with_stats.load_state_dict({**m.state_dict(), "mean": with_stats.mean, "std": with_stats.std})
        n = int(b.lengths[j])
        with torch.no_grad():
            got, _ = m(b.feats[j : j + 1, :n], b.lengths[j : j + 1], None, None, b.norm[j : j + 1])
            want, _ = with_stats(b.feats[j : j + 1, :n], b.lengths[j : j + 1])
        torch.testing.assert_close(got, want)


def test_unknown_speakers_and_old_datasets(tmp_path):
    from carousel.data.shards import DataError, write_manifest
    from carousel.data.speech import utterance_stats
    from carousel.data.speech_batches import SpeechSplit

    lines = []
    for i in range(6):
        sf.write(tmp_path / f"u{i}.wav", tone(0.8, 16000, 300 + 50 * i, seed=i), 16000)
        lines.append(json.dumps({"audio": f"u{i}.wav", "text": "hello", "split": ["train", "valid", "test"][i % 3]}))
    (tmp_path / "m.jsonl").write_text("\n".join(lines) + "\n")
    items, rejected, source = read_speech_manifest(tmp_path / "m.jsonl", Vocabulary())
    prepare_speech(items, str(tmp_path / "ds"), source, rejected, shard_utts=5, parallel=False)
    ds = Dataset(str(tmp_path / "ds"))
    assert ds.manifest.speech["normalization"]["speakers"] == {}  # rows without a speaker get no shared stats
    data = SpeechSplit(ds, "train", normalization="speaker")
    assert data.speakers[0] == "unknown"
    np.testing.assert_allclose(data.norm(0), utterance_stats(data.features(0)), rtol=1e-6)
    del ds.manifest.speech["normalization"]["speakers"]
    write_manifest(ds.root, ds.manifest)
    with pytest.raises(DataError, match="speaker needs per-speaker statistics"):
        SpeechSplit(Dataset(str(tmp_path / "ds")), "train", normalization="speaker")


def save_asr(tmp_path, normalization="speaker", units=None):
    """A CTC model's model/ directory as the training loop exports it."""
    units = units or Vocabulary()
    torch.manual_seed(0)
    cfg = CTCModelConfig(family="ctc", layers=1, hidden=8)
    m = CTCModel(cfg, units.size, 80, torch.full((80,), 5.0), torch.full((80,), 3.0))
    d = tmp_path / "model"
    d.mkdir()
    torch.save(m.state_dict(), d / "weights.pt")
    (d / "model.json").write_text(json.dumps({"family": "ctc", "config": cfg.model_dump(mode="json"),
                                              "vocab_size": units.size, "features": SETTINGS.to_dict(),
                                              "normalization": normalization, "lm_weight": 0.5, "word_bonus": 0.0}))
    (d / "vocab.json").write_text(units.to_json())
    return d, m.eval()


def test_transcription_of_an_unseen_speaker_uses_its_own_or_pooled_statistics(tmp_path):
    from carousel.data.speech import utterance_stats
    from carousel.tracking.asr_model import LoadedASR

    d, m = save_asr(tmp_path)
    asr = LoadedASR(d)
    a, b = fbank(tone(0.7, 16000, 300), SETTINGS), fbank(tone(0.9, 16000, 500, seed=1), SETTINGS)

    def direct(feats, norm):
        with torch.no_grad():
            lp, _ = m(torch.from_numpy(feats)[None], torch.tensor([len(feats)]), None, None,
                      torch.from_numpy(norm.astype(np.float32))[None])
        return lp[0].numpy()

    np.testing.assert_allclose(asr.log_probs(a), direct(a, utterance_stats(a)), atol=1e-6)
    pooled = utterance_stats(a, b)
    np.testing.assert_allclose(asr.log_probs(b, pooled), direct(b, pooled), atol=1e-6)
    assert not np.allclose(asr.log_probs(b, pooled), asr.log_probs(b), atol=1e-4)
    wav_a, wav_b = tmp_path / "a.wav", tmp_path / "b.wav"
    sf.write(wav_a, tone(0.7, 16000, 300), 16000)
    sf.write(wav_b, tone(0.9, 16000, 500, seed=1), 16000)
    pooled_files = utterance_stats(asr.features(wav_a), asr.features(wav_b))
    assert asr.transcribe_speaker([wav_a, wav_b]) == [asr.vocab.decode(greedy_decode(asr.log_probs(asr.features(w), pooled_files)))
                                                      for w in (wav_a, wav_b)]
    # A globally normalized model ignores speaker statistics.
    (tmp_path / "g").mkdir()
    g = LoadedASR(save_asr(tmp_path / "g", "global")[0])
    np.testing.assert_allclose(g.log_probs(a, pooled), g.log_probs(a), atol=0)


# ----------------------------------------------------------------------------- BPE units


TEXTS = ["in the beginning god created the heaven and the earth", "and the earth was without form and void",
         "and darkness was upon the face of the deep", "and god said let there be light"] * 5


def test_bpe_units_round_trip_and_never_drop_a_character():
    from carousel.data.speech import BPEUnits, units_from_json

    u = BPEUnits.train(TEXTS, 60, DEFAULT_CHARS)
    assert u.kind == "bpe" and u.size == 61 and u.tokens[0] == "<blank>"
    for text in [*TEXTS[:4], "zebra's quiz", "x"]:
        ids = u.encode(text)
        assert min(ids) >= 1 and u.decode(ids) == text
    assert len(u.encode(TEXTS[0])) < len(Vocabulary().encode(TEXTS[0]))
    assert "".join(u.piece(i) for i in u.encode("the earth")).strip() == "the earth"
    assert u.oov("caf\u00e9") == ["\u00e9"]
    back = units_from_json(u.to_json())
    assert back.tokens == u.tokens and back.encode(TEXTS[1]) == u.encode(TEXTS[1])
    assert isinstance(units_from_json(Vocabulary().to_json()), Vocabulary)
    bad = json.loads(u.to_json())
    bad["tokens"][5] = "zz"
    from carousel.data.shards import DataError

    with pytest.raises(DataError, match="does not match its tokenizer"):
        units_from_json(json.dumps(bad))
    with pytest.raises(DataError, match="smaller than"):
        BPEUnits.train(TEXTS, 10, DEFAULT_CHARS)


def test_bpe_dataset_labels_and_the_ctc_length_check_by_utterance(tmp_path):
    from carousel.data.shards import DataError
    from carousel.data.speech import BPEUnits, units_from_json
    from carousel.train.ctc_unit import preflight_ctc

    m = make_corpus(tmp_path)
    items, rejected, source = read_speech_manifest(m, Vocabulary())
    units = BPEUnits.train([it.text for it in items["train"]], 40, DEFAULT_CHARS)
    prepare_speech(items, str(tmp_path / "bpe"), source, rejected, units, shard_utts=5, parallel=False)
    prepare_speech(items, str(tmp_path / "char"), source, rejected, Vocabulary(), shard_utts=5, parallel=False)
    ds = Dataset(str(tmp_path / "bpe"))
    assert ds.manifest.tokenizer["type"] == "bpe" and ds.manifest.tokenizer["vocab_size"] == units.size
    stored = units_from_json(ds.root.join("vocab.json").read_bytes().decode())
    from carousel.data.speech_batches import SpeechSplit

    data = SpeechSplit(ds, "train")
    for i in range(len(data)):
        assert stored.decode(data.labels(i).tolist()) == data.texts[i]
    # Stride 6 leaves the shortest utterances fewer CTC steps than their characters need, but enough
    # for their (fewer) BPE units: the check names each utterance that does not fit.
    spec = spec_from_dict(apply_overrides(BASE, ["model.frontend.stride=6", "speech.frames_per_batch=4000"]))
    spec.data.path = str(tmp_path / "char")
    with pytest.raises(DataError) as e:
        preflight_ctc(spec)
    msg = str(e.value)
    assert msg.startswith("model.frontend.stride: 6 leaves") and "m-" in msg and "label length + repeats" in msg
    char_ds = Dataset(str(tmp_path / "char"))
    too_short = [u for split in ("train",) for u, f, t in zip(SpeechSplit(char_ds, split).utts, SpeechSplit(char_ds, split).frames,
                                                              SpeechSplit(char_ds, split).texts) if f // 6 < ctc_need(Vocabulary().encode(t))]
    assert too_short and all(u in msg for u in too_short)
    spec.data.path = str(tmp_path / "bpe")
    preflight_ctc(spec)


# ----------------------------------------------------------------------------- shallow fusion


def char_lm(tmp_path, text, bias: dict[str, float], vocab_text=None):
    """A real char-level LanguageModel whose next-character preferences are set by hand: zero
    weights into the head, so its logits are the bias whatever the context."""
    from carousel.config import ModelConfig
    from carousel.data.tokenizer import train_tokenizer
    from carousel.models.lm import LanguageModel

    tok = train_tokenizer("char", [vocab_text or text], 200)
    cfg = ModelConfig(layers=1, hidden=16, embed=16, tie_weights=False)
    torch.manual_seed(0)
    lm = LanguageModel(cfg, tok.get_vocab_size()).eval()
    with torch.no_grad():
        lm.head.weight.zero_()
        lm.head.bias.zero_()
        for ch, b in bias.items():
            lm.head.bias[tok.token_to_id(ch)] = b
    d = tmp_path / "lm"
    d.mkdir()
    torch.save(lm.state_dict(), d / "weights.pt")
    (d / "model.json").write_text(json.dumps({"config": cfg.model_dump(mode="json"), "vocab_size": tok.get_vocab_size()}))
    tok.save(str(d / "tokenizer.json"))
    return d


def test_shallow_fusion_lets_the_lm_flip_the_decision(tmp_path):
    from carousel.tracking.asr_model import load_fusion

    v = Vocabulary()
    a, b, c = v.encode("abc")
    # The acoustic model slightly prefers "ab" over "ac"; the LM strongly prefers "c".
    rows = np.full((3, v.size), 1e-4)
    rows[0, a] = 0.9
    rows[1, b], rows[1, c] = 0.55, 0.45
    rows[2, 0] = 0.9
    lp = emissions(rows)
    lm_dir = char_lm(tmp_path, DEFAULT_CHARS + "ABC.,", {"c": 3.0})
    assert v.decode(beam_decode(lp, beam_width=8)) == "ab"
    fused = load_fusion(lm_dir, v, weight=1.0, word_bonus=0.0)
    assert v.decode(beam_decode(lp, beam_width=8, fusion=fused)) == "ac"
    # Weight 0 is plain beam search.
    assert v.decode(beam_decode(lp, beam_width=8, fusion=load_fusion(lm_dir, v, 0.0, 0.0))) == "ab"
    # Case-insensitive: "C" counts for "c" too, and punctuation mass is renormalized away.
    node = fused.expand([(fused.root(), c)])[0]
    probs = torch.exp(node.next_logp)
    assert abs(float(probs.sum()) - 1) < 1e-5
    # P("c") = P(c) + P(C) = e^3 + 1 against P(b) + P(B) = 2 (unnormalized): "B" counts too.
    assert abs(float(probs[fused.index["c"]] / probs[fused.index["b"]]) - (np.exp(3) + 1) / 2) < 1e-3
    assert abs(float(probs[fused.index["x"]] / probs[fused.index["b"]]) - 0.5) < 1e-4  # no "X" in the LM


def test_word_bonus_and_multi_character_units_score_consistently(tmp_path):
    from carousel.data.speech import BPEUnits
    from carousel.models.lm_fusion import CharLMFusion
    from carousel.tracking.asr_model import load_fusion
    from carousel.tracking.lm_model import LoadedLM

    v = Vocabulary()
    # "a b" vs "ab": the space is a little less likely than not; a word bonus flips it.
    a, sp, b = v.encode("a b")
    rows = np.full((4, v.size), 1e-4)
    rows[0, a] = 0.9
    rows[1, 0], rows[1, sp] = 0.55, 0.45
    rows[2, b] = 0.9
    rows[3, 0] = 0.9
    lp = emissions(rows)
    lm_dir = char_lm(tmp_path, DEFAULT_CHARS, {})  # uniform LM: only the bonus matters
    assert v.decode(beam_decode(lp, fusion=load_fusion(lm_dir, v, 0.1, 0.0))) == "ab"
    assert v.decode(beam_decode(lp, fusion=load_fusion(lm_dir, v, 0.1, 1.0))) == "a b"
    # A BPE piece is scored as the characters it writes, one LM step each.
    units = BPEUnits.train(TEXTS, 60, DEFAULT_CHARS)
    lm = LoadedLM(lm_dir)
    torch.manual_seed(1)
    with torch.no_grad():
        lm.model.head.weight.normal_()  # context now matters
    texts = [""] + [units.piece(i) for i in range(1, units.size)]
    f_bpe = CharLMFusion.from_tokenizer(lm.model, lm.tokenizer, texts)
    f_chr = CharLMFusion.from_tokenizer(lm.model, lm.tokenizer, [""] + [v.piece(i) for i in range(1, v.size)])
    node = f_bpe.root()
    for i in units.encode("the earth"):
        node = f_bpe.expand([(node, i)])[0]
    ref = f_chr.root()
    for i in v.encode("the earth"):
        ref = f_chr.expand([(ref, i)])[0]
    assert node.text == ref.text == "the earth" and node.words == 2
    assert abs(node.lm_score - ref.lm_score) < 1e-4


def test_only_character_lms_covering_the_units_fuse(tmp_path):
    from carousel.data.tokenizer import train_tokenizer
    from carousel.models.lm_fusion import CharLMFusion
    from carousel.tracking.asr_model import load_fusion

    bpe = train_tokenizer("bpe", TEXTS, 300)
    with pytest.raises(ValueError, match="only a character-level LM"):
        CharLMFusion.from_tokenizer(None, bpe, ["", "a"])
    with pytest.raises(ValueError, match="lacks characters the recognizer writes: 'qxz'"):
        load_fusion(char_lm(tmp_path, "abcdefghijklmnoprstuvwy' ", {}), Vocabulary(), 0.5, 0.0)
    with pytest.raises(FileNotFoundError, match="neither a models:/ URI"):
        load_fusion(tmp_path / "nowhere", Vocabulary(), 0.5, 0.0)


def test_fusion_and_normalization_config_errors_name_the_field():
    with pytest.raises(SpecError, match="speech.lm: shallow fusion needs decoder: beam"):
        spec_from_dict(apply_overrides(BASE, ["speech.lm=models:/kjv-char@best"]))
    with pytest.raises(SpecError, match="speech.normalization"):
        spec_from_dict(apply_overrides(BASE, ["speech.normalization=utterance"]))
    spec = spec_from_dict(apply_overrides(BASE, ["speech.lm=models:/kjv-char@best", "speech.decoder=beam",
                                                 "speech.normalization=speaker"]))
    assert spec.speech.lm_weight == 0.5 and spec.speech.word_bonus == 0.0


def test_lazy_fusion_search_equals_scoring_every_prefix(tmp_path):
    """Peeking (scores from the parent, LM states only for the top prefixes) must pick exactly what
    materializing every new prefix picks, for character and multi-character (BPE) units."""
    from carousel.data.speech import BPEUnits
    from carousel.models.lm_fusion import CharLMFusion
    from carousel.tracking.lm_model import LoadedLM

    lm = LoadedLM(char_lm(tmp_path, DEFAULT_CHARS, {}))
    torch.manual_seed(3)
    with torch.no_grad():
        lm.model.head.weight.normal_(0, 2.0)

    class Eager:  # the same fusion, every peeked child materialized at once
        def __init__(self, f):
            self.f, self.weight, self.word_bonus = f, f.weight, f.word_bonus

        def root(self):
            return self.f.root()

        def peek(self, parent, unit):
            return self.f.expand([(parent, unit)])[0]

        def materialize(self, nodes):
            raise AssertionError("eager nodes are always ready")

    rng = np.random.default_rng(0)
    for units in (Vocabulary(), BPEUnits.train(TEXTS, 60, DEFAULT_CHARS)):
        texts = [""] + [units.piece(i) for i in range(1, units.size)]
        lazy = CharLMFusion.from_tokenizer(lm.model, lm.tokenizer, texts, weight=0.8, word_bonus=0.5)
        for _ in range(3):
            # A few strong symbols per step, as trained models emit, so the eager search stays small.
            lp = np.log(rng.dirichlet(np.full(units.size, 0.05), size=8) + 1e-9)
            want = beam_decode(lp, beam_width=4, prune=6.0, fusion=Eager(lazy))
            assert len(want) >= 2 and beam_decode(lp, beam_width=4, prune=6.0, fusion=lazy) == want
