"""Speech end to end on a real Ray cluster: synthesize + prepare with the CLI, 2-worker CTC training
(speaker normalization, beam decoding fused with a char LM), MLflow metrics/table/registry, halt +
resume, `carousel transcribe` and the pyfunc on audio files, BPE units."""

import json
import subprocess

import pytest

from conftest import BIN, ROOT, run, tracking_client, with_empty_store

pytestmark = pytest.mark.integration
JOB = ROOT / "jobs" / "asr-flite-tiny.yaml"


@pytest.fixture(scope="session")
def asr_tiny(tmp_path_factory, cluster_env):
    """240 + 32 + 32 synthesized utterances; valid and test voices never heard in training."""
    out = tmp_path_factory.mktemp("data") / "asr-tiny"
    proc = run([BIN / "carousel", "prepare", "speech", "--synthesize", "--utterances", "240", "--held-out", "32",
                "--max-chars", "60", "--shard-utts", "60", "--out", out], env=cluster_env)
    assert "utt/s" in proc.stdout
    return out


def char_lm_dir(directory):
    """A character-level Carousel LM's model/ directory, as an LM run exports it. Its weights are
    random: fusion's quality is measured by the demo (docs/speech.md), this checks the plumbing."""
    import torch

    from carousel.config import ModelConfig
    from carousel.data.tokenizer import train_tokenizer
    from carousel.models.lm import LanguageModel

    tok = train_tokenizer("char", ["In the beginning God created the heaven and the earth.",
                                   " 'abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ,.;:"], 200)
    cfg = ModelConfig(layers=1, hidden=32, embed=32)
    torch.manual_seed(0)
    directory.mkdir(parents=True)
    torch.save(LanguageModel(cfg, tok.get_vocab_size()).state_dict(), directory / "weights.pt")
    (directory / "model.json").write_text(json.dumps({"config": cfg.model_dump(mode="json"),
                                                      "vocab_size": tok.get_vocab_size()}))
    tok.save(str(directory / "tokenizer.json"))
    return directory


@pytest.fixture(scope="module")
def trained(tmp_path_factory, asr_tiny, cluster_env, mlflow_store_template):
    work = with_empty_store(tmp_path_factory.mktemp("asr"), mlflow_store_template)
    lm = char_lm_dir(work / "lm")
    proc = run([BIN / "carousel", "train", JOB, "--set", f"data.path={asr_tiny}", "--set", "speech.normalization=speaker",
                "--set", "speech.decoder=beam", "--set", "speech.beam_width=4", "--set", f"speech.lm={lm}",
                "--set", "speech.lm_weight=0.3"], cwd=work, env=cluster_env)
    return work, proc.stdout + proc.stderr


def mlflow_run(work, name="asr-flite-tiny"):
    c = tracking_client(work)
    exp = c.get_experiment_by_name("carousel-tests")
    (r,) = c.search_runs([exp.experiment_id], f"attributes.run_name = '{name}'")
    return c, r


def test_prepared_corpus_holds_out_whole_voices(asr_tiny):
    m = json.loads((asr_tiny / "manifest.json").read_text())
    st = m["speech"]["splits"]
    assert m["kind"] == "speech" and st["train"]["utterances"] == 240 and st["valid"]["utterances"] == 32
    assert not set(st["train"]["speakers"]) & (set(st["valid"]["speakers"]) | set(st["test"]["speakers"]))
    assert len(m["speech"]["normalization"]["mean"]) == 80 and m["speech"]["rejected"] == 0
    run([BIN / "carousel", "data", "verify", asr_tiny])


