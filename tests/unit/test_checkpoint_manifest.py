"""A checkpoint is complete or refused: what a torn, truncated or partial write looks like to verify()."""

import json

import pytest

from carousel.train import checkpoint as ckpt


def make_checkpoint(root, world=2):
    for rank in range(world):
        (root / "engine" / "step10").mkdir(parents=True, exist_ok=True)
        (root / "engine" / "step10" / f"optim_rank{rank}.pt").write_bytes(bytes(range(256)) * (rank + 4))
        (root / f"rank-{rank}.pt").write_bytes(b"loader state %d" % rank)
        if rank == 0:
            (root / ckpt.META).write_text(json.dumps({"step": 10, "world_size": world, "tag": "step10"}))
        # Ray merges the ranks' directories; each rank's manifest lists only its own files.
        own = [p for p in root.rglob("*") if p.is_file() and (f"rank{rank}" in p.name or f"rank-{rank}" in p.name
                                                           or (rank == 0 and p.name == ckpt.META))]
        files = {str(p.relative_to(root)): {"bytes": p.stat().st_size, "sha256": ckpt._sha256(p)} for p in own}
        (root / ckpt.manifest_name(rank)).write_text(json.dumps({"rank": rank, "files": files}))
    return root


def test_a_complete_checkpoint_verifies(tmp_path):
    ckpt.verify(make_checkpoint(tmp_path), 2)


@pytest.mark.parametrize("damage,message", [
    (lambda r: (r / "MANIFEST-rank1.json").unlink(), r"MANIFEST-rank1.json missing \(rank 1 did not finish writing\)"),
    (lambda r: (r / "MANIFEST-rank0.json").write_text('{"rank": 0, "fi'), r"MANIFEST-rank0.json: unreadable manifest"),
    (lambda r: (r / "engine/step10/optim_rank1.pt").write_bytes(b"\0" * 100), r"optim_rank1.pt: 100 bytes, manifest says 1280 \(truncated\?\)"),
    (lambda r: (r / "rank-0.pt").write_bytes(b"loader state 9"), r"rank-0.pt: sha256 does not match MANIFEST-rank0.json"),
    (lambda r: (r / "engine/step10/optim_rank0.pt").unlink(), r"optim_rank0.pt: listed in MANIFEST-rank0.json but missing"),
])
def test_a_damaged_checkpoint_is_refused_naming_the_file(tmp_path, damage, message):
    root = make_checkpoint(tmp_path)
    damage(root)
    with pytest.raises(ckpt.CheckpointError, match=message):
        ckpt.verify(root, 2)


def test_a_manifest_write_cut_short_leaves_no_manifest(tmp_path, monkeypatch):
    """The manifest goes to a temp file, is fsynced, then renamed: a crash before the rename leaves
    no MANIFEST-rank<r>.json, so the checkpoint reads as incomplete rather than as complete."""
    import os

    def crash(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", crash)
    (tmp_path / "rank-0.pt").write_bytes(b"x")
    with pytest.raises(OSError, match="No space left"):
        ckpt.write_rank_manifest(tmp_path, 0)
    assert not (tmp_path / ckpt.manifest_name(0)).exists()
    with pytest.raises(ckpt.CheckpointError, match="missing"):
        ckpt.verify(tmp_path, 1)
