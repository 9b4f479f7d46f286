"""Where this process stands among the processes that share an influence computation.

The engine sums over the training data through `Distribution.reducer`; scoring runs on this process's shard
of dataset indices; shards are joined with `gather_scores`. One process is the plain case: the reducer does
nothing, the shard is everything, and gathering returns its input.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from torch import Tensor

from .reducer import LocalReducer, Reducer


@dataclass
class Distribution:
    """This process's rank among `world_size` processes, and how sums over the training data are reduced."""

    reducer: Reducer = field(default_factory=LocalReducer)
    rank: int = 0
    world_size: int = 1

    @property
    def is_global_zero(self) -> bool:
        return self.rank == 0

    def shard(self, indices: Sequence[int]) -> list[int]:
        """This process's share of `indices`: every world_size-th one from position `rank`, none repeated."""
        return list(indices)[self.rank :: self.world_size]

    def gather_by_index(self, values: Tensor, indices: Tensor) -> tuple[Tensor, Tensor]:
        """Join per-process values [..., n_local] (last dim: examples) and their dataset indices [n_local]
        into [..., N] and [N], sorted by dataset index."""
        order = indices.argsort()
        return values[..., order], indices[order]

    def barrier(self) -> None:
        """Wait for every process (nothing to wait for with one)."""


def local_distribution() -> Distribution:
    """The single-process distribution."""
    return Distribution()


__all__ = ["Distribution", "local_distribution"]
