"""Length-bucketed speech batches under a frames budget, split across data-parallel ranks.

The contract mirrors streams.py: ranks are disjoint, every rank takes the same number of steps
per epoch, and the loader's whole state is (epoch, position), from which it continues exactly.

An epoch's plan is a pure function of (frame counts, budget, world size, seed, epoch):

1. sort utterances by length, ties broken by an epoch-seeded permutation;
2. fill batches greedily while ``utterances x longest <= budget`` (padded frames, which is what a
   batch costs in memory and time);
3. while the batch count is not a multiple of the world size, halve the batch with the most
   utterances (halving never raises a batch's padded size, so the budget still holds);
4. take batches in groups of ``world`` neighbours (similar lengths, so no rank waits long for
   another at the gradient all-reduce), shuffle the groups, and give rank r the r-th batch of
   every group.

So each epoch yields every utterance exactly once, across all ranks together.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from carousel.data.shards import DataError, Dataset
from carousel.data.speech import utterance_stats


def greedy_batches(order: np.ndarray, frames: np.ndarray, budget: int) -> list[list[int]]:
    """``order`` sorted by ascending length -> batches whose padded size stays within ``budget``."""
    batches: list[list[int]] = []
    cur: list[int] = []
    for i in order:
        f = int(frames[i])
        if f > budget:
            raise DataError(f"an utterance of {f} frames exceeds the batch budget of {budget} frames")
        if cur and (len(cur) + 1) * f > budget:
            batches.append(cur)
            cur = []
        cur.append(int(i))
    if cur:
        batches.append(cur)
    return batches


def plan_epoch(frames: np.ndarray, budget: int, world: int, seed: int, epoch: int) -> list[list[list[int]]]:
    """-> per step, per rank, the utterance indices of that rank's batch."""
    rng = np.random.default_rng([seed, epoch])
    perm = rng.permutation(len(frames))
    order = perm[np.argsort(frames[perm], kind="stable")]
    batches = greedy_batches(order, frames, budget)
    while len(batches) % world:
        k = max(range(len(batches)), key=lambda j: len(batches[j]))
        if len(batches[k]) < 2:
            raise DataError(
                f"{len(frames)} utterances cannot make a multiple of {world} batches; "
                "use fewer workers or more data"
            )
        b = batches.pop(k)
        half = len(b) // 2
        batches[k:k] = [b[:half], b[half:]]  # neighbours stay in length order
    groups = [batches[i : i + world] for i in range(0, len(batches), world)]
    return [groups[g] for g in rng.permutation(len(groups))]


def plan_eval(frames: np.ndarray, budget: int, world: int, rank: int) -> list[list[int]]:
    """Validation: every utterance once across ranks, in length order; counts may differ by rank."""
    order = np.argsort(frames, kind="stable")
    return greedy_batches(order, frames, budget)[rank::world]


@dataclass
class SpeechBatch:
    feats: torch.Tensor  # [B, T, n_mels] float32, zero beyond each length
    lengths: torch.Tensor  # [B] int64
    labels: torch.Tensor  # [sum of label lengths] int64, concatenated
    label_lengths: torch.Tensor  # [B] int64
    texts: list[str]
    norm: torch.Tensor | None = None  # [B, 2, n_mels] per-utterance mean and std (speaker normalization)

    @property
    def frames(self) -> int:
        return int(self.lengths.sum())


NORMALIZATIONS = ("global", "speaker")


def speaker_stats_table(dataset: Dataset, where: str = "speech.normalization") -> dict[str, np.ndarray]:
    """The manifest's per-speaker statistics as {speaker: [2, n_mels]}; a clear error for datasets
    prepared before they were recorded."""
    norm = dataset.manifest.speech.get("normalization", {})
    if "speakers" not in norm:
        raise DataError(f"{where}: speaker needs per-speaker statistics, which {dataset.root.uri()} does not have "
                        "(prepared by an older carousel); run `carousel prepare speech` again")
    return {k: np.asarray([v["mean"], v["std"]], dtype=np.float32) for k, v in norm["speakers"].items()}


