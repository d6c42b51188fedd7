"""The speech model as an MLflow pyfunc (audio in, text out), its evaluation on real speech, and publishing.

Artifacts are the checkpoint's ``model/`` directory (fp32 weights with the normalization buffers,
model.json with the architecture and feature settings, vocab.json); audio of any rate is read,
resampled and featurized exactly as `carousel prepare speech` did, so a file transcribes the same
through `carousel transcribe`, ``mlflow.pyfunc.load_model`` or ``mlflow models serve``. A model
published with ``speech.lm`` carries that LM's ``model/`` directory too (artifact ``lm``), so its
beam decoding fuses the same LM wherever it is loaded.

Speaker normalization at transcription time: a new recording's speaker has no statistics in any
dataset, so each file is normalized with its own (per-utterance) statistics, or, when the caller
says the files share one speaker, with statistics pooled over all of them.
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
from carousel.data.speech import FeatureSettings, fbank, load_audio, normalize_transcript, units_from_json, utterance_stats
from carousel.models.ctc import CTCModel, beam_decode, greedy_decode

LIBRIVOX_DIR = Path("/usr/share/pocketsphinx/test/data/librivox")
DEFAULT_PARAMS = {"decoder": "greedy", "beam_width": 16, "lm_weight": 0.0, "word_bonus": 0.0}


def lm_model_dir(ref: str, tracking_uri: str | None = None) -> Path:
    """``models:/NAME@ALIAS`` (or any MLflow model URI of a Carousel LM), a checkpoint directory or a
    ``model/`` directory -> the LM's ``model/`` directory (checkpoints are verified first)."""
    from carousel.train import checkpoint as ckpt

    if ":/" in ref and not Path(ref).exists():
        from carousel.tracking.store import resolve_tracking_uri

        uri = resolve_tracking_uri(tracking_uri)
        mlflow.set_tracking_uri(uri)
        mlflow.set_registry_uri(uri)
        return Path(mlflow.artifacts.download_artifacts(artifact_uri=f"{ref.rstrip('/')}/artifacts/model"))
    path = Path(ref)
    if (path / "model.json").is_file():
        return path
    if not path.is_dir():
        raise FileNotFoundError(f"{ref}: neither a models:/ URI nor a checkpoint or model directory")
    ckpt.verify(str(path), ckpt.read_meta(str(path))["world_size"])
    return path / ckpt.MODEL_DIR


def bundled_lm_dir(model_uri: str) -> Path | None:
    """The LM a registered speech model was published with (artifact ``lm``), or None. The tracking
    URI must be set already (the model itself was just fetched from it)."""
    from mlflow.exceptions import MlflowException

    try:
        path = Path(mlflow.artifacts.download_artifacts(artifact_uri=f"{model_uri.rstrip('/')}/artifacts/lm"))
    except (MlflowException, OSError):
        return None
    return path if (path / "model.json").is_file() else None


def load_fusion(ref: str | Path, units, weight: float, word_bonus: float, tracking_uri: str | None = None):
    """A CharLMFusion for ``units`` from an LM reference (see lm_model_dir) or its ``model/`` directory."""
    from carousel.models.lm_fusion import CharLMFusion
    from carousel.tracking.lm_model import LoadedLM

    lm = LoadedLM(lm_model_dir(str(ref), tracking_uri))
    texts = [""] + [units.piece(i) for i in range(1, units.size)]
    return CharLMFusion.from_tokenizer(lm.model, lm.tokenizer, texts, weight, word_bonus)


