"""Token streams for truncated BPTT, split across data-parallel ranks.

A split's tokens, in manifest order, form one sequence of N tokens. It is cut into
S = world_size x batch_size contiguous streams of L = (N - 1) // S tokens; rank r owns streams
[r*B, (r+1)*B), i.e. one contiguous range of the corpus, so ranks are disjoint and, because every
stream has the same length, every rank takes the same number of windows: L // bptt per epoch.
Window k of a stream is tokens [k*T, k*T + T] (T + 1 tokens: inputs and shifted targets), so the
hidden state carried from window k to k+1 belongs to exactly the preceding text.

A rank reads only the shards that overlap its range (memory-mapped), and slices windows out of
them lazily. The position (epoch, window) is the loader's whole state; restoring it continues at
exactly the same window.
"""

from __future__ import annotations

import bisect

import numpy as np
import torch

from carousel.data.layout import StreamLayout
from carousel.data.shards import Dataset, DataError


class TokenRange:
    """Random access to tokens [start, stop) of a split, backed by only the shards that hold them."""

    def __init__(self, dataset: Dataset, split: str, start: int, stop: int):
        info = dataset.split(split)
        self.start, self.stop = start, stop
        self._arrays: list[np.ndarray] = []
        self._offsets: list[int] = []  # global offset of each loaded array
        offset = 0
        for shard in info.shards:
            end = offset + shard.tokens
            if end > start and offset < stop:
                self._arrays.append(dataset.shard_tokens(shard))
                self._offsets.append(offset)
            offset = end

    def strided_run(self, a0: int, step: int, length: int, k: int) -> tuple[int, int, np.ndarray] | None:
        """The run of windows around ``k`` that one shard holds whole: window j is tokens
        [a0 + j*step, a0 + j*step + length). Returns (first, stop, view) with ``view[j - first]``
        = window j for first <= j < stop, a read-only strided view of the memory-mapped shard
        (no copy), or None when window k straddles a shard boundary (read it with ``slice``).

        Why by hand: a stream's windows advance by bptt through one shard for hundreds of steps,
        so the loader resolves the shard once per run instead of once per row and window; a row
        is then one indexed copy. Measured (docs/performance.md, data row): 2.6-3.2x slicing each
        row, against 1.55x for a bisect per row and window; numpy-vectorized gathers (searchsorted
        and a fancy index per shard) were slower than either at 16 rows a window.
        """
        a = a0 + k * step
        if a < self.start or a + length > self.stop:
            raise IndexError(f"[{a}, {a + length}) outside this rank's range [{self.start}, {self.stop})")
        i = bisect.bisect_right(self._offsets, a) - 1
        arr, off = self._arrays[i], self._offsets[i]
        lo_tok, hi_tok = max(off, self.start), min(off + len(arr), self.stop)
        if a + length > hi_tok:
            return None
        first = max(0, -((a0 - lo_tok) // step))  # smallest j with a0 + j*step >= lo_tok
        stop = (hi_tok - length - a0) // step + 1  # one past the largest j whose window ends by hi_tok
        base = a0 + first * step - off
        view = np.lib.stride_tricks.as_strided(
            arr[base:], shape=(stop - first, length), strides=(step * arr.itemsize, arr.itemsize), writeable=False
        )
        return first, stop, view

    def slice(self, a: int, b: int) -> np.ndarray:
        """Global tokens [a, b) as a fresh int64 array."""
        if a < self.start or b > self.stop:
            raise IndexError(f"[{a}, {b}) outside this rank's range [{self.start}, {self.stop})")
        out = np.empty(b - a, dtype=np.int64)
        i = bisect.bisect_right(self._offsets, a) - 1
        filled = 0
        while filled < b - a:
            arr, off = self._arrays[i], self._offsets[i]
            lo = a + filled - off
            take = min(len(arr) - lo, b - a - filled)
            out[filled : filled + take] = arr[lo : lo + take]
            filled += take
            i += 1
        return out


class StreamLoader:
    """Yields (inputs [B, T], targets [B, T], fresh) for one rank; ``fresh`` means reset the hidden state."""

    def __init__(
        self,
        dataset: Dataset,
        split: str,
        rank: int,
        world_size: int,
        batch_size: int,
        bptt: int,
        max_windows: int | None = None,
    ):
        self.layout = StreamLayout(dataset.split(split).tokens, world_size, batch_size, bptt)
        self.layout.validate(f"{dataset.root.uri()} split {split!r}")
        self.rank, self.batch_size, self.bptt = rank, batch_size, bptt
        self.windows = min(self.layout.windows_per_epoch, max_windows or self.layout.windows_per_epoch)
        self.tokens = TokenRange(dataset, split, *self.layout.rank_range(rank))
        first = self.rank * self.batch_size
        self._starts = [self.layout.stream_start(first + b) for b in range(batch_size)]
        # Per stream, the shard run its current window lies in (TokenRange.strided_run).
        self._runs: list[tuple[int, int, np.ndarray] | None] = [None] * batch_size
        self.epoch, self.position = 0, 0

    def __len__(self) -> int:
        return self.windows

    def window(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        T = self.bptt
        block = np.empty((self.batch_size, T + 1), dtype=np.int64)
        runs = self._runs
        for r, run in enumerate(runs):
            if run is None or not run[0] <= k < run[1]:
                run = runs[r] = self.tokens.strided_run(self._starts[r], T, T + 1, k)
                if run is None:  # this row straddles two shards
                    block[r] = self.tokens.slice(self._starts[r] + k * T, self._starts[r] + k * T + T + 1)
                    continue
            block[r] = run[2][k - run[0]]
        block = torch.from_numpy(block)
        return block[:, :-1], block[:, 1:]

    def next(self) -> tuple[torch.Tensor, torch.Tensor, bool]:
        if self.position >= self.windows:
            self.epoch, self.position = self.epoch + 1, 0
        fresh = self.position == 0
        x, y = self.window(self.position)
        self.position += 1
        return x, y, fresh

    def __iter__(self):
        """One pass over all windows from the start (evaluation)."""
        for k in range(self.windows):
            x, y = self.window(k)
            yield x, y, k == 0

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position, "windows": self.windows, "rank": self.rank}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if state["windows"] != self.windows:
            raise DataError(
                f"loader state is for {state['windows']} windows per epoch, this layout has {self.windows}: "
                "the data, worker count, batch_size or bptt changed since the checkpoint"
            )
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
