"""The speech model as an MLflow pyfunc (audio in, text out), its evaluation on real speech, and publishing.

Artifacts are the checkpoint's ``model/`` directory (fp32 weights with the normalization buffers,
model.json with the architecture and feature settings, vocab.json); audio of any rate is read,
resampled and featurized exactly as `carousel prepare speech` did, so a file transcribes the same
through `carousel transcribe`, ``mlflow.pyfunc.load_model`` or ``mlflow models serve``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
import torch

from carousel.config import CTCModelConfig
from carousel.data.speech import FeatureSettings, Vocabulary, fbank, load_audio, normalize_transcript
from carousel.models.ctc import CTCModel, beam_decode, greedy_decode

LIBRIVOX_DIR = Path("/usr/share/pocketsphinx/test/data/librivox")
DEFAULT_PARAMS = {"decoder": "greedy", "beam_width": 16}


class LoadedASR:
    """An acoustic model, its vocabulary and feature settings, loaded from a ``model/`` directory."""

    def __init__(self, model_dir: str | Path):
        model_dir = Path(model_dir)
        self.meta = json.loads((model_dir / "model.json").read_text())
        if self.meta.get("family") != "ctc":
            raise ValueError(f"{model_dir}: not a speech (ctc) model")
        self.vocab = Vocabulary.from_json((model_dir / "vocab.json").read_text())
        self.settings = FeatureSettings.from_dict(self.meta["features"])
        self.model = CTCModel(CTCModelConfig.model_validate(self.meta["config"]), self.meta["vocab_size"], self.settings.n_mels)
        state = torch.load(model_dir / "weights.pt", map_location="cpu", weights_only=True)
        self.model.load_state_dict(state)
        self.model.eval()

    @torch.no_grad()
    def log_probs(self, feats: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(np.ascontiguousarray(feats, dtype=np.float32))[None]
        lp, out_len = self.model(x, torch.tensor([x.size(1)]))
        return lp[0, : int(out_len[0])].numpy()

    def decode(self, log_probs: np.ndarray, decoder: str = "greedy", beam_width: int = 16) -> str:
        ids = beam_decode(log_probs, beam_width=beam_width) if decoder == "beam" else greedy_decode(log_probs)
        return self.vocab.decode(ids)

    def transcribe_features(self, feats: np.ndarray, decoder: str = "greedy", beam_width: int = 16) -> str:
        if len(feats) < self.model.stride:
            return ""
        return self.decode(self.log_probs(feats), decoder, beam_width)

    def transcribe(self, source: str | bytes | Path, decoder: str = "greedy", beam_width: int = 16) -> str:
        audio = load_audio(source, self.settings.sample_rate)
        return self.transcribe_features(fbank(audio, self.settings), decoder, beam_width)


class SpeechRecognizerPyfunc(mlflow.pyfunc.PythonModel):
    def load_context(self, context) -> None:
        self.asr = LoadedASR(context.artifacts["model"])

    def predict(self, context, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> list[str]:
        """Rows with ``path`` (an audio file) or ``audio`` (the bytes of one) -> transcripts."""
        p = {**DEFAULT_PARAMS, **(params or {})}
        out = []
        for _, row in model_input.iterrows():
            audio = row.get("audio")
            source = audio if isinstance(audio, (bytes, bytearray)) and len(audio) else row.get("path")
            if source is None or (isinstance(source, float) and np.isnan(source)):
                raise ValueError("each row needs `path` (an audio file) or `audio` (its bytes)")
            out.append(self.asr.transcribe(bytes(source) if isinstance(source, bytearray) else source,
                                           str(p["decoder"]), int(p["beam_width"])))
        return out


# ----------------------------------------------------------------------------- real speech


def librivox_clips(directory: Path = LIBRIVOX_DIR) -> list[tuple[Path, str]]:
    """(wav, transcript) of the LibriVox clips in Debian's pocketsphinx-testdata (empty if not installed)."""
    tfile = directory / "transcription"
    if not tfile.is_file():
        return []
    clips = []
    for line in tfile.read_text().splitlines():
        m = re.match(r"^\s*(?:<s>)?(.*?)(?:</s>)?\s*\(([^)]+)\)\s*$", line)
        if m and (directory / f"{m.group(2)}.wav").is_file():
            clips.append((directory / f"{m.group(2)}.wav", normalize_transcript(m.group(1))))
    return clips


def score(refs: list[str], hyps: list[str]) -> dict[str, float]:
    from carousel.train.ctc_unit import error_counts

    ce, cn, we, wn = error_counts(refs, hyps)
    return {"cer": ce / max(cn, 1), "wer": we / max(wn, 1)}


# ----------------------------------------------------------------------------- MLflow


