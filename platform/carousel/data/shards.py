"""Arrow shards and the dataset manifest.

A dataset is a directory: ``manifest.json`` (written last) plus, per split, Arrow IPC files
``{split}-{index:05d}.arrow`` and the tokenizer. Shards are uncompressed IPC files so they can be
memory-mapped (measured ~6.8 GB/s here); their integrity is the manifest's sha256 plus Arrow's full
validation, because an IPC file with an overwritten body otherwise reads "fine".
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from carousel.data.storage import Location, atomic_write

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
TEXT_SCHEMA = pa.schema(
    [pa.field("doc", pa.string()), pa.field("ids", pa.list_(pa.int32()))],
    metadata={"carousel.schema_version": str(SCHEMA_VERSION), "carousel.kind": "text"},
)
# One row per utterance: ``ids`` are its label ids (so token counts work as for text), ``feats``
# its log-mel frames flattened row-major ([frames x n_mels], n_mels in the manifest), float16
# because it halves the bytes of fp32 at a precision (~3 digits) far below the features' noise.
SPEECH_SCHEMA = pa.schema(
    [
        pa.field("utt", pa.string()),
        pa.field("speaker", pa.string()),
        pa.field("text", pa.string()),
        pa.field("ids", pa.list_(pa.int32())),
        pa.field("frames", pa.int32()),
        pa.field("feats", pa.list_(pa.float16())),
    ],
    metadata={"carousel.schema_version": str(SCHEMA_VERSION), "carousel.kind": "speech"},
)
SCHEMAS = {"text": TEXT_SCHEMA, "speech": SPEECH_SCHEMA}


class DataError(RuntimeError):
    """Bad or corrupt data; the message names the file (and the field or line)."""


@dataclass
class ShardInfo:
    path: str  # relative to the dataset directory
    rows: int
    tokens: int
    bytes: int
    sha256: str


@dataclass
class SplitInfo:
    shards: list[ShardInfo] = field(default_factory=list)

    @property
    def rows(self) -> int:
        return sum(s.rows for s in self.shards)

    @property
    def tokens(self) -> int:
        return sum(s.tokens for s in self.shards)


@dataclass
class Manifest:
    kind: str
    tokenizer: dict[str, Any]
    splits: dict[str, SplitInfo]
    source: dict[str, Any] = field(default_factory=dict)
    rejected: list[dict[str, Any]] = field(default_factory=list)
    speech: dict[str, Any] = field(default_factory=dict)  # features, normalization, per-split stats
    schema_version: int = SCHEMA_VERSION
    created: str = field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))

    def to_json(self) -> str:
        d = asdict(self)
        for name, split in self.splits.items():
            d["splits"][name]["rows"] = split.rows
            d["splits"][name]["tokens"] = split.tokens
        return json.dumps(d, indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str, where: str) -> "Manifest":
        try:
            d = json.loads(text)
            if d.get("schema_version") != SCHEMA_VERSION:
                raise DataError(
                    f"{where}: schema_version {d.get('schema_version')!r} is not {SCHEMA_VERSION}; "
                    "re-run `carousel prepare`"
                )
            splits = {
                name: SplitInfo([ShardInfo(**s) for s in sd["shards"]]) for name, sd in d["splits"].items()
            }
            return cls(
                kind=d["kind"],
                tokenizer=d["tokenizer"],
                splits=splits,
                source=d.get("source", {}),
                rejected=d.get("rejected", []),
                speech=d.get("speech", {}),
                schema_version=d["schema_version"],
                created=d.get("created", ""),
            )
        except DataError:
            raise
        except (AttributeError, KeyError, TypeError, ValueError) as e:
            raise DataError(f"{where}: malformed manifest ({type(e).__name__}: {e})") from None


def write_text_shard(loc: Location, docs: list[str], ids: list[list[int]]) -> ShardInfo:
    table = pa.table(
        {"doc": pa.array(docs, pa.string()), "ids": pa.array(ids, pa.list_(pa.int32()))},
        schema=TEXT_SCHEMA,
    )
    sink = pa.BufferOutputStream()
    with pa.ipc.new_file(sink, TEXT_SCHEMA) as writer:
        writer.write_table(table, max_chunksize=1 << 16)
    data = sink.getvalue().to_pybytes()
    digest = atomic_write(loc, data)
    tokens = int(pc.list_value_length(table["ids"]).to_numpy().sum()) if table.num_rows else 0
    return ShardInfo(path=loc.path.rsplit("/", 1)[-1], rows=table.num_rows, tokens=tokens, bytes=len(data), sha256=digest)


class Dataset:
    """A prepared dataset: its manifest, and verified access to its shards."""

    def __init__(self, root: str, verify_checksums: bool = True):
        self.root = Location.parse(root)
        self.verify_checksums = verify_checksums
        mloc = self.root.join(MANIFEST)
        if not mloc.exists():
            raise DataError(
                f"{mloc.uri()}: no manifest; is this a prepared dataset? (run `carousel prepare`)"
            )
        self.manifest = Manifest.from_json(mloc.read_bytes().decode("utf-8"), mloc.uri())

    def split(self, name: str) -> SplitInfo:
        if name not in self.manifest.splits:
            raise DataError(
                f"{self.root.uri()}: no split {name!r} (has: {', '.join(self.manifest.splits)})"
            )
        return self.manifest.splits[name]

    def shard_location(self, shard: ShardInfo) -> Location:
        return self.root.join(shard.path)

    def read_shard(self, shard: ShardInfo, full_validation: bool | None = None) -> pa.Table:
        """Read one shard, refusing it unless it is exactly what the manifest describes."""
        loc = self.shard_location(shard)
        where = loc.uri()
        if not loc.exists():
            raise DataError(f"{where}: shard listed in the manifest is missing")
        size = loc.size()
        if size != shard.bytes:
            raise DataError(f"{where}: size {size} != {shard.bytes} bytes in the manifest (truncated or replaced)")
        if self.verify_checksums and loc.sha256() != shard.sha256:
            raise DataError(f"{where}: sha256 does not match the manifest (corrupt shard)")
        try:
            if loc.is_local:
                source = pa.memory_map(loc.path, "r")
            else:
                source = loc.fs.open_input_file(loc.path)
            table = pa.ipc.open_file(source).read_all()
            if full_validation if full_validation is not None else self.verify_checksums:
                table.validate(full=True)
        except (pa.ArrowInvalid, pa.ArrowIOError, OSError) as e:
            raise DataError(f"{where}: not a readable Arrow IPC file ({e})") from None
        kind = self.manifest.kind
        if kind not in SCHEMAS or table.schema.remove_metadata() != SCHEMAS[kind].remove_metadata():
            raise DataError(f"{where}: schema {table.schema} is not the {kind} shard schema")
        if table.num_rows != shard.rows:
            raise DataError(f"{where}: {table.num_rows} rows != {shard.rows} in the manifest")
        return table

    def shard_tokens(self, shard: ShardInfo) -> np.ndarray:
        """All token ids of a shard, in order, as one int32 array (zero-copy when memory-mapped)."""
        ids = self.read_shard(shard)["ids"].combine_chunks()
        values = ids.flatten().to_numpy(zero_copy_only=False)
        if len(values) != shard.tokens:
            raise DataError(f"{self.shard_location(shard).uri()}: {len(values)} tokens != {shard.tokens} in the manifest")
        return values

    def verify(self) -> dict[str, Any]:
        """Check every shard (size, sha256, full Arrow validation, counts); raise on the first bad one."""
        report: dict[str, Any] = {}
        tok = self.manifest.tokenizer
        tloc = self.root.join(tok["file"])
        if not tloc.exists() or tloc.sha256() != tok["sha256"]:
            raise DataError(f"{tloc.uri()}: tokenizer missing or its sha256 does not match the manifest")
        for name, split in self.manifest.splits.items():
            for shard in split.shards:
                table = self.read_shard(shard, full_validation=True)
                tokens = int(pc.list_value_length(table["ids"]).to_numpy().sum()) if table.num_rows else 0
                if tokens != shard.tokens:
                    raise DataError(f"{self.shard_location(shard).uri()}: {tokens} tokens != {shard.tokens} in the manifest")
            report[name] = {"shards": len(split.shards), "rows": split.rows, "tokens": split.tokens}
        return report


def write_manifest(root: Location, manifest: Manifest) -> None:
    atomic_write(root.join(MANIFEST), manifest.to_json().encode("utf-8"))
