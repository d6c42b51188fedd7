"""`carousel prepare text`: corpus -> tokenizer -> Arrow shards (tokenized in parallel Ray tasks) -> manifest.

The manifest is written last, so a dataset directory with a manifest is complete; a crash leaves
at most shards that no manifest names (and that the next prepare overwrites).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from tokenizers import Tokenizer

from carousel.data.corpus import Corpus
from carousel.data.shards import MANIFEST, DataError, Manifest, ShardInfo, SplitInfo, write_manifest, write_text_shard
from carousel.data.storage import Location, atomic_write
from carousel.data.tokenizer import Kind, eos_id, train_tokenizer

TOKENIZER_FILE = "tokenizer.json"


@dataclass
class PrepareResult:
    root: str
    manifest: Manifest
    seconds: float


def _tokenize_and_write(tokenizer_json: str, out_uri: str, docs: list[str], texts: list[str]) -> ShardInfo:
    from carousel.data.tokenizer import encode_lines

    tok = Tokenizer.from_str(tokenizer_json)
    return write_text_shard(Location.parse(out_uri), docs, encode_lines(tok, texts))


def prepare_text(
    corpus: Corpus,
    out: str,
    tokenizer: Kind = "bpe",
    vocab_size: int = 4000,
    tokenizer_file: str | None = None,
    shard_lines: int = 4096,
    overwrite: bool = False,
) -> PrepareResult:
    import ray

    t0 = time.time()
    root = Location.parse(out)
    if root.join(MANIFEST).exists() and not overwrite:
        raise DataError(f"{root.uri()}: a prepared dataset is already there (pass --overwrite to replace it)")
    root.makedirs()

    if tokenizer_file:
        tok = Tokenizer.from_file(tokenizer_file)
        eos_id(tok)  # refuse tokenizers without <eos> up front
    else:
        tok = train_tokenizer(tokenizer, [t for _, t in corpus.records["train"]], vocab_size)
    tok_json = tok.to_str()
    tok_sha = atomic_write(root.join(TOKENIZER_FILE), tok_json.encode("utf-8"))

    if not ray.is_initialized():
        from carousel.ray_session import init_ray

        init_ray()
    task = ray.remote(num_cpus=1)(_tokenize_and_write)
    tok_ref = ray.put(tok_json)
    pending: dict[str, list] = {}
    for split, records in corpus.records.items():
        pending[split] = []
        for i, start in enumerate(range(0, len(records), shard_lines)):
            chunk = records[start : start + shard_lines]
            uri = root.join(f"{split}-{i:05d}.arrow").uri()
            pending[split].append(task.remote(tok_ref, uri, [d for d, _ in chunk], [t for _, t in chunk]))
    splits = {split: SplitInfo(list(ray.get(refs))) for split, refs in pending.items()}

    manifest = Manifest(
        kind="text",
        tokenizer={
            "file": TOKENIZER_FILE,
            "sha256": tok_sha,
            "type": tokenizer if not tokenizer_file else "file",
            "vocab_size": tok.get_vocab_size(),
            "eos_id": eos_id(tok),
        },
        splits=splits,
        source=corpus.source,
        rejected=corpus.rejected,
    )
    write_manifest(root, manifest)
    return PrepareResult(root.uri(), manifest, time.time() - t0)