def test_training_reports_frames_and_validation_cer_falls(trained):
    work, out = trained
    assert "BiGRU hidden 96 -> CTC over 29 symbols (char)" in out and "speaker normalization" in out
    assert "step 80/80 | loss" in out and "frames/s" in out
    assert "best validation CER" in out and "registered model" in out
    c, r = mlflow_run(work)
    assert r.info.status == "FINISHED" and r.data.tags["carousel.family"] == "ctc"
    cer = c.get_metric_history(r.info.run_id, "val_cer")
    assert [m.step for m in cer] == [20, 40, 60, 80]
    assert cer[-1].value < 0.95 * cer[0].value, [m.value for m in cer]
    for key in ("test_cer", "test_wer", "test_cer_beam", "test_cer_beam_lm", "test_wer_beam_lm", "librivox_cer",
                "librivox_wer", "librivox_cer_greedy", "librivox_cer_beam_lm", "frames_per_s"):
        assert c.get_metric_history(r.info.run_id, key), key
    names = {a.path for a in c.list_artifacts(r.info.run_id)}
    assert {"samples.json", "vocab.json", "spec.yaml"} <= names
    table = json.loads(open(c.download_artifacts(r.info.run_id, "samples.json")).read())
    assert {"reference", "greedy", "beam", "beam_lm", "split"} <= set(table["columns"])
    assert {row[table["columns"].index("split")] for row in table["data"]} == {"test", "librivox"}
    mv = c.get_model_version_by_alias("asr-flite-tiny", "best")
    assert mv.run_id == r.info.run_id and 0 <= float(mv.tags["val_cer"]) < 1


def test_transcribe_files_with_the_registered_model_and_the_pyfunc(trained, cluster_env, tmp_path):
    import mlflow
    import pandas as pd

    work, _ = trained
    wav = tmp_path / "said.wav"
    subprocess.run(["flite", "-voice", "slt", "-t", "the lord is my shepherd", "-o", str(wav)], check=True)
    flac = tmp_path / "said.flac"
    subprocess.run(["espeak-ng", "-v", "en-gb-scotland", "-w", str(tmp_path / "e.wav"), "and god said"], check=True)
    import soundfile as sf

    audio, sr = sf.read(tmp_path / "e.wav")
    sf.write(flac, audio, sr)
    proc = run([BIN / "carousel", "transcribe", "--model", "models:/asr-flite-tiny@best", wav, flac], cwd=work, env=cluster_env)
    lines = proc.stdout.strip().splitlines()
    assert [ln.split("\t")[0] for ln in lines] == [str(wav), str(flac)]
    cli_text = lines[0].split("\t", 1)[1]

    uri = f"sqlite:///{work / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    model = mlflow.pyfunc.load_model("models:/asr-flite-tiny@best")
    by_bytes, by_path = model.predict(pd.DataFrame({"audio": [wav.read_bytes(), None], "path": [None, str(wav)]}))
    assert by_bytes == by_path == cli_text
    # The published model carries its fusion LM: beam decoding fuses it in the pyfunc and the CLI alike.
    frame = pd.DataFrame({"path": [str(wav), str(flac)]})
    fused = run([BIN / "carousel", "transcribe", "--model", "models:/asr-flite-tiny@best", "--decoder", "beam",
                 "--beam-width", "4", wav, flac], cwd=work, env=cluster_env)
    assert [ln.split("\t", 1)[1] for ln in fused.stdout.strip().splitlines()] == \
        model.predict(frame, params={"decoder": "beam", "beam_width": 4})
    plain = run([BIN / "carousel", "transcribe", "--model", "models:/asr-flite-tiny@best", "--decoder", "beam",
                 "--beam-width", "4", "--lm-weight", "0", "--same-speaker", wav, flac], cwd=work, env=cluster_env)
    assert len(plain.stdout.strip().splitlines()) == 2

    best = sorted((work / "runs" / "asr-flite-tiny").glob("checkpoint-*"))[-1]
    beam = run([BIN / "carousel", "transcribe", "--checkpoint", best, "--decoder", "beam", wav], cwd=work, env=cluster_env)
    assert beam.stdout.startswith(f"{wav}\t")
    missing = run([BIN / "carousel", "transcribe", "--checkpoint", best, tmp_path / "nope.wav"], cwd=work,
                  env=cluster_env, check=False)
    assert missing.returncode == 1 and "nope.wav: cannot transcribe" in missing.stderr