class SpeechSplit:
    """Random access to one split's utterances, backed by its memory-mapped shards.

    With ``normalization="speaker"`` each batch carries every utterance's speaker statistics (from
    the manifest), or the utterance's own for a speaker without any (see speech.UNKNOWN_SPEAKER).
    """

    def __init__(self, dataset: Dataset, split: str, limit: int | None = None, normalization: str = "global"):
        if normalization not in NORMALIZATIONS:
            raise ValueError(f"normalization: {normalization!r} is not one of {', '.join(NORMALIZATIONS)}")
        self.n_mels = int(dataset.manifest.speech["features"]["n_mels"])
        self.normalization = normalization
        self._speaker_stats = speaker_stats_table(dataset) if normalization == "speaker" else {}
        self._feats, self._offsets, self._ids, self._id_offsets, self.texts, self.speakers = [], [], [], [], [], []
        self.utts: list[str] = []
        frames, where = [], []
        for s, shard in enumerate(dataset.split(split).shards):
            table = dataset.read_shard(shard)
            feats = table["feats"].combine_chunks()
            ids = table["ids"].combine_chunks()
            self._feats.append(feats.values.to_numpy(zero_copy_only=False))
            self._offsets.append(feats.offsets.to_numpy())
            self._ids.append(ids.values.to_numpy(zero_copy_only=False))
            self._id_offsets.append(ids.offsets.to_numpy())
            self.texts.extend(table["text"].to_pylist())
            self.speakers.extend(table["speaker"].to_pylist())
            self.utts.extend(table["utt"].to_pylist())
            frames.extend(table["frames"].to_pylist())
            where.extend((s, r) for r in range(table.num_rows))
        if limit is not None:
            frames, where, self.texts, self.speakers = frames[:limit], where[:limit], self.texts[:limit], self.speakers[:limit]
            self.utts = self.utts[:limit]
        self.frames = np.asarray(frames, dtype=np.int64)
        self._where = where

    def __len__(self) -> int:
        return len(self.frames)

    def features(self, i: int) -> np.ndarray:
        s, r = self._where[i]
        a, b = self._offsets[s][r], self._offsets[s][r + 1]
        return self._feats[s][a:b].reshape(-1, self.n_mels)

    def labels(self, i: int) -> np.ndarray:
        s, r = self._where[i]
        return self._ids[s][self._id_offsets[s][r] : self._id_offsets[s][r + 1]]

    def norm(self, i: int) -> np.ndarray | None:
        """[2, n_mels] mean and std for utterance ``i`` under speaker normalization (None: global)."""
        if self.normalization == "global":
            return None
        stats = self._speaker_stats.get(self.speakers[i])
        return stats if stats is not None else utterance_stats(self.features(i)).astype(np.float32)

    def batch(self, idx: list[int]) -> SpeechBatch:
        lengths = [int(self.frames[i]) for i in idx]
        feats = torch.zeros(len(idx), max(lengths), self.n_mels)
        for j, i in enumerate(idx):
            feats[j, : lengths[j]] = torch.from_numpy(self.features(i).astype(np.float32))
        labels = [self.labels(i) for i in idx]
        return SpeechBatch(
            feats,
            torch.tensor(lengths, dtype=torch.long),
            torch.from_numpy(np.concatenate(labels).astype(np.int64)),
            torch.tensor([len(x) for x in labels], dtype=torch.long),
            [self.texts[i] for i in idx],
            None if self.normalization == "global" else torch.from_numpy(np.stack([self.norm(i) for i in idx])),
        )


class BucketLoader:
    """Training batches for one rank: ``next()`` forever, epoch after epoch."""

    def __init__(self, dataset: Dataset, split: str, rank: int, world: int, budget: int, seed: int,
                 normalization: str = "global"):
        self.data = SpeechSplit(dataset, split, normalization=normalization)
        self.rank, self.world, self.budget, self.seed = rank, world, budget, seed
        self.epoch, self.position = 0, 0
        self._plan_epoch: int | None = None
        self._plan: list[list[list[int]]] = []
        self.steps = len(self._epoch_plan(0))

    def _epoch_plan(self, epoch: int) -> list[list[list[int]]]:
        if self._plan_epoch != epoch:
            self._plan = plan_epoch(self.data.frames, self.budget, self.world, self.seed, epoch)
            self._plan_epoch = epoch
        return self._plan

    def __len__(self) -> int:
        return self.steps

    def next(self) -> SpeechBatch:
        plan = self._epoch_plan(self.epoch)
        if self.position >= len(plan):
            self.epoch, self.position = self.epoch + 1, 0
            plan = self._epoch_plan(self.epoch)
        idx = plan[self.position][self.rank]
        self.position += 1
        return self.data.batch(idx)

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position, "utterances": len(self.data), "rank": self.rank,
                "world": self.world, "budget": self.budget}

    def load_state_dict(self, state: dict[str, int]) -> None:
        mine = self.state_dict()
        for k in ("utterances", "world", "budget"):
            if state[k] != mine[k]:
                raise DataError(
                    f"loader state is for {k} {state[k]}, this loader has {mine[k]}: the data, worker count "
                    "or speech.frames_per_batch changed since the checkpoint"
                )
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
