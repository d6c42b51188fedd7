"""How a split's tokens are cut into streams and windows (module docstring of streams.py): pure
arithmetic, which the driver checks data against before anything starts, without loading torch."""

from __future__ import annotations

from dataclasses import dataclass

from carousel.data.shards import DataError


@dataclass(frozen=True)
class StreamLayout:
    """The pure arithmetic of the layout (unit-tested without data)."""

    total_tokens: int
    world_size: int
    batch_size: int
    bptt: int

    @property
    def streams(self) -> int:
        return self.world_size * self.batch_size

    @property
    def stream_len(self) -> int:
        return (self.total_tokens - 1) // self.streams

    @property
    def windows_per_epoch(self) -> int:
        return self.stream_len // self.bptt

    def stream_start(self, stream: int) -> int:
        return stream * self.stream_len

    def rank_range(self, rank: int) -> tuple[int, int]:
        """Global token range rank ``rank`` needs, targets included."""
        first, last = rank * self.batch_size, (rank + 1) * self.batch_size - 1
        return self.stream_start(first), self.stream_start(last) + self.windows_per_epoch * self.bptt + 1

    def validate(self, where: str) -> None:
        if self.windows_per_epoch < 1:
            raise DataError(
                f"{where}: {self.total_tokens} tokens are too few for {self.world_size} workers x "
                f"{self.batch_size} streams x bptt {self.bptt} (need at least "
                f"{self.streams * self.bptt + 1}); lower train.batch_size or train.bptt"
            )