def test_bpe_units_prepare_and_validate(tmp_path, cluster_env):
    from carousel.data.speech import units_from_json

    out = tmp_path / "bpe"
    run([BIN / "carousel", "prepare", "speech", "--synthesize", "--utterances", "24", "--held-out", "6",
         "--max-chars", "40", "--units", "bpe", "--vocab-size", "48", "--out", out], env=cluster_env)
    m = json.loads((out / "manifest.json").read_text())
    assert m["tokenizer"]["type"] == "bpe" and m["tokenizer"]["vocab_size"] == 49
    units = units_from_json((out / "vocab.json").read_text())
    assert units.kind == "bpe" and units.size == 49
    proc = run([BIN / "carousel", "validate", JOB, "--set", f"data.path={out}", "--set", "speech.normalization=speaker"],
               env=cluster_env)
    assert "normalization: speaker" in proc.stdout


COMMON = ["--set", "train.max_steps=16", "--set", "train.log_every=1", "--set", "train.eval_every=8",
          "--set", "run.checkpoint_every=8", "--set", "tracking.registered_model=null", "--set", "speech.librivox=false",
          "--set", "tracking.log_system_metrics=false", "--set", "train.warmup_steps=2"]


def test_halt_and_resume_matches_uninterrupted_run(workdir, asr_tiny, cluster_env):
    data = ["--set", f"data.path={asr_tiny}"]
    run([BIN / "carousel", "train", JOB, *COMMON, *data, "--set", "run.name=straight"], cwd=workdir, env=cluster_env)
    halted = run([BIN / "carousel", "train", JOB, *COMMON, *data, "--set", "run.name=staged",
                  "--set", "train.halt_at_step=8"], cwd=workdir, env=cluster_env)
    assert "HALTED" in halted.stdout
    resumed = run([BIN / "carousel", "train", "--resume", "staged", "--storage-path", "runs",
                   "--set", "train.halt_at_step=null"], cwd=workdir, env=cluster_env)
    assert "resuming at step 8" in resumed.stdout + resumed.stderr
    c = tracking_client(workdir)
    exp = c.get_experiment_by_name("carousel-tests")
    hist = {}
    for name in ("straight", "staged"):
        (r,) = c.search_runs([exp.experiment_id], f"attributes.run_name = '{name}'")
        hist[name] = {m.step: m.value for m in c.get_metric_history(r.info.run_id, "train_loss")}
    assert sorted(hist["staged"]) == list(range(1, 17))
    diffs = [abs(hist["straight"][s] - hist["staged"][s]) for s in range(1, 17)]
    assert max(diffs) < 1e-5, diffs


def test_bad_manifest_lines_are_reported_by_file_and_line(tmp_path, cluster_env):
    import numpy as np
    import soundfile as sf

    sf.write(tmp_path / "ok.wav", (0.1 * np.sin(np.arange(16000) / 5)).astype("float32"), 16000)
    (tmp_path / "broken.wav").write_bytes(b"RIFF....WAVEfmt garbage")
    rows = [("ok.wav", "a good line", "s1", "train"), ("gone.wav", "missing file", "s1", "train"),
            ("broken.wav", "unreadable file", "s1", "train"), ("ok.wav", "", "s1", "train"),
            ("ok.wav", "held out", "s2", "valid"), ("ok.wav", "tested", "s3", "test")]
    (tmp_path / "m.csv").write_text("audio,text,speaker,split\n" + "\n".join(",".join(r) for r in rows) + "\n")
    proc = run([BIN / "carousel", "prepare", "speech", "--manifest", tmp_path / "m.csv", "--out", tmp_path / "ds"],
               env=cluster_env)
    m = tmp_path / "m.csv"
    assert f"skipped {m}:3: audio file" in proc.stderr and "does not exist" in proc.stderr
    assert f"skipped {m}:4: cannot decode audio" in proc.stderr
    assert f"skipped {m}:5: empty transcript" in proc.stderr
    manifest = json.loads((tmp_path / "ds" / "manifest.json").read_text())
    assert manifest["speech"]["rejected"] == 3 and manifest["splits"]["train"]["rows"] == 1
