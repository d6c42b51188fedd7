import json

import numpy as np
import pytest

from carousel.data.shards import MANIFEST, DataError, Dataset, Manifest, SplitInfo, write_manifest, write_text_shard
from carousel.data.storage import Location, atomic_write


def make_dataset(root, splits):
    """splits: {name: [[ids per row] per shard]}"""
    loc = Location.parse(str(root))
    tok_sha = atomic_write(loc.join("tokenizer.json"), b"{}")
    infos = {}
    for name, shards in splits.items():
        infos[name] = SplitInfo(
            [
                write_text_shard(loc.join(f"{name}-{i:05d}.arrow"), [f"d{j}" for j in range(len(rows))], rows)
                for i, rows in enumerate(shards)
            ]
        )
    write_manifest(loc, Manifest("text", {"file": "tokenizer.json", "sha256": tok_sha, "vocab_size": 100, "eos_id": 0}, infos))
    return Dataset(str(root))


def test_round_trip_and_counts(tmp_path):
    ds = make_dataset(tmp_path, {"train": [[[1, 2, 3], [4, 5]], [[6]]]})
    split = ds.split("train")
    assert split.rows == 3 and split.tokens == 6
    assert [list(ds.shard_tokens(s)) for s in split.shards] == [[1, 2, 3, 4, 5], [6]]
    assert ds.verify()["train"] == {"shards": 2, "rows": 3, "tokens": 6}
    manifest = json.loads((tmp_path / MANIFEST).read_text())
    assert manifest["splits"]["train"]["tokens"] == 6 and len(manifest["splits"]["train"]["shards"][0]["sha256"]) == 64


def test_no_temporary_files_left(tmp_path):
    make_dataset(tmp_path, {"train": [[[1, 2]]]})
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]


@pytest.mark.parametrize(
    "damage",
    [
        lambda b: b[: len(b) // 2],  # truncated
        lambda b: b"",  # zero bytes
        lambda b: b[:100] + bytes([b[100] ^ 0xFF]) + b[101:],  # a flipped byte
    ],
    ids=["truncated", "empty", "flipped"],
)
def test_corrupt_shard_is_refused_naming_it(tmp_path, damage):
    ds = make_dataset(tmp_path, {"train": [[[1, 2, 3] * 50]]})
    shard = tmp_path / "train-00000.arrow"
    shard.write_bytes(damage(shard.read_bytes()))
    with pytest.raises(DataError, match="train-00000.arrow"):
        ds.shard_tokens(ds.split("train").shards[0])
    with pytest.raises(DataError, match="train-00000.arrow"):
        Dataset(str(tmp_path)).verify()


def test_overwritten_body_with_matching_manifest_is_caught_by_full_validation(tmp_path):
    """Even if someone rewrites the manifest's checksum, Arrow's full validation still reads the body."""
    ds = make_dataset(tmp_path, {"train": [[[1, 2, 3] * 50]]})
    shard = tmp_path / "train-00000.arrow"
    data = bytearray(shard.read_bytes())
    # Overwrite the list offsets buffer region with garbage of the same length.
    start = data.find(np.array([0, 150], dtype=np.int32).tobytes())
    assert start > 0
    data[start + 4 : start + 8] = np.array([10**6], dtype=np.int32).tobytes()
    shard.write_bytes(bytes(data))
    m = json.loads((tmp_path / MANIFEST).read_text())
    import hashlib

    m["splits"]["train"]["shards"][0]["sha256"] = hashlib.sha256(bytes(data)).hexdigest()
    (tmp_path / MANIFEST).write_text(json.dumps(m))
    with pytest.raises(DataError, match="train-00000.arrow"):
        Dataset(str(tmp_path)).verify()


def test_missing_manifest_and_split_are_named(tmp_path):
    with pytest.raises(DataError, match="no manifest"):
        Dataset(str(tmp_path))
    ds = make_dataset(tmp_path, {"train": [[[1]]]})
    with pytest.raises(DataError, match="no split 'valid'"):
        ds.split("valid")


def test_malformed_manifest(tmp_path):
    (tmp_path / MANIFEST).write_text('{"schema_version": 1, "splits": 3}')
    with pytest.raises(DataError, match="malformed manifest"):
        Dataset(str(tmp_path))
    (tmp_path / MANIFEST).write_text('{"schema_version": 99}')
    with pytest.raises(DataError, match="schema_version"):
        Dataset(str(tmp_path))
