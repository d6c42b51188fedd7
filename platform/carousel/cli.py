"""`carousel`: the command line. The only place that reads the environment and the working directory."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False, help="Deep stacked LSTM models on Ray Train + DeepSpeed + MLflow.")
prepare_app = typer.Typer(no_args_is_help=True, help="Turn corpora into Arrow shards + manifest.")
data_app = typer.Typer(no_args_is_help=True, help="Inspect prepared datasets.")
app.add_typer(prepare_app, name="prepare")
app.add_typer(data_app, name="data")

SetOpt = Annotated[Optional[list[str]], typer.Option("--set", help="override a spec field: a.b=value (repeatable)")]
AddressOpt = Annotated[Optional[str], typer.Option("--address", envvar="RAY_ADDRESS", help="Ray cluster address (default: an embedded local Ray)")]


def _fail(msg: str, code: int = 2) -> None:
    typer.secho(msg, fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


def _absolute(spec):
    """Relative local paths are relative to where the command runs; workers may run elsewhere."""
    if "://" not in spec.data.path:
        spec.data.path = os.path.abspath(spec.data.path)
    if "://" not in spec.run.storage_path:
        spec.run.storage_path = os.path.abspath(spec.run.storage_path)
    if spec.run.init_from and "://" not in spec.run.init_from:
        spec.run.init_from = os.path.abspath(spec.run.init_from)
    return spec


def _load(job: Path, overrides: list[str] | None):
    from carousel.config import SpecError, load_spec
    from carousel.data.shards import DataError
    from carousel.train.launcher import preflight
    from carousel.train.warm_start import WarmStartError, check_init_from

    try:
        spec = _absolute(load_spec(job, overrides or []))
        preflight(spec)
        check_init_from(spec)
    except (SpecError, DataError, WarmStartError) as e:
        _fail(str(e))
    return spec


@prepare_app.command("text")
def prepare_text(
    out: Annotated[str, typer.Option("--out", "-o", help="dataset directory (or s3://, gs:// URI)")],
    kjv: Annotated[bool, typer.Option("--kjv", help="the King James Bible from Debian's bible-kjv")] = False,
    input: Annotated[Optional[list[str]], typer.Option("--input", "-i", help="text file or directory (repeatable)")] = None,
    tokenizer: Annotated[str, typer.Option(help="bpe | char | word")] = "bpe",
    vocab_size: Annotated[int, typer.Option(help="tokenizer vocabulary size")] = 4000,
    tokenizer_file: Annotated[Optional[Path], typer.Option(help="use this tokenizer.json instead of training one")] = None,
    shard_lines: Annotated[int, typer.Option(help="lines per Arrow shard")] = 4096,
    valid_fraction: Annotated[float, typer.Option(help="user files: share held out for validation")] = 0.05,
    test_fraction: Annotated[float, typer.Option(help="user files: share held out for test")] = 0.05,
    max_verses: Annotated[Optional[int], typer.Option(help="KJV: use only about this many verses (tests)")] = None,
    overwrite: Annotated[bool, typer.Option(help="replace an existing dataset")] = False,
    address: AddressOpt = None,
) -> None:
    """Tokenize a text corpus into Arrow shards (in parallel Ray tasks) with a manifest."""
    from carousel.data.corpus import read_kjv, read_text_files
    from carousel.data.prepare import prepare_text as run
    from carousel.data.shards import DataError
    from carousel.ray_session import RayConnectionError, init_ray

    if kjv == bool(input):
        _fail("give exactly one source: --kjv or --input PATH")
    if tokenizer not in ("bpe", "char", "word"):
        _fail(f"--tokenizer: {tokenizer!r} is not one of bpe, char, word")
    try:
        corpus = read_kjv(max_verses) if kjv else read_text_files(input, valid_fraction, test_fraction)
        for r in corpus.rejected:
            typer.secho(f"skipped {r['file']}:{r['line']}: {r['reason']}", fg=typer.colors.YELLOW, err=True)
        init_ray(address)
        res = run(corpus, str(out), tokenizer, vocab_size, str(tokenizer_file) if tokenizer_file else None, shard_lines, overwrite)
    except (DataError, RayConnectionError) as e:
        _fail(str(e))
    m = res.manifest
    typer.echo(f"prepared {res.root} in {res.seconds:.1f}s: tokenizer {m.tokenizer['type']} ({m.tokenizer['vocab_size']} tokens)")
    for name, split in m.splits.items():
        typer.echo(f"  {name:5s} {len(split.shards):3d} shards {split.rows:8d} lines {split.tokens:10d} tokens")
    if m.rejected:
        typer.echo(f"  rejected {len(m.rejected)} lines (listed in the manifest)")


def _voice_list(value: str | None, default: list[str]) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()] if value else list(default)


@prepare_app.command("speech")
def prepare_speech(
    out: Annotated[str, typer.Option("--out", "-o", help="dataset directory (or s3://, gs:// URI)")],
    manifest: Annotated[Optional[Path], typer.Option("--manifest", "-m", help="JSONL or CSV: audio, text, [speaker], [split]")] = None,
    synthesize: Annotated[bool, typer.Option("--synthesize", help="speak text with flite and espeak-ng voices")] = False,
    text: Annotated[Optional[list[str]], typer.Option("--text", help="--synthesize: text file(s) to speak (default: KJV)")] = None,
    utterances: Annotated[int, typer.Option(help="--synthesize: training utterances")] = 2000,
    held_out: Annotated[int, typer.Option(help="--synthesize: utterances in each of valid and test")] = 200,
    voices: Annotated[Optional[str], typer.Option(help="--synthesize: training voices, e.g. flite:awb,espeak:en-us+f3")] = None,
    valid_voices: Annotated[Optional[str], typer.Option(help="--synthesize: held-out voices for validation")] = None,
    test_voices: Annotated[Optional[str], typer.Option(help="--synthesize: held-out voices for test")] = None,
    max_chars: Annotated[int, typer.Option(help="--synthesize: longest phrase, in characters")] = 80,
    seed: Annotated[int, typer.Option(help="--synthesize: phrase order, voices' speeds and pitches")] = 0,
    valid_fraction: Annotated[float, typer.Option(help="--manifest: share of speakers (or files) held out for validation")] = 0.1,
    test_fraction: Annotated[float, typer.Option(help="--manifest: share held out for test")] = 0.1,
    chars: Annotated[str, typer.Option(help="the character vocabulary (after lower-casing; punctuation becomes space)")] = " 'abcdefghijklmnopqrstuvwxyz",
    units: Annotated[str, typer.Option(help="CTC output units: char, or bpe (trained on the training transcripts)")] = "char",
    vocab_size: Annotated[int, typer.Option(help="--units bpe: vocabulary size, characters included")] = 256,
    sample_rate: Annotated[int, typer.Option(help="audio is resampled to this rate")] = 16000,
    n_mels: Annotated[int, typer.Option(help="log-mel filterbank bins")] = 80,
    shard_utts: Annotated[int, typer.Option(help="utterances per Arrow shard (one Ray task each)")] = 128,
    overwrite: Annotated[bool, typer.Option(help="replace an existing dataset")] = False,
    address: AddressOpt = None,
) -> None:
    """Speech corpus -> log-mel features in Arrow shards (parallel Ray tasks) with a manifest."""
    from carousel.data import speech as sp
    from carousel.data.corpus import read_kjv, read_text_files
    from carousel.data.shards import DataError
    from carousel.ray_session import RayConnectionError, init_ray

    if synthesize == bool(manifest):
        _fail("give exactly one source: --manifest FILE or --synthesize")
    if units not in ("char", "bpe"):
        _fail(f"--units: {units!r} is not char or bpe")
    vocab = sp.Vocabulary(chars)
    settings = sp.FeatureSettings(sample_rate=sample_rate, n_mels=n_mels)
    try:
        if manifest:
            items, rejected, source = sp.read_speech_manifest(manifest, vocab, valid_fraction, test_fraction)
        else:
            vs = {"train": _voice_list(voices, sp.DEFAULT_VOICES["train"]),
                  "valid": _voice_list(valid_voices, sp.DEFAULT_VOICES["valid"]),
                  "test": _voice_list(test_voices, sp.DEFAULT_VOICES["test"])}
            sp.check_engines([v for split in vs.values() for v in split])
            corpus = read_text_files(text, 0.05, 0.05) if text else read_kjv()
            texts = {s: [t for _, t in corpus.records[s]] for s in sp.SPLITS}
            items, rejected = sp.synthesis_items(texts, vs, {"train": utterances, "valid": held_out, "test": held_out},
                                                 vocab, seed, max_chars)
            source = {"corpus": "synthesized", "text": corpus.source, "voices": vs, "seed": seed, "max_chars": max_chars}
        if units == "bpe":
            vocab = sp.BPEUnits.train([it.text for it in items["train"]], vocab_size, chars)
        init_ray(address)
        res = sp.prepare_speech(items, str(out), source, rejected, vocab, settings, shard_utts, overwrite)
    except (DataError, RayConnectionError) as e:
        _fail(str(e))
    for r in res.rejected:
        where = r.get("where") or f"{r.get('file')}:{r.get('line')}"
        typer.secho(f"skipped {where}: {r['reason']}", fg=typer.colors.YELLOW, err=True)
    st = res.manifest.speech["splits"]
    typer.echo(f"prepared {res.root} in {res.seconds:.1f}s: {res.utterances} utterances "
               f"({res.utterances / max(res.seconds, 1e-9):.1f} utt/s; {res.task_seconds:.1f} task-seconds); "
               f"{vocab.size - 1} {vocab.kind} units + blank")
    for name, s in st.items():
        typer.echo(f"  {name:5s} {s['utterances']:6d} utterances {s['seconds'] / 60:7.1f} min {s['frames']:9d} frames "
                   f"{len(s['speakers']):3d} speakers")
    typer.echo(f"  rejected {len(res.rejected)} (listed in the manifest)")


@data_app.command("verify")
def data_verify(path: str) -> None:
    """Check a dataset: manifest, every shard's size and sha256, full Arrow validation, counts."""
    from carousel.data.shards import DataError, Dataset

    try:
        report = Dataset(path).verify()
    except DataError as e:
        _fail(f"FAILED: {e}", 1)
    for name, r in report.items():
        typer.echo(f"ok {name}: {r['shards']} shards, {r['rows']} rows, {r['tokens']} tokens")


