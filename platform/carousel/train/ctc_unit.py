"""The speech family's unit: CTC loss on length-bucketed batches, CER/WER validation, export.

Checkpoints are ranked by validation CER (WER follows it but is coarser on short utterances). Error
rates compare decoded text with the reference transcripts, so they mean the same whether the model
emits characters or BPE units; the CTC loss is per output unit, so it does not compare across them.
CER and WER are computed per rank with jiwer's alignment counts and summed across ranks, so the
figure is the corpus-level error rate, not a mean of per-rank rates.
"""

from __future__ import annotations

from typing import Any

import jiwer
import torch

from carousel.config import JobSpec
from carousel.data.shards import DataError, Dataset
from carousel.data.speech import ctc_need, ctc_violations, units_from_json
from carousel.data.speech_batches import BucketLoader, SpeechBatch, SpeechSplit, plan_epoch, plan_eval, speaker_stats_table
from carousel.models.ctc import CTCModel, greedy_decode
from carousel.train.families import ranking_metric


def error_counts(refs: list[str], hyps: list[str]) -> tuple[int, int, int, int]:
    """(character errors, reference characters, word errors, reference words), summed over pairs."""
    if not refs:
        return 0, 0, 0, 0
    w = jiwer.process_words(refs, hyps)
    c = jiwer.process_characters(refs, hyps)
    char_err = c.substitutions + c.deletions + c.insertions
    word_err = w.substitutions + w.deletions + w.insertions
    return char_err, c.substitutions + c.deletions + c.hits, word_err, w.substitutions + w.deletions + w.hits


def check_speech_dataset(ds: Dataset, where: str) -> None:
    if ds.manifest.kind != "speech":
        raise DataError(f"{where}: a {ds.manifest.kind} dataset; model.family ctc needs `carousel prepare speech`")


class CTCUnit:
    metric = ranking_metric("ctc")
    rate_name = "frames_per_s"
    rate_unit = "frames/s"

    def __init__(self, spec: JobSpec, device: torch.device):
        self.spec, self.device = spec, device
        self.dataset = Dataset(spec.data.path, verify_checksums=spec.data.verify_checksums)
        check_speech_dataset(self.dataset, spec.data.path)
        m = self.dataset.manifest
        self.vocab_json = self.dataset.root.join(m.tokenizer["file"]).read_bytes().decode()
        self.vocab = units_from_json(self.vocab_json, m.tokenizer["file"])
        self.features = m.speech["features"]
        self.norm = m.speech["normalization"]
        self._eval: dict[str, SpeechSplit] = {}

    @property
    def budget(self) -> int:
        return self.spec.speech.frames_per_batch

    def build_model(self) -> CTCModel:
        return CTCModel(self.spec.model, self.vocab.size, int(self.features["n_mels"]),
                        torch.tensor(self.norm["mean"]), torch.tensor(self.norm["std"]))

    def train_loader(self, rank: int, world: int) -> BucketLoader:
        self.loader = BucketLoader(self.dataset, self.spec.data.train_split, rank, world, self.budget, self.spec.seed,
                                   self.spec.speech.normalization)
        return self.loader

    def _inputs(self, b: SpeechBatch) -> tuple[torch.Tensor, ...]:
        d = self.device
        norm = None if b.norm is None else b.norm.to(d)
        return b.feats.to(d), b.lengths.to(d), b.labels.to(d), b.label_lengths.to(d), norm

    def train_loss(self, engine, batch: SpeechBatch) -> tuple[torch.Tensor, int]:
        loss, _ = engine(*self._inputs(batch))
        return loss, batch.frames

    @torch.no_grad()
    def evaluate(self, module, split: str, rank: int, world: int, max_batches: int | None = None) -> dict[str, float]:
        from carousel.train.units import _all_reduce_sum

        if split not in self._eval:
            self._eval[split] = SpeechSplit(self.dataset, split, limit=self.spec.speech.eval_utterances,
                                            normalization=self.spec.speech.normalization)
        data = self._eval[split]
        batches = plan_eval(data.frames, self.budget, world, rank)[:max_batches]
        was_training = module.training
        module.eval()
        nll = labels = 0.0
        refs, hyps = [], []
        for idx in batches:
            b = data.batch(idx)
            feats, lengths, y, ylen, norm = self._inputs(b)
            log_probs, out_len = module(feats, lengths, None, None, norm)
            loss = torch.nn.functional.ctc_loss(log_probs.transpose(0, 1), y, out_len, ylen, blank=0,
                                                reduction="sum", zero_infinity=True)
            nll += float(loss)
            labels += float(ylen.sum())
            hyps.extend(self.vocab.decode(greedy_decode(log_probs[j], int(out_len[j]))) for j in range(len(idx)))
            refs.extend(b.texts)
        module.train(was_training)
        counts = [nll, labels, *map(float, error_counts(refs, hyps)), float(len(refs))]
        nll, labels, ce, cn, we, wn, n = _all_reduce_sum(counts, self.device)
        return {"loss": nll / max(labels, 1), "cer": ce / max(cn, 1), "wer": we / max(wn, 1), "utterances": n}

    def split_metrics(self, prefix: str, r: dict[str, float]) -> dict[str, float]:
        return {f"{prefix}_loss": r["loss"], f"{prefix}_cer": r["cer"], f"{prefix}_wer": r["wer"]}

    def describe(self, m: dict[str, float], prefix: str) -> str:
        return f"CTC loss {m[prefix + '_loss']:.4f} | CER {m[prefix + '_cer']:.2%} | WER {m[prefix + '_wer']:.2%}"

    def train_metrics(self, mean_loss: float) -> dict[str, float]:
        return {}

    def summary_lines(self, params: int, world: int) -> list[str]:
        from carousel.train.progress import human

        c, t = self.spec.model, self.spec.train
        loader = getattr(self, "loader", None)
        steps = len(loader) if loader is not None else 0
        return [
            f"model: {c.frontend.kind} frontend (stride {c.frontend.stride}) -> {c.layers} x "
            f"{'Bi' if c.bidirectional else ''}{c.cell.upper()} hidden {c.hidden} -> CTC over {self.vocab.size} symbols "
            f"({self.vocab.kind}) -> {human(params)} parameters; {self.spec.speech.normalization} normalization",
            f"batches: <= {self.budget} padded frames per worker x {world} workers x accum {t.grad_accum}; "
            f"{steps} steps per epoch",
            f"steps: {t.max_steps}; precision {t.precision}, ZeRO {t.zero_stage}",
        ]

    def export(self, module) -> dict[str, Any]:
        return {
            "model": {
                "family": "ctc",
                "config": self.spec.model.model_dump(mode="json"),
                "vocab_size": self.vocab.size,
                "vocab_sha256": self.dataset.manifest.tokenizer["sha256"],
                "units": self.vocab.kind,
                "features": self.features,
                # speaker: the caller passes statistics per utterance; for audio of an unknown speaker,
                # LoadedASR uses the utterance's own (or those of files known to share a speaker).
                "normalization": self.spec.speech.normalization,
                # The fusion weights beam decoding uses when the published model carries an LM.
                "lm_weight": self.spec.speech.lm_weight,
                "word_bonus": self.spec.speech.word_bonus,
            },
            "files": {"vocab.json": self.vocab_json},
        }

    def state_dict(self) -> dict[str, Any]:
        return {}  # no state flows between batches

    def load_state_dict(self, state: dict[str, Any], device) -> None:
        pass


