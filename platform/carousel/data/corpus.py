"""Text corpora as (doc id, line) records, split into train/valid/test deterministically.

KJV (Debian ``bible-kjv``): one record per verse, split by whole books so validation and test
text is never seen in training, not even as a neighbouring verse. The held-out books span the
genres (narrative, wisdom, prophecy, gospel, epistle) and each split is ~4 % of the verses.

User files: one record per non-empty line. With three or more files the split is by file (a
stable hash of the file name), so held-out text is whole documents; with fewer, the last lines
of each file are held out. Lines that are not valid UTF-8 are reported by file and line and kept
out; nothing else is dropped.
"""

from __future__ import annotations

import hashlib
import re
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from carousel.data.shards import DataError

SPLITS = ("train", "valid", "test")

KJV_VALID_BOOKS = ("Ruth", "Eccl", "Jonah", "Mark", "Phi", "Jas")
KJV_TEST_BOOKS = ("Est", "Lam", "Mic", "Dan", "Gal", "Heb", "1Jn")
_VERSE = re.compile(r"^(\d?[A-Za-z]+)(\d+):(\d+)\s+(.*)$")


@dataclass
class Corpus:
    name: str
    records: dict[str, list[tuple[str, str]]]  # split -> [(doc id, text)]
    rejected: list[dict] = field(default_factory=list)
    source: dict = field(default_factory=dict)


def kjv_split(book: str) -> str:
    if book in KJV_VALID_BOOKS:
        return "valid"
    if book in KJV_TEST_BOOKS:
        return "test"
    return "train"


def read_kjv(max_verses: int | None = None) -> Corpus:
    exe = shutil.which("bible")
    if exe is None:
        raise DataError("the `bible` command is missing: install Debian's bible-kjv (make setup does)")
    out = subprocess.run([exe, "-f", "gen1:1-rev22:21"], check=True, capture_output=True, text=True).stdout
    records: dict[str, list[tuple[str, str]]] = {s: [] for s in SPLITS}
    rejected = []
    for lineno, line in enumerate(out.splitlines(), 1):
        m = _VERSE.match(line.strip())
        if not m:
            rejected.append({"file": "bible -f gen1:1-rev22:21", "line": lineno, "reason": "not a verse line"})
            continue
        book, chapter, verse, text = m.groups()
        records[kjv_split(book)].append((f"{book}{chapter}:{verse}", text))
    if max_verses is not None:
        # Subsets keep every split non-empty: take the first verses of each.
        frac = max_verses / sum(len(v) for v in records.values())
        records = {s: v[: max(1, int(len(v) * frac))] for s, v in records.items()}
    return Corpus("kjv", records, rejected, {"corpus": "kjv", "package": "bible-kjv", "verses": sum(len(v) for v in records.values())})


def _expand(inputs: list[str]) -> list[Path]:
    files: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            files.extend(sorted(f for f in p.rglob("*") if f.is_file() and not f.name.startswith(".")))
        elif p.is_file():
            files.append(p)
        else:
            raise DataError(f"{item}: no such file or directory")
    if not files:
        raise DataError(f"no text files found in {', '.join(inputs)}")
    return files


def _file_split(path: Path, valid_fraction: float, test_fraction: float) -> str:
    u = int.from_bytes(hashlib.sha256(path.name.encode()).digest()[:8], "big") / 2**64
    if u < test_fraction:
        return "test"
    if u < test_fraction + valid_fraction:
        return "valid"
    return "train"


def _read_lines(path: Path, rejected: list[dict]) -> Iterator[tuple[int, str]]:
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                text = raw.decode("utf-8").strip()
            except UnicodeDecodeError as e:
                rejected.append({"file": str(path), "line": lineno, "reason": f"invalid UTF-8 at byte {e.start}"})
                continue
            if text:
                yield lineno, text


def read_text_files(inputs: list[str], valid_fraction: float = 0.05, test_fraction: float = 0.05) -> Corpus:
    files = _expand(inputs)
    records: dict[str, list[tuple[str, str]]] = {s: [] for s in SPLITS}
    rejected: list[dict] = []
    by_file = len(files) >= 3
    for path in files:
        lines = [(f"{path.name}:{n}", t) for n, t in _read_lines(path, rejected)]
        if by_file:
            records[_file_split(path, valid_fraction, test_fraction)].extend(lines)
        else:
            n_test = max(1, int(len(lines) * test_fraction))
            n_valid = max(1, int(len(lines) * valid_fraction))
            if len(lines) < n_test + n_valid + 1:
                raise DataError(f"{path}: only {len(lines)} non-empty lines; too few to split")
            records["train"].extend(lines[: -(n_valid + n_test)])
            records["valid"].extend(lines[-(n_valid + n_test) : -n_test])
            records["test"].extend(lines[-n_test:])
    for split in SPLITS:
        if not records[split]:
            raise DataError(
                f"split {split!r} is empty with {len(files)} files; add files or change the fractions"
            )
    return Corpus("text", records, rejected, {"corpus": "files", "files": [str(f) for f in files]})