@app.command()
def validate(job: Path, set: SetOpt = None) -> None:
    """Check a job spec (and its data) and print it resolved, without running anything."""
    import yaml

    spec = _load(job, set)
    typer.echo(yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False))


@app.command()
def train(
    job: Annotated[Optional[Path], typer.Argument(help="job spec YAML")] = None,
    set: SetOpt = None,
    resume: Annotated[Optional[str], typer.Option(help="continue the stopped run NAME (under run.storage_path)")] = None,
    storage_path: Annotated[str, typer.Option(help="with --resume: where the run lives")] = "runs",
    address: AddressOpt = None,
) -> None:
    """Train a model: validate the spec, open (or resume) the MLflow run, run Ray Train + DeepSpeed."""
    from carousel.config import SpecError, apply_overrides, spec_from_dict
    from carousel.tracking.runs import RunRecord
    from carousel.train.launcher import train as run_training

    if resume:
        record = RunRecord.load(storage_path, resume)
        if record is None:
            _fail(f"--resume {resume}: no run named {resume!r} under {os.path.abspath(storage_path)}")
        try:
            spec = spec_from_dict(apply_overrides(record.spec, (set or []) + [f"run.name={resume}"]), f"run {resume}")
        except SpecError as e:
            _fail(str(e))
        spec = _absolute(spec)
    elif job is None:
        _fail("give a job spec (carousel train JOB.yaml) or --resume NAME")
    else:
        spec = _load(job, set)
    from carousel.tracking.store import TrackingUnavailable, require_tracking_server, resolve_tracking_uri

    try:  # a tracking server down or refusing at start: fail here, before Ray or a run starts
        require_tracking_server(resolve_tracking_uri(spec.tracking.uri))
    except TrackingUnavailable as e:
        _fail(str(e))
    from carousel.ray_session import RayConnectionError
    from carousel.train.capacity import ClusterTooSmall
    from carousel.train.launcher import RunFailed

    try:
        outcome = run_training(spec, address)
    except (ClusterTooSmall, RayConnectionError) as e:  # nothing started: no run, no checkpoint
        _fail(str(e))
    except RunFailed as e:
        _fail(f"{e}\n  its checkpoints are kept; continue with: carousel train --resume {e.run_name} "
              f"--storage-path {spec.run.storage_path}", 1)
    m = outcome.metrics
    typer.echo("")
    typer.secho(f"run {outcome.run_name}: {outcome.status} in {outcome.seconds:.0f}s", bold=True)
    if "best_val_ppl" in m:
        typer.echo(f"  best validation perplexity {m['best_val_ppl']:.2f}")
    if "test_ppl" in m:
        typer.echo(f"  test perplexity            {m['test_ppl']:.2f}")
    if "best_val_cer" in m:
        typer.echo(f"  best validation CER        {m['best_val_cer']:.2%}")
    for label, key in (("test", "test"), ("LibriVox", "librivox")):
        cer, wer = m.get(f"{key}_cer", outcome.model.get("metrics", {}).get(f"{key}_cer")), \
            m.get(f"{key}_wer", outcome.model.get("metrics", {}).get(f"{key}_wer"))
        if cer is not None:
            typer.echo(f"  {label + ' CER / WER':26s} {cer:.2%} / {wer:.2%}")
    if outcome.model.get("registered_model"):
        alias = outcome.model.get("alias")
        typer.echo(f"  registered model           models:/{outcome.model['registered_model']}/{outcome.model['version']}"
                   + (f" (alias @{alias})" if alias else ""))
    for s in outcome.model.get("samples", []):
        typer.echo("  sample: " + s.replace("\n", " / "))
    if outcome.status == "HALTED":
        typer.echo(f"  halted at step {m.get('step')}; continue with: carousel train --resume {outcome.run_name} "
                   f"--storage-path {spec.run.storage_path}")
    typer.echo(f"  MLflow: carousel ui   (tracking {outcome.tracking_uri}, run {outcome.mlflow_run_id})")