def stride_violations(ds: Dataset, split: str, output_lengths) -> list[dict]:
    """Utterances of ``split`` that the frontend leaves fewer CTC output steps than their labels need."""
    utts, steps, needs = [], [], []
    for shard in ds.split(split).shards:
        table = ds.read_shard(shard)
        frames = torch.tensor(table["frames"].to_numpy().astype("int64"))
        steps.extend(output_lengths(frames).tolist())
        needs.extend(ctc_need(ids) for ids in table["ids"].to_pylist())
        utts.extend(table["utt"].to_pylist())
    return ctc_violations(utts, steps, needs)


def preflight_ctc(spec: JobSpec) -> None:
    """Everything that can be checked before Ray starts: the data fits the batches and the frontend,
    the normalization's statistics exist, and the fusion LM loads and covers the output units."""
    from carousel.models.ctc import Frontend

    ds = Dataset(spec.data.path, verify_checksums=False)
    check_speech_dataset(ds, "data.path")
    stats = ds.manifest.speech["splits"]
    budget, stride = spec.speech.frames_per_batch, spec.model.frontend.stride
    fe = spec.model.frontend
    n_mels = int(ds.manifest.speech["features"]["n_mels"])
    output_lengths = Frontend(fe.kind, fe.stride, fe.channels, n_mels).output_lengths
    for split in (spec.data.train_split, spec.data.valid_split, spec.data.test_split):
        ds.split(split)
        st = stats[split]
        if st["max_frames"] > budget:
            raise DataError(
                f"speech.frames_per_batch: {budget} frames cannot hold the longest utterance of split {split!r} "
                f"({st['max_frames']} frames); raise it"
            )
        if stride > st["max_stride"] and (bad := stride_violations(ds, split, output_lengths)):
            listed = ", ".join(f"{b['utt']} ({b['steps']} steps < {b['need']})" for b in bad[:10])
            raise DataError(
                f"model.frontend.stride: {stride} leaves {len(bad)} utterance(s) of split {split!r} fewer CTC output "
                f"steps than their labels need (label length + repeats): {listed}"
                f"{' ...' if len(bad) > 10 else ''}. The largest stride that fits every utterance is {st['max_stride']}"
            )
    if spec.speech.normalization == "speaker":
        speaker_stats_table(ds)
    if spec.speech.lm is not None:
        from carousel.tracking.asr_model import load_fusion

        try:
            load_fusion(spec.speech.lm, units_from_json(ds.root.join(ds.manifest.tokenizer["file"]).read_bytes().decode()),
                        spec.speech.lm_weight, spec.speech.word_bonus, spec.tracking.uri)
        except (ValueError, OSError) as e:
            raise DataError(f"speech.lm: {spec.speech.lm}: {e}") from None
    frames = SpeechSplit(ds, spec.data.train_split).frames
    plan_epoch(frames, budget, spec.scaling.num_workers, spec.seed, 0)  # raises if it cannot be split evenly
