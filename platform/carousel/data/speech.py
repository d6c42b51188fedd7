"""Speech corpora -> log-mel features in Arrow shards (`carousel prepare speech`).

Two sources, one pipeline:

* a user manifest (JSONL or CSV: audio path, transcript, optional speaker and split) of WAV/FLAC
  files at any sample rate, read with ``soundfile`` and resampled with ``soxr``;
* synthesis: KJV phrases (or any text) spoken by Debian's ``flite`` voices and ``espeak-ng``
  accents at varied speeds. Whole voices are held out for validation and test, and their text
  comes from held-out books, so error rates measure an unseen voice reading unseen text.

Ray tasks (one per shard) read or synthesize the audio, compute 80-bin log-mel filterbanks with
``kaldi-native-fbank`` and write the shard; they return per-bin sums so the driver computes the
global normalization statistics of the training split without a second pass. Shards store
features, not audio: see docs/data-formats.md for the measurement behind that.

Nothing is dropped silently: a missing or undecodable file, an empty transcript, or characters
outside the vocabulary are reported by file and line, counted, listed in the manifest and kept out.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import random
import re
import shutil
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from carousel.data.shards import MANIFEST, SPEECH_SCHEMA, DataError, Manifest, ShardInfo, SplitInfo, write_manifest
from carousel.data.storage import Location, atomic_write

VOCAB_FILE = "vocab.json"
BLANK = "<blank>"
DEFAULT_CHARS = " 'abcdefghijklmnopqrstuvwxyz"
SPLITS = ("train", "valid", "test")

# Whole voices per split. Training has two flite voices and many espeak-ng accents/variants
# (+fN/+mN change pitch and formants); the held-out splits each have a flite voice and an accent
# never heard in training.
DEFAULT_VOICES = {
    "train": [
        "flite:kal16", "flite:awb", "espeak:en-us", "espeak:en-us+f3", "espeak:en-gb",
        "espeak:en-gb-x-rp+f2", "espeak:en-029+m3", "espeak:en-gb-x-gbclan+f5",
    ],
    "valid": ["flite:rms", "espeak:en-gb-scotland"],
    "test": ["flite:slt", "espeak:en-gb-x-gbcwmd+f4"],
}


# ----------------------------------------------------------------------------- text


_PUNCT = re.compile(r"[.,;:!?\"()\[\]{}<>*_/\\\-\u2013\u2014\u2026\u201c\u201d]")


def normalize_transcript(text: str) -> str:
    """Lower case, punctuation -> space, curly apostrophes straightened, spaces collapsed."""
    t = text.lower().replace("\u2019", "'").replace("\u2018", "'")
    return " ".join(_PUNCT.sub(" ", t).split())


@dataclass(frozen=True)
class Vocabulary:
    """CTC output units: blank (id 0) then one id per character."""

    kind = "char"
    chars: str = DEFAULT_CHARS

    @property
    def tokens(self) -> list[str]:
        return [BLANK, *self.chars]

    @property
    def size(self) -> int:
        return len(self.chars) + 1

    def oov(self, text: str) -> list[str]:
        known = set(self.chars)
        return sorted({c for c in text if c not in known})

    def encode(self, text: str) -> list[int]:
        index = {c: i + 1 for i, c in enumerate(self.chars)}
        return [index[c] for c in text]

    def decode(self, ids) -> str:
        text = "".join(self.chars[i - 1] for i in ids if 0 < i <= len(self.chars))
        # Spaces as in the transcripts (normalize_transcript): none at the ends, never two in a row;
        # a hypothesis's extra spaces are errors no reference can share.
        return " ".join(w for w in text.split(" ") if w)

    def to_json(self) -> str:
        return json.dumps({"blank": 0, "tokens": self.tokens}, indent=2)

    @classmethod
    def from_json(cls, text: str) -> "Vocabulary":
        d = json.loads(text)
        if d.get("blank") != 0 or d["tokens"][0] != BLANK:
            raise DataError("vocab.json: the blank must be token 0")
        return cls("".join(d["tokens"][1:]))

    def piece(self, i: int) -> str:
        """The text unit ``i`` stands for (shallow fusion feeds it to a character LM)."""
        return self.chars[i - 1]


class BPEUnits:
    """CTC output units from a byte-pair encoding of the training transcripts: blank (id 0), then
    tokenizer id + 1.

    HF tokenizers' BPE with a Metaspace pre-tokenizer: a word-initial piece carries "▁", so
    decoding restores the spaces exactly, and the alphabet is limited to the character
    vocabulary, so every transcript the characters accept can be encoded (HF BPE would silently
    drop a character it does not know: ``oov`` checks the characters first, as for char units).
    """

    kind = "bpe"
    SPACE = "▁"

    def __init__(self, tokenizer_json: str, chars: str):
        from tokenizers import Tokenizer

        self.chars = chars
        self.tokenizer = Tokenizer.from_str(tokenizer_json)
        self._pieces = [self.tokenizer.id_to_token(i) for i in range(self.tokenizer.get_vocab_size())]

    @classmethod
    def train(cls, texts: list[str], vocab_size: int, chars: str) -> "BPEUnits":
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

        alphabet = sorted(set(chars.replace(" ", "")) | {cls.SPACE})
        if vocab_size < len(alphabet):
            raise DataError(f"--vocab-size: {vocab_size} is smaller than the {len(alphabet)} characters BPE starts from")
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement=cls.SPACE, prepend_scheme="always", split=True)
        tok.decoder = decoders.Metaspace(replacement=cls.SPACE, prepend_scheme="always", split=True)
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=alphabet, limit_alphabet=len(alphabet),
                                      special_tokens=[], show_progress=False)
        tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
        return cls(tok.to_str(), chars)

    @property
    def tokens(self) -> list[str]:
        return [BLANK, *self._pieces]

    @property
    def size(self) -> int:
        return len(self._pieces) + 1

    def oov(self, text: str) -> list[str]:
        known = set(self.chars)
        return sorted({c for c in text if c not in known})

    def encode(self, text: str) -> list[int]:
        return [i + 1 for i in self.tokenizer.encode(text, add_special_tokens=False).ids]

    def decode(self, ids) -> str:
        text = self.tokenizer.decode([i - 1 for i in ids if 0 < i < self.size])
        # A lone "▁" piece before a word-initial one decodes to two spaces; the transcripts have one.
        return " ".join(text.split())

    def piece(self, i: int) -> str:
        return self._pieces[i - 1].replace(self.SPACE, " ")

    def to_json(self) -> str:
        return json.dumps({"blank": 0, "type": "bpe", "chars": self.chars, "tokens": self.tokens,
                           "tokenizer": json.loads(self.tokenizer.to_str())}, indent=2)


Units = Vocabulary | BPEUnits


def units_from_json(text: str, where: str = VOCAB_FILE) -> Units:
    """vocab.json -> the dataset's output units (char vocabularies predate the ``type`` key)."""
    try:
        d = json.loads(text)
        if d.get("type", "char") == "char":
            return Vocabulary.from_json(text)
        if d["type"] == "bpe":
            if d.get("blank") != 0 or d["tokens"][0] != BLANK:
                raise DataError(f"{where}: the blank must be token 0")
            units = BPEUnits(json.dumps(d["tokenizer"]), d["chars"])
            if units.tokens != d["tokens"]:
                raise DataError(f"{where}: its token list does not match its tokenizer")
            return units
    except (KeyError, TypeError, ValueError) as e:
        raise DataError(f"{where}: malformed output-unit vocabulary ({type(e).__name__}: {e})") from None
    raise DataError(f"{where}: unknown unit type {d['type']!r} (char or bpe)")