# Hyperparameter search (issue 4): `carousel tune`, beside `train`; the command lives with its code.
from carousel.tune.cli import tune  # noqa: E402

app.command()(tune)


def _load_lm(model: str | None, checkpoint: str | None):
    from carousel.tracking.lm_model import LoadedLM

    return LoadedLM(_model_dir(model, checkpoint))


@app.command()
def generate(
    prompt: Annotated[str, typer.Option(help="text to continue")] = "In the beginning",
    model: Annotated[Optional[str], typer.Option(help="MLflow model URI, e.g. models:/kjv-lstm@best")] = None,
    checkpoint: Annotated[Optional[str], typer.Option(help="a Carousel checkpoint directory")] = None,
    max_tokens: int = 60,
    temperature: float = 0.8,
    top_k: int = 40,
    seed: int = 0,
    num: Annotated[int, typer.Option(help="number of samples")] = 1,
) -> None:
    """Sample text from a registered model or a checkpoint."""
    lm = _load_lm(model, checkpoint)
    for i in range(num):
        typer.echo(lm.generate(prompt, max_tokens, temperature, top_k or None, seed + i))


def _model_dir(model: str | None, checkpoint: str | None) -> Path:
    """A model/ directory from a checkpoint (verified) or from MLflow (downloaded)."""
    from carousel.train import checkpoint as ckpt

    if bool(model) == bool(checkpoint):
        _fail("give exactly one of --model URI or --checkpoint DIR")
    if checkpoint:
        try:
            ckpt.verify(checkpoint, ckpt.read_meta(checkpoint)["world_size"])
        except ckpt.CheckpointError as e:
            _fail(str(e))
        return Path(checkpoint) / ckpt.MODEL_DIR
    import mlflow

    from carousel.tracking.store import resolve_tracking_uri

    uri = resolve_tracking_uri()
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    return Path(mlflow.artifacts.download_artifacts(artifact_uri=f"{model.rstrip('/')}/artifacts/model"))


