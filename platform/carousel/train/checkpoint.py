"""One checkpoint = everything needed to continue exactly, as one directory reported to Ray Train.

Layout (each rank writes into its own local directory; Ray Train merges them in storage):

    engine/<tag>/...      DeepSpeed: module, optimizer (ZeRO partitions per rank), LR scheduler
    rank-<r>.pt           per rank: loader position, RNG states, TBPTT hidden state
    meta.json             rank 0: step, metrics, world size, MLflow run id, the resolved spec
    model/                rank 0: fp32 weights + model.json + the unit's files (tokenizer.json, vocab.json),
                          loadable without DeepSpeed
    MANIFEST-rank<r>.json each rank, written last: size and sha256 of every file that rank wrote

A checkpoint counts only when every rank's manifest is present and every file matches it; Ray
Train registers it ("latest") only after all ranks' uploads finished, and the loop trains on only
after Ray Train committed it. Anything less is refused with the file named, so a torn write is never
loaded as complete: a restart falls back to the newest checkpoint that verifies (see
``newest_intact``). Ray Train deletes old checkpoints only after a newer one was committed.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

# torch is imported where a function needs it: the driver reads checkpoints' metadata (meta.json,
# manifests) and never loads torch (docs/performance.md, start-up).
ENGINE_DIR = "engine"
MODEL_DIR = "model"
SAMPLES = "samples.json"  # in model/: the LM's sample generations at that step (a JSON list)
META = "meta.json"


class CheckpointError(RuntimeError):
    pass


class WorldSizeMismatch(RuntimeError):
    """Not a damaged checkpoint: a run restarted with another number of workers."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True, default=str)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def manifest_name(rank: int) -> str:
    return f"MANIFEST-rank{rank}.json"


def write_rank_manifest(root: Path, rank: int) -> None:
    files = {}
    for p in sorted(root.rglob("*")):
        if p.is_file() and not p.name.startswith("MANIFEST-"):
            files[str(p.relative_to(root))] = {"bytes": p.stat().st_size, "sha256": _sha256(p)}
    _write_json_atomic(root / manifest_name(rank), {"rank": rank, "files": files})


def verify(root: str | Path, world_size: int) -> None:
    root = Path(root)
    for rank in range(world_size):
        mpath = root / manifest_name(rank)
        if not mpath.exists():
            raise CheckpointError(f"{root}: {mpath.name} missing (rank {rank} did not finish writing)")
        try:
            files = json.loads(mpath.read_text())["files"]
        except (ValueError, KeyError) as e:
            raise CheckpointError(f"{mpath}: unreadable manifest ({e})") from None
        for rel, want in files.items():
            p = root / rel
            if not p.exists():
                raise CheckpointError(f"{p}: listed in {mpath.name} but missing")
            if p.stat().st_size != want["bytes"]:
                raise CheckpointError(f"{p}: {p.stat().st_size} bytes, manifest says {want['bytes']} (truncated?)")
            if _sha256(p) != want["sha256"]:
                raise CheckpointError(f"{p}: sha256 does not match {mpath.name} (corrupt)")


def newest_intact(candidates: list[tuple[int, Any]], check) -> tuple[Any | None, list[str]]:
    """The newest candidate that passes ``check``; ``candidates`` are (step, checkpoint) pairs.

    ``check(checkpoint)`` raises CheckpointError for a torn or corrupt one. Returns the chosen
    checkpoint (None: start from step 0) and one line per candidate refused on the way, newest first.
    """
    refused = []
    for step, cand in sorted(candidates, key=lambda c: c[0], reverse=True):
        try:
            check(cand)
        except CheckpointError as e:
            refused.append(f"checkpoint at step {step} refused: {e}")
            continue
        return cand, refused
    return None, refused


def read_meta(root: str | Path) -> dict[str, Any]:
    p = Path(root) / META
    if not p.exists():
        raise CheckpointError(f"{root}: no {META}; not a Carousel checkpoint")
    return json.loads(p.read_text())


def save(
    root: Path,
    engine,
    tag: str,
    rank: int,
    rank_state: dict[str, Any],
    meta: dict[str, Any] | None,
    export: dict[str, Any] | None,
) -> None:
    """Collective: every rank calls it with its own (local) ``root``."""
    import torch

    engine.save_checkpoint(str(root / ENGINE_DIR), tag=tag, save_latest=False)
    torch.save(rank_state, root / f"rank-{rank}.pt")
    if rank == 0:
        assert meta is not None and export is not None
        mdir = root / MODEL_DIR
        mdir.mkdir(parents=True, exist_ok=True)
        torch.save(export["state_dict"], mdir / "weights.pt")
        _write_json_atomic(mdir / "model.json", export["model"])
        for name, text in export.get("files", {}).items():  # tokenizer.json / vocab.json: the unit decides
            (mdir / name).write_text(text, encoding="utf-8")
        _write_json_atomic(root / META, {**meta, "tag": tag})
    write_rank_manifest(root, rank)


def load_rank_state(root: Path, rank: int) -> dict[str, Any]:
    p = root / f"rank-{rank}.pt"
    if not p.exists():
        raise CheckpointError(f"{p}: missing; was the checkpoint written by a different number of workers?")
    import torch

    # weights_only: a checkpoint is data, never code.
    return torch.load(p, map_location="cpu", weights_only=True)


def export_state_dict(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """fp32 CPU copy of the weights (tied tensors appear under both names, as state_dict has them)."""
    import torch

    return {k: v.detach().to("cpu", torch.float32).clone() for k, v in module.state_dict().items()}