def log_and_register(model_dir: str, registered_model: str | None, alias: str, metrics: dict[str, float]) -> dict[str, Any]:
    """Log the model into the active run; register it and move ``alias`` to it when its validation
    CER is at least as good as the holder's on the same vocabulary and features (else not comparable:
    the newer model takes the alias)."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

    import carousel

    signature = ModelSignature(
        inputs=Schema([ColSpec("string", "path", required=False), ColSpec("binary", "audio", required=False)]),
        outputs=Schema([ColSpec("string")]),
        params=ParamSchema([ParamSpec("decoder", "string", "greedy"), ParamSpec("beam_width", "long", 16)]),
    )
    info = mlflow.pyfunc.log_model(
        name="model",
        python_model=SpeechRecognizerPyfunc(),
        artifacts={"model": model_dir},
        code_paths=[str(Path(carousel.__file__).parent)],
        signature=signature,
        pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", "pydantic", "pandas", "numpy",
                          "soundfile", "soxr", "kaldi-native-fbank", "jiwer"],
        registered_model_name=registered_model,
    )
    out: dict[str, Any] = {"model_uri": info.model_uri}
    if not registered_model:
        return out
    from carousel.tracking.registry import register_version

    meta = json.loads((Path(model_dir) / "model.json").read_text())
    data_id = f"{meta['vocab_sha256']}:{json.dumps(meta['features'], sort_keys=True)}"
    out.update(register_version(registered_model, str(info.registered_model_version), alias, metrics,
                                data_id=data_id, metric="val_cer"))
    return out


def publish_asr(spec, tracking_uri: str, run_id: str, checkpoint_path: str, metrics: dict) -> dict:
    """Best checkpoint -> sample table, LibriVox (and beam) error rates, logged + registered model."""
    from carousel.data.shards import Dataset
    from carousel.data.speech_batches import SpeechSplit
    from carousel.train import checkpoint as ckpt

    meta = ckpt.read_meta(checkpoint_path)
    ckpt.verify(checkpoint_path, meta["world_size"])
    model_dir = str(Path(checkpoint_path) / ckpt.MODEL_DIR)
    asr = LoadedASR(model_dir)
    sp = spec.speech
    step = meta["step"]

    rows: list[dict[str, Any]] = []
    extra: dict[str, float] = {}
    test = SpeechSplit(Dataset(spec.data.path), spec.data.test_split, limit=sp.eval_utterances)
    refs, greedy, beam = [], [], []
    for i in range(len(test)):
        lp = asr.log_probs(test.features(i).astype(np.float32))
        refs.append(test.texts[i])
        greedy.append(asr.decode(lp, "greedy"))
        if sp.decoder == "beam":
            beam.append(asr.decode(lp, "beam", sp.beam_width))
        if i < sp.sample_rows:
            rows.append({"split": "test", "speaker": test.speakers[i], "reference": refs[-1], "greedy": greedy[-1],
                         "beam": beam[-1] if beam else "", "cer": score([refs[-1]], [greedy[-1]])["cer"]})
    if beam:
        s = score(refs, beam)
        extra.update(test_cer_beam=s["cer"], test_wer_beam=s["wer"])
    clips = librivox_clips() if sp.librivox else []
    if clips:
        lv_refs, lv_hyps = [], []
        for path, ref in clips:
            audio = load_audio(path, asr.settings.sample_rate)
            lp = asr.log_probs(fbank(audio, asr.settings))
            hyp = asr.decode(lp, sp.decoder, sp.beam_width)
            lv_refs.append(ref)
            lv_hyps.append(hyp)
            rows.append({"split": "librivox", "speaker": path.stem, "reference": ref,
                         "greedy": asr.decode(lp, "greedy"), "beam": hyp if sp.decoder == "beam" else "",
                         "cer": score([ref], [hyp])["cer"]})
        s = score(lv_refs, lv_hyps)
        extra.update(librivox_cer=s["cer"], librivox_wer=s["wer"])

    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_registry_uri(tracking_uri)
    best_metrics = {"val_cer": meta["metrics"]["val_cer"], "val_wer": meta["metrics"]["val_wer"], "step": step}
    for k in ("test_cer", "test_wer"):
        if k in metrics:
            best_metrics[k] = metrics[k]
    best_metrics.update(extra)
    with mlflow.start_run(run_id=run_id):
        if extra:
            mlflow.log_metrics(extra, step=step)
        if rows:
            mlflow.log_table(pd.DataFrame(rows), artifact_file="samples.json")
        mlflow.log_dict(spec.model_dump(mode="json"), "spec.yaml")
        mlflow.log_artifact(str(Path(model_dir) / "vocab.json"))
        out = log_and_register(model_dir, spec.tracking.registered_model, spec.tracking.alias, best_metrics)
    out["samples"] = [f"{r['reference']!r} -> {r['beam'] or r['greedy']!r}" for r in rows[:3]]
    out["best_step"] = step
    out["best_val_cer"] = meta["metrics"]["val_cer"]
    out["metrics"] = extra
    return out