@app.command()
def transcribe(
    files: Annotated[list[Path], typer.Argument(help="audio files (WAV, FLAC; any sample rate)")],
    model: Annotated[Optional[str], typer.Option(help="MLflow model URI, e.g. models:/asr-flite@best")] = None,
    checkpoint: Annotated[Optional[str], typer.Option(help="a Carousel checkpoint directory")] = None,
    decoder: Annotated[str, typer.Option(help="greedy | beam")] = "greedy",
    beam_width: int = 16,
    lm: Annotated[Optional[str], typer.Option(help="beam: fuse this char-level LM (models:/NAME@ALIAS or a checkpoint); "
                                                   "default: the LM a --model was published with, if any")] = None,
    lm_weight: Annotated[Optional[float], typer.Option(help="LM weight (default: the published one, else 0.5; 0: no LM)")] = None,
    word_bonus: Annotated[Optional[float], typer.Option(help="score bonus per word (default: the published one, else 0)")] = None,
    same_speaker: Annotated[bool, typer.Option(help="speaker-normalized models: the files share one speaker, "
                                                    "normalize with their pooled statistics (default: each file's own)")] = False,
) -> None:
    """Transcribe audio files with a speech (ctc) model: one `FILE<TAB>text` line each."""
    from carousel.tracking.asr_model import LoadedASR, bundled_lm_dir

    if decoder not in ("greedy", "beam"):
        _fail(f"--decoder: {decoder!r} is not greedy or beam")
    if lm and decoder != "beam":
        _fail("--lm: shallow fusion needs --decoder beam")
    try:
        asr = LoadedASR(_model_dir(model, checkpoint))
        lm_ref = lm or (bundled_lm_dir(model) if model and decoder == "beam" else None)
        published = lm is None and lm_ref is not None
        weight = lm_weight if lm_weight is not None else asr.meta.get("lm_weight", 0.5) if published else 0.5
        bonus = word_bonus if word_bonus is not None else asr.meta.get("word_bonus", 0.0) if published else 0.0
        if lm_ref and weight > 0:
            asr.use_lm(lm_ref, weight, bonus)
    except (ValueError, OSError) as e:
        _fail(str(e))
    failed = 0
    if same_speaker:
        try:
            texts = asr.transcribe_speaker(files, decoder, beam_width)
        except Exception as e:  # noqa: BLE001 - pooled statistics need every file
            _fail(f"cannot transcribe the files as one speaker ({type(e).__name__}: {e})", 1)
        for f, text in zip(files, texts):
            typer.echo(f"{f}\t{text}")
        return
    for f in files:
        try:
            text = asr.transcribe(f, decoder, beam_width)
        except Exception as e:  # noqa: BLE001 - name the file, go on with the others
            typer.secho(f"{f}: cannot transcribe ({type(e).__name__}: {e})", fg=typer.colors.RED, err=True)
            failed += 1
            continue
        typer.echo(f"{f}\t{text}")
    if failed:
        raise typer.Exit(1)