class LoadedASR:
    """An acoustic model, its vocabulary and feature settings, loaded from a ``model/`` directory."""

    def __init__(self, model_dir: str | Path):
        model_dir = Path(model_dir)
        self.meta = json.loads((model_dir / "model.json").read_text())
        if self.meta.get("family") != "ctc":
            raise ValueError(f"{model_dir}: not a speech (ctc) model")
        self.vocab = units_from_json((model_dir / "vocab.json").read_text(), str(model_dir / "vocab.json"))
        self.settings = FeatureSettings.from_dict(self.meta["features"])
        self.normalization = self.meta.get("normalization", "global")
        self.fusion = None
        self.model = CTCModel(CTCModelConfig.model_validate(self.meta["config"]), self.meta["vocab_size"], self.settings.n_mels)
        state = torch.load(model_dir / "weights.pt", map_location="cpu", weights_only=True)
        self.model.load_state_dict(state)
        self.model.eval()

    def use_lm(self, ref: str | Path, weight: float, word_bonus: float = 0.0, tracking_uri: str | None = None) -> None:
        """Fuse this LM into beam decoding from now on (see models/lm_fusion.py for what fuses)."""
        self.fusion = load_fusion(ref, self.vocab, weight, word_bonus, tracking_uri)

    @torch.no_grad()
    def log_probs(self, feats: np.ndarray, norm: np.ndarray | None = None) -> np.ndarray:
        """``norm`` [2, n_mels]: the speaker's statistics, for a speaker-normalized model (default:
        the utterance's own); a globally normalized model ignores it."""
        x = torch.from_numpy(np.ascontiguousarray(feats, dtype=np.float32))[None]
        n = None
        if self.normalization == "speaker":
            n = torch.from_numpy(np.asarray(utterance_stats(feats) if norm is None else norm, dtype=np.float32))[None]
        lp, out_len = self.model(x, torch.tensor([x.size(1)]), None, None, n)
        return lp[0, : int(out_len[0])].numpy()

    def decode(self, log_probs: np.ndarray, decoder: str = "greedy", beam_width: int = 16, fusion: bool = True) -> str:
        """greedy | beam; beam fuses the LM set by use_lm unless ``fusion`` is False."""
        if decoder == "beam":
            ids = beam_decode(log_probs, beam_width=beam_width, fusion=self.fusion if fusion else None)
        else:
            ids = greedy_decode(log_probs)
        return self.vocab.decode(ids)

    def transcribe_features(self, feats: np.ndarray, decoder: str = "greedy", beam_width: int = 16,
                            norm: np.ndarray | None = None) -> str:
        if len(feats) < self.model.stride:
            return ""
        return self.decode(self.log_probs(feats, norm), decoder, beam_width)

    def features(self, source: str | bytes | Path) -> np.ndarray:
        return fbank(load_audio(source, self.settings.sample_rate), self.settings)

    def transcribe(self, source: str | bytes | Path, decoder: str = "greedy", beam_width: int = 16) -> str:
        return self.transcribe_features(self.features(source), decoder, beam_width)

    def transcribe_speaker(self, sources: list, decoder: str = "greedy", beam_width: int = 16) -> list[str]:
        """Files known to share one speaker: normalized with statistics pooled over all of them."""
        feats = [self.features(s) for s in sources]
        norm = utterance_stats(*feats) if self.normalization == "speaker" else None
        return [self.transcribe_features(f, decoder, beam_width, norm) for f in feats]


