"""Speech data, batching, model and decoding: everything that needs no Ray."""

import json

import numpy as np
import pytest
import soundfile as sf
import torch

from carousel.config import CTCModelConfig, SpecError, apply_overrides, spec_from_dict
from carousel.data.shards import Dataset
from carousel.data.speech import (
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
    out = _shard_task(flat, SETTINGS, Vocabulary().chars, str(tmp_path / "x.arrow"))
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