@app.command("eval")
def evaluate(
    data: Annotated[str, typer.Option(help="prepared dataset directory")],
    model: Annotated[Optional[str], typer.Option(help="MLflow model URI")] = None,
    checkpoint: Annotated[Optional[str], typer.Option(help="a Carousel checkpoint directory")] = None,
    split: str = "test",
    batch_size: int = 16,
    bptt: int = 64,
) -> None:
    """Perplexity of a model on a dataset split (same stream layout as training, one process)."""
    import math

    import torch

    from carousel.data.shards import DataError, Dataset
    from carousel.data.streams import StreamLoader

    lm = _load_lm(model, checkpoint)
    try:
        ds = Dataset(data)
        if ds.manifest.tokenizer["sha256"] != lm.meta.get("tokenizer_sha256"):
            _fail(f"{data}: its tokenizer is not the one the model was trained with")
        loader = StreamLoader(ds, split, 0, 1, batch_size, bptt)
    except DataError as e:
        _fail(str(e))
    nll, count, state = 0.0, 0, None
    with torch.no_grad():
        for x, y, _ in loader:
            loss, state = lm.model(x, state, targets=y)
            nll += float(loss) * y.numel()
            count += y.numel()
    typer.echo(json.dumps({"split": split, "tokens": count, "loss": nll / count, "ppl": math.exp(nll / count)}))


@app.command()
def ui(
    port: int = 5000,
    host: Annotated[str, typer.Option(help="bind address; 127.0.0.1 keeps it private")] = "127.0.0.1",
) -> None:
    """Serve the MLflow UI for the default store (or $MLFLOW_TRACKING_URI)."""
    from carousel.tracking.store import DEFAULT_ARTIFACTS, resolve_tracking_uri

    uri = resolve_tracking_uri()
    typer.echo(f"MLflow UI for {uri} at http://{host}:{port}")
    cmd = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--host", host, "--port", str(port)]
    if uri.startswith("sqlite:///"):
        cmd += ["--default-artifact-root", Path(DEFAULT_ARTIFACTS).resolve().as_uri()]
    os.execv(sys.executable, cmd)


# Ray Jobs and the local cluster (issue 5): their commands live beside their code.
from carousel.cluster.cli import cluster_app  # noqa: E402
from carousel.jobs.cli import jobs_app, submit  # noqa: E402

app.command()(submit)
app.add_typer(jobs_app, name="jobs")
app.add_typer(cluster_app, name="cluster")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