def ctc_need(ids: list[int]) -> int:
    """CTC output steps a label sequence needs: one per label plus a blank between repeats."""
    return len(ids) + sum(1 for a, b in zip(ids, ids[1:]) if a == b)


def max_stride(frames: int, need: int, limit: int = 16) -> int:
    """Largest subsampling stride s with frames // s >= need (0 if even s = 1 is too coarse)."""
    best = 0
    for s in range(1, limit + 1):
        if frames // s >= need:
            best = s
    return best


def ctc_violations(utts: list[str], steps: list[int], needs: list[int]) -> list[dict[str, Any]]:
    """Utterances whose CTC output steps (after the frontend's subsampling) are fewer than their
    labels need: CTC cannot align them, so their loss is infinite (and zeroed, i.e. wasted)."""
    return [{"utt": u, "steps": s, "need": n} for u, s, n in zip(utts, steps, needs) if s < n]


# ----------------------------------------------------------------------------- normalization

# A floor for standard deviations: a bin that is (nearly) constant over one speaker's or one
# utterance's frames (digital silence) must not be blown up into noise.
STD_FLOOR = 1e-2


def stats_from_sums(frames: int, total: np.ndarray, total_sq: np.ndarray) -> np.ndarray:
    """(frames, per-bin sum, per-bin sum of squares) -> [2, n_mels]: mean and std."""
    mean = total / max(frames, 1)
    var = total_sq / max(frames, 1) - mean**2
    return np.stack([mean, np.maximum(np.sqrt(np.maximum(var, 0.0)), STD_FLOOR)])