class SpeechRecognizerPyfunc(mlflow.pyfunc.PythonModel):
    def load_context(self, context) -> None:
        self.asr = LoadedASR(context.artifacts["model"])
        self.lm_dir = context.artifacts.get("lm")
        # The weights it was published with (MLflow also fills these in from the signature's defaults).
        self.defaults = {**DEFAULT_PARAMS, **({k: self.asr.meta[k] for k in ("lm_weight", "word_bonus")} if self.lm_dir else {})}

    def predict(self, context, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> list[str]:
        """Rows with ``path`` (an audio file) or ``audio`` (the bytes of one) -> transcripts.

        With a bundled LM, beam decoding fuses it at ``lm_weight`` (default: the weight it was
        published with; 0 turns fusion off)."""
        p = {**self.defaults, **(params or {})}
        weight, bonus = float(p["lm_weight"]), float(p["word_bonus"])
        if self.lm_dir and weight > 0:
            if self.asr.fusion is None or (self.asr.fusion.weight, self.asr.fusion.word_bonus) != (weight, bonus):
                self.asr.use_lm(self.lm_dir, weight, bonus)
        else:
            self.asr.fusion = None
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


def log_and_register(model_dir: str, registered_model: str | None, alias: str, metrics: dict[str, float],
                     lm_dir: str | None = None) -> dict[str, Any]:
    """Log the model (with its fusion LM, if any) into the active run; register it and move ``alias``
    to it when its validation CER is at least as good as the holder's on the same vocabulary and
    features (else not comparable: the newer model takes the alias)."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

    import carousel

    meta = json.loads((Path(model_dir) / "model.json").read_text())
    weight = float(meta.get("lm_weight", 0.0)) if lm_dir else 0.0
    bonus = float(meta.get("word_bonus", 0.0)) if lm_dir else 0.0
    signature = ModelSignature(
        inputs=Schema([ColSpec("string", "path", required=False), ColSpec("binary", "audio", required=False)]),
        outputs=Schema([ColSpec("string")]),
        params=ParamSchema([ParamSpec("decoder", "string", "greedy"), ParamSpec("beam_width", "long", 16),
                            ParamSpec("lm_weight", "double", weight), ParamSpec("word_bonus", "double", bonus)]),
    )
    info = mlflow.pyfunc.log_model(
        name="model",
        python_model=SpeechRecognizerPyfunc(),
        artifacts={"model": model_dir, **({"lm": lm_dir} if lm_dir else {})},
        code_paths=[str(Path(carousel.__file__).parent)],
        signature=signature,
        pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", "pydantic", "pandas", "numpy",
                          "soundfile", "soxr", "kaldi-native-fbank", "jiwer", "tokenizers"],
        registered_model_name=registered_model,
    )
    out: dict[str, Any] = {"model_uri": info.model_uri}
    if not registered_model:
        return out
    from carousel.tracking.registry import register_version

    data_id = f"{meta['vocab_sha256']}:{json.dumps(meta['features'], sort_keys=True)}"
    out.update(register_version(registered_model, str(info.registered_model_version), alias, metrics,
                                data_id=data_id, metric="val_cer"))
    return out


def decode_all(asr: LoadedASR, lp: np.ndarray, sp) -> dict[str, str]:
    """One utterance's log-probs -> {"greedy": ..., "beam": ..., "beam_lm": ...} as the spec asks."""
    out = {"greedy": asr.decode(lp, "greedy")}
    if sp.decoder == "beam":
        out["beam"] = asr.decode(lp, "beam", sp.beam_width, fusion=False)
        if asr.fusion is not None:
            out["beam_lm"] = asr.decode(lp, "beam", sp.beam_width)
    return out


def error_rates(prefix: str, refs: list[str], hyps: dict[str, list[str]]) -> dict[str, float]:
    """{decoder: hypotheses} -> {prefix_cer_greedy, prefix_wer_beam, ...}."""
    out = {}
    for decoder, h in hyps.items():
        s = score(refs, h)
        out[f"{prefix}_cer_{decoder}"], out[f"{prefix}_wer_{decoder}"] = s["cer"], s["wer"]
    return out


def publish_asr(spec, tracking_uri: str, run_id: str, checkpoint_path: str, metrics: dict) -> dict:
    """Best checkpoint -> sample table, test error rates per decoder (greedy, beam, beam + LM),
    LibriVox error rates, logged + registered model."""
    from carousel.data.shards import Dataset
    from carousel.data.speech_batches import SpeechSplit
    from carousel.train import checkpoint as ckpt

    meta = ckpt.read_meta(checkpoint_path)
    ckpt.verify(checkpoint_path, meta["world_size"])
    model_dir = str(Path(checkpoint_path) / ckpt.MODEL_DIR)
    asr = LoadedASR(model_dir)
    sp = spec.speech
    step = meta["step"]
    lm_dir = None
    if sp.lm:
        lm_dir = str(lm_model_dir(sp.lm, tracking_uri))
        asr.use_lm(lm_dir, sp.lm_weight, sp.word_bonus)
    final = "beam_lm" if sp.lm else sp.decoder  # the decoder the headline figures use

    rows: list[dict[str, Any]] = []
    extra: dict[str, float] = {}
    test = SpeechSplit(Dataset(spec.data.path), spec.data.test_split, limit=sp.eval_utterances,
                       normalization=asr.normalization)
    refs: list[str] = []
    hyps: dict[str, list[str]] = {}
    for i in range(len(test)):
        lp = asr.log_probs(test.features(i).astype(np.float32), test.norm(i))
        refs.append(test.texts[i])
        for k, v in decode_all(asr, lp, sp).items():
            hyps.setdefault(k, []).append(v)
        if i < sp.sample_rows:
            rows.append({"split": "test", "speaker": test.speakers[i], "reference": refs[-1],
                         **{k: v[-1] for k, v in hyps.items()}, "cer": score([refs[-1]], [hyps[final][-1]])["cer"]})
    hyps.pop("greedy")  # the training loop logged test_cer / test_wer (greedy) already
    extra.update(error_rates("test", refs, hyps))
    clips = librivox_clips() if sp.librivox else []
    if clips:
        lv_refs: list[str] = []
        lv_hyps: dict[str, list[str]] = {}
        for path, ref in clips:
            # A new speaker to the model: per-utterance statistics under speaker normalization.
            lp = asr.log_probs(asr.features(path))
            lv_refs.append(ref)
            for k, v in decode_all(asr, lp, sp).items():
                lv_hyps.setdefault(k, []).append(v)
            rows.append({"split": "librivox", "speaker": path.stem, "reference": ref,
                         **{k: v[-1] for k, v in lv_hyps.items()}, "cer": score([ref], [lv_hyps[final][-1]])["cer"]})
        extra.update(error_rates("librivox", lv_refs, lv_hyps))
        s = score(lv_refs, lv_hyps[final])
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
            table = pd.DataFrame(rows)
            mlflow.log_table(table.fillna(""), artifact_file="samples.json")
        mlflow.log_dict(spec.model_dump(mode="json"), "spec.yaml")
        mlflow.log_artifact(str(Path(model_dir) / "vocab.json"))
        out = log_and_register(model_dir, spec.tracking.registered_model, spec.tracking.alias, best_metrics, lm_dir)
    out["samples"] = [f"{r['reference']!r} -> {r[final]!r}" for r in rows[:3]]
    out["best_step"] = step
    out["best_val_cer"] = meta["metrics"]["val_cer"]
    out["metrics"] = extra
    return out