def utterance_stats(*feats: np.ndarray) -> np.ndarray:
    """Mean and std over the frames of one utterance (or several, pooled): the statistics used for a
    speaker the dataset has no statistics for."""
    x = np.concatenate([np.asarray(f, dtype=np.float64) for f in feats])
    return stats_from_sums(len(x), x.sum(0), np.square(x).sum(0))


# Utterances of a manifest row without a speaker share this name; they get no speaker statistics
# (they may be many different people), so speaker normalization uses each one's own statistics.
UNKNOWN_SPEAKER = "unknown"


# ----------------------------------------------------------------------------- audio and features


@dataclass(frozen=True)
class FeatureSettings:
    sample_rate: int = 16000
    n_mels: int = 80
    frame_length_ms: float = 25.0
    frame_shift_ms: float = 10.0

    def to_dict(self) -> dict[str, Any]:
        return {"type": "kaldi-fbank", **asdict(self)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "FeatureSettings":
        return cls(**{k: v for k, v in d.items() if k != "type"})


def load_audio(source: str | bytes | Path, rate: int) -> np.ndarray:
    """Any file soundfile reads (WAV, FLAC, OGG) -> mono float32 at ``rate`` Hz."""
    import soundfile as sf

    src = io.BytesIO(source) if isinstance(source, bytes) else str(source)
    audio, sr = sf.read(src, dtype="float32", always_2d=True)
    return resample(audio.mean(axis=1), sr, rate)


def resample(audio: np.ndarray, sr: int, rate: int) -> np.ndarray:
    import soxr

    audio = np.ascontiguousarray(audio, dtype=np.float32)
    return audio if sr == rate else soxr.resample(audio, sr, rate).astype(np.float32)


def fbank(audio: np.ndarray, settings: FeatureSettings) -> np.ndarray:
    """Log-mel filterbank [frames, n_mels] (float32). No dither: the same audio gives the same features."""
    import kaldi_native_fbank as knf

    opts = knf.FbankOptions()
    opts.frame_opts.samp_freq = settings.sample_rate
    opts.frame_opts.dither = 0.0
    opts.frame_opts.frame_length_ms = settings.frame_length_ms
    opts.frame_opts.frame_shift_ms = settings.frame_shift_ms
    opts.mel_opts.num_bins = settings.n_mels
    fb = knf.OnlineFbank(opts)
    # Kaldi's conventions (and its log floor) assume 16-bit sample values, not [-1, 1].
    fb.accept_waveform(settings.sample_rate, np.asarray(audio, dtype=np.float32) * 32768.0)
    fb.input_finished()
    n = fb.num_frames_ready
    if n == 0:
        return np.zeros((0, settings.n_mels), dtype=np.float32)
    return np.stack([fb.get_frame(i) for i in range(n)]).astype(np.float32)


def synthesize(voice: str, text: str, speed: float, pitch: int | None = None) -> tuple[np.ndarray, int]:
    """Speak ``text`` with ``flite:VOICE`` or ``espeak:VOICE``; returns (float32 samples, rate).

    ``speed`` is a duration stretch for flite (>1 slower) and words per minute for espeak-ng.
    """
    engine, name = voice.split(":", 1)
    if engine == "flite":
        cmd = ["flite", "-voice", name, "--setf", f"duration_stretch={speed:.3f}", "-t", text, "-o", "/dev/stdout"]
        out = subprocess.run(cmd, capture_output=True, check=True, timeout=120).stdout
        import soundfile as sf

        audio, sr = sf.read(io.BytesIO(out), dtype="float32")
        return audio, sr
    if engine == "espeak":
        cmd = ["espeak-ng", "-v", name, "-s", str(int(speed)), "--stdout"]
        if pitch is not None:
            cmd += ["-p", str(pitch)]
        out = subprocess.run([*cmd, text], capture_output=True, check=True, timeout=120).stdout
        # espeak-ng --stdout cannot seek back to fix its WAV header, so the header's length fields
        # are wrong: take the 16-bit mono samples after the 44-byte header, at the rate it states.
        if len(out) < 44 or out[:4] != b"RIFF":
            raise DataError(f"espeak-ng -v {name}: no WAV output")
        sr = int.from_bytes(out[24:28], "little")
        body = out[44 : 44 + (len(out) - 44) // 2 * 2]
        return np.frombuffer(body, dtype="<i2").astype(np.float32) / 32768.0, sr
    raise DataError(f"voice {voice!r}: engine must be flite or espeak")


def check_engines(voices: list[str]) -> None:
    for engine, pkg in (("flite", "flite"), ("espeak", "espeak-ng")):
        if any(v.startswith(engine + ":") for v in voices) and shutil.which(pkg) is None:
            raise DataError(f"the `{pkg}` command is missing: install Debian's {pkg} (make setup does)")


# ----------------------------------------------------------------------------- items


@dataclass
class Item:
    """One utterance to prepare: from a file (``audio``) or synthesized (``voice``)."""

    utt: str
    speaker: str
    text: str  # normalized transcript
    audio: str | None = None
    voice: str | None = None
    speed: float = 1.0
    pitch: int | None = None
    where: str = ""  # "manifest.jsonl:12" for reports


def _split_of(key: str, valid_fraction: float, test_fraction: float) -> str:
    u = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") / 2**64
    if u < test_fraction:
        return "test"
    if u < test_fraction + valid_fraction:
        return "valid"
    return "train"


def _manifest_rows(path: Path) -> list[tuple[int, dict[str, Any] | str]]:
    """(line number, row dict) per data line, or (line, error message) for a malformed one."""
    rows: list[tuple[int, dict[str, Any] | str]] = []
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() in (".jsonl", ".json", ".ndjson"):
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                rows.append((n, row if isinstance(row, dict) else "not a JSON object"))
            except json.JSONDecodeError as e:
                rows.append((n, f"not valid JSON ({e.msg})"))
    elif path.suffix.lower() in (".csv", ".tsv"):
        reader = csv.DictReader(io.StringIO(text), delimiter="\t" if path.suffix.lower() == ".tsv" else ",")
        for row in reader:
            rows.append((reader.line_num, row))
    else:
        raise DataError(f"{path}: a manifest must be .jsonl or .csv (or .tsv)")
    return rows


def _field(row: dict[str, Any], *names: str) -> Any:
    for n in names:
        if row.get(n) not in (None, ""):
            return row[n]
    return None


def read_speech_manifest(
    path: str | Path,
    vocab: Vocabulary,
    valid_fraction: float = 0.1,
    test_fraction: float = 0.1,
) -> tuple[dict[str, list[Item]], list[dict[str, Any]], dict[str, Any]]:
    """Rows -> items per split; rows that cannot be used are returned as rejections (file, line, reason).

    Splits: a row's ``split`` column wins; else with three or more speakers whole speakers are held
    out (stable hash of the name), else whole files.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such manifest")
    rows = _manifest_rows(path)
    items: dict[str, list[Item]] = {s: [] for s in SPLITS}
    rejected: list[dict[str, Any]] = []
    parsed = []
    for n, row in rows:
        where = f"{path}:{n}"
        if isinstance(row, str):
            rejected.append({"file": str(path), "line": n, "reason": row})
            continue
        audio = _field(row, "audio", "path", "audio_filepath", "file")
        raw = _field(row, "text", "transcript", "sentence")
        if audio is None:
            rejected.append({"file": str(path), "line": n, "reason": "no audio path (column audio)"})
            continue
        text = normalize_transcript(str(raw or ""))
        if not text:
            rejected.append({"file": str(path), "line": n, "audio": str(audio), "reason": "empty transcript"})
            continue
        if bad := vocab.oov(text):
            rejected.append({"file": str(path), "line": n, "audio": str(audio),
                             "reason": f"characters outside the vocabulary: {''.join(bad)!r}"})
            continue
        apath = Path(audio) if Path(audio).is_absolute() else path.parent / audio
        speaker = str(_field(row, "speaker", "speaker_id", "client_id") or "")
        split = _field(row, "split")
        if split is not None and split not in SPLITS:
            rejected.append({"file": str(path), "line": n, "reason": f"split {split!r} is not train, valid or test"})
            continue
        parsed.append((n, str(apath), text, speaker, split, where))
    speakers = {p[3] for p in parsed if p[3]}
    by_speaker = len(speakers) >= 3
    for n, apath, text, speaker, split, where in parsed:
        if split is None:
            split = _split_of(speaker if by_speaker and speaker else apath, valid_fraction, test_fraction)
        items[split].append(Item(f"{path.stem}-{n}", speaker or UNKNOWN_SPEAKER, text, audio=apath, where=where))
    source = {"corpus": "manifest", "file": str(path), "rows": len(rows),
              "held_out_by": "speaker" if by_speaker else "file"}
    return items, rejected, source


def _phrases(text: str, max_chars: int) -> list[str]:
    """A verse's clauses (cut at punctuation), normalized, 2+ words and at most ``max_chars``."""
    out = []
    for piece in re.split(r"[,;:.?!]", text):
        t = normalize_transcript(piece)
        if len(t.split()) >= 2 and len(t) <= max_chars:
            out.append(t)
    return out


def synthesis_items(
    texts: dict[str, list[str]],
    voices: dict[str, list[str]],
    counts: dict[str, int],
    vocab: Vocabulary,
    seed: int = 0,
    max_chars: int = 80,
) -> tuple[dict[str, list[Item]], list[dict[str, Any]]]:
    """Phrases of each split's text, spoken round-robin by that split's voices at random speeds."""
    rng = random.Random(seed)
    items: dict[str, list[Item]] = {s: [] for s in SPLITS}
    rejected: list[dict[str, Any]] = []
    for split in SPLITS:
        pool: list[str] = []
        for line in texts[split]:
            for ph in _phrases(line, max_chars):
                if bad := vocab.oov(ph):
                    rejected.append({"file": f"text:{split}", "line": len(pool), "reason": f"characters outside the vocabulary: {''.join(bad)!r}"})
                else:
                    pool.append(ph)
        if not pool:
            raise DataError(f"split {split!r}: no phrases of 2+ words within {max_chars} characters")
        rng.shuffle(pool)
        vs = voices[split]
        if not vs:
            raise DataError(f"split {split!r}: no voices")
        for i in range(counts[split]):
            voice = vs[i % len(vs)]
            flite = voice.startswith("flite:")
            speed = rng.uniform(0.85, 1.2) if flite else float(rng.randint(140, 200))
            pitch = None if flite else rng.randint(35, 65)
            speaker = voice.replace(":", "-").replace("+", "_")
            items[split].append(Item(f"{split}-{i:06d}", speaker, pool[i % len(pool)], voice=voice,
                                     speed=speed, pitch=pitch, where=f"{voice} #{i}"))
    return items, rejected


# ----------------------------------------------------------------------------- shard tasks


def _shard_task(items: list[Item], settings: FeatureSettings, units_json: str, out_uri: str) -> dict[str, Any]:
    """Read or synthesize, featurize and write one shard. Runs as a Ray task.

    Besides the shard it returns per-bin sums (global statistics) and per-speaker sums (speaker
    statistics), so the driver needs no second pass over the features.
    """
    import pyarrow as pa

    vocab = units_from_json(units_json)
    per_speaker: dict[str, list] = {}
    rows: dict[str, list] = {k: [] for k in ("utt", "speaker", "text", "ids", "frames", "feats")}
    rejected: list[dict[str, Any]] = []
    total = np.zeros(settings.n_mels, np.float64)
    total_sq = np.zeros(settings.n_mels, np.float64)
    seconds, strides = 0.0, []
    t0 = time.time()
    for it in items:
        try:
            if it.voice is not None:
                audio, sr = synthesize(it.voice, it.text, it.speed, it.pitch)
                audio = resample(audio, sr, settings.sample_rate)
            else:
                if not Path(it.audio).is_file():
                    raise DataError(f"audio file {it.audio} does not exist")
                audio = load_audio(it.audio, settings.sample_rate)
        except DataError as e:
            rejected.append({"where": it.where, "audio": it.audio or it.voice, "reason": str(e)})
            continue
        except subprocess.SubprocessError as e:
            rejected.append({"where": it.where, "audio": it.voice, "reason": f"synthesis failed ({e})"})
            continue
        except Exception as e:  # noqa: BLE001 - soundfile raises LibsndfileError / RuntimeError / TypeError
            rejected.append({"where": it.where, "audio": it.audio, "reason": f"cannot decode audio ({type(e).__name__}: {e})"})
            continue
        feats = fbank(audio, settings)
        ids = vocab.encode(it.text)
        s = max_stride(len(feats), ctc_need(ids))
        if s == 0:
            rejected.append({"where": it.where, "utt": it.utt, "audio": it.audio or it.voice,
                             "reason": f"utterance {it.utt}: {len(feats)} frames are too few for CTC to align its "
                                       f"{len(ids)} {vocab.kind} labels (it needs {ctc_need(ids)} output steps)"})
            continue
        fsum, fsq = feats.sum(0, dtype=np.float64), np.square(feats, dtype=np.float64).sum(0)
        total += fsum
        total_sq += fsq
        acc = per_speaker.setdefault(it.speaker, [0, np.zeros(settings.n_mels), np.zeros(settings.n_mels)])
        acc[0] += len(feats)
        acc[1] += fsum
        acc[2] += fsq
        seconds += len(audio) / settings.sample_rate
        strides.append(s)
        rows["utt"].append(it.utt)
        rows["speaker"].append(it.speaker)
        rows["text"].append(it.text)
        rows["ids"].append(ids)
        rows["frames"].append(len(feats))
        rows["feats"].append(feats.astype(np.float16).reshape(-1))
    table = pa.table(
        {
            "utt": pa.array(rows["utt"], pa.string()),
            "speaker": pa.array(rows["speaker"], pa.string()),
            "text": pa.array(rows["text"], pa.string()),
            "ids": pa.array(rows["ids"], pa.list_(pa.int32())),
            "frames": pa.array(rows["frames"], pa.int32()),
            "feats": pa.array(rows["feats"], pa.list_(pa.float16())),
        },
        schema=SPEECH_SCHEMA,
    )
    sink = pa.BufferOutputStream()
    with pa.ipc.new_file(sink, SPEECH_SCHEMA) as writer:
        writer.write_table(table, max_chunksize=1 << 16)
    data = sink.getvalue().to_pybytes()
    loc = Location.parse(out_uri)
    digest = atomic_write(loc, data)
    info = ShardInfo(path=loc.path.rsplit("/", 1)[-1], rows=table.num_rows,
                     tokens=sum(len(i) for i in rows["ids"]), bytes=len(data), sha256=digest)
    return {
        "shard": info, "rejected": rejected, "sum": total, "sum_sq": total_sq, "frames": int(sum(rows["frames"])),
        "max_frames": max(rows["frames"], default=0), "seconds": seconds, "speakers": sorted(set(rows["speaker"])),
        "max_stride": min(strides, default=16), "busy_s": time.time() - t0, "speaker_sums": per_speaker,
    }


def speaker_table(sums: list[dict[str, list]]) -> dict[str, dict[str, Any]]:
    """Shard tasks' per-speaker (frames, sum, sum of squares) -> {speaker: {frames, mean, std}}, pooled
    over shards and splits. The unknown speaker is left out (see UNKNOWN_SPEAKER)."""
    pooled: dict[str, list] = {}
    for part in sums:
        for spk, (n, s1, s2) in part.items():
            if spk == UNKNOWN_SPEAKER:
                continue
            acc = pooled.setdefault(spk, [0, 0.0, 0.0])
            acc[0] += n
            acc[1] = acc[1] + np.asarray(s1)
            acc[2] = acc[2] + np.asarray(s2)
    table = {}
    for spk in sorted(pooled):
        n, s1, s2 = pooled[spk]
        mean, std = stats_from_sums(n, s1, s2)
        table[spk] = {"frames": int(n), "mean": mean.round(4).tolist(), "std": std.round(4).tolist()}
    return table


@dataclass
class SpeechPrepareResult:
    root: str
    manifest: Manifest
    seconds: float
    utterances: int = 0
    task_seconds: float = 0.0
    rejected: list[dict[str, Any]] = field(default_factory=list)


def prepare_speech(
    items: dict[str, list[Item]],
    out: str,
    source: dict[str, Any],
    rejected: list[dict[str, Any]],
    vocab: Units = Vocabulary(),
    settings: FeatureSettings = FeatureSettings(),
    shard_utts: int = 128,
    overwrite: bool = False,
    parallel: bool = True,
) -> SpeechPrepareResult:
    """``parallel=False`` runs the shard tasks in this process (unit tests, debugging)."""
    t0 = time.time()
    root = Location.parse(out)
    if root.join(MANIFEST).exists() and not overwrite:
        raise DataError(f"{root.uri()}: a prepared dataset is already there (pass --overwrite to replace it)")
    for split in SPLITS:
        if not items.get(split):
            raise DataError(f"split {split!r} has no utterances; add data or change the held-out fractions")
    root.makedirs()
    vocab_json = vocab.to_json()
    vocab_sha = atomic_write(root.join(VOCAB_FILE), vocab_json.encode("utf-8"))

    if parallel:
        import ray

        if not ray.is_initialized():
            ray.init(logging_level="ERROR", log_to_driver=False)
        submit, gather = ray.remote(num_cpus=1)(_shard_task).remote, ray.get
    else:
        submit, gather = _shard_task, lambda refs: refs
    pending = {
        split: [
            submit(items[split][i : i + shard_utts], settings, vocab_json, root.join(f"{split}-{k:05d}.arrow").uri())
            for k, i in enumerate(range(0, len(items[split]), shard_utts))
        ]
        for split in SPLITS
    }
    results = {split: gather(refs) for split, refs in pending.items()}

    rejected = list(rejected)
    stats: dict[str, Any] = {}
    busy = 0.0
    for split, res in results.items():
        for r in res:
            rejected.extend(r["rejected"])
            busy += r["busy_s"]
        if sum(r["shard"].rows for r in res) == 0:
            raise DataError(f"split {split!r}: every utterance was rejected (first: {rejected[:1]})")
        stats[split] = {
            "utterances": sum(r["shard"].rows for r in res),
            "frames": sum(r["frames"] for r in res),
            "max_frames": max(r["max_frames"] for r in res),
            "seconds": round(sum(r["seconds"] for r in res), 3),
            "speakers": sorted({s for r in res for s in r["speakers"]}),
            # Largest frontend stride at which every utterance still has enough CTC output steps.
            "max_stride": min(r["max_stride"] for r in res if r["shard"].rows),
        }
    train = results["train"]
    mean, std = stats_from_sums(sum(r["frames"] for r in train), sum(r["sum"] for r in train),
                                sum(r["sum_sq"] for r in train))
    speakers = speaker_table([r["speaker_sums"] for res in results.values() for r in res])
    manifest = Manifest(
        kind="speech",
        tokenizer={"file": VOCAB_FILE, "sha256": vocab_sha, "type": vocab.kind, "vocab_size": vocab.size, "blank_id": 0},
        splits={split: SplitInfo([r["shard"] for r in res]) for split, res in results.items()},
        source=source,
        rejected=rejected,
        speech={
            "features": settings.to_dict(),
            # Global statistics (train split) and per-speaker ones (every split: a held-out speaker is
            # normalized with its own audio, never its transcripts); speech.normalization picks one.
            "normalization": {"split": "train", "mean": mean.round(6).tolist(), "std": std.round(6).tolist(),
                              "speakers": speakers},
            "splits": stats,
            "rejected": len(rejected),
        },
    )
    write_manifest(root, manifest)
    n = sum(s["utterances"] for s in stats.values())
    return SpeechPrepareResult(root.uri(), manifest, time.time() - t0, n, busy, rejected)
