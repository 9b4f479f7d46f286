"""How sums over the training data are combined across processes.

The engine only ever calls `reducer.sum(tensor)` on a tensor that holds this process's share of a sum over
training examples. One process needs nothing (`LocalReducer`); under `torch.distributed` the shares are
all-reduced so every rank sees the same total and iterative solvers step identically everywhere.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor


@runtime_checkable
class Reducer(Protocol):
    """Sums a tensor over all participating processes; each process passes its own share."""

    def sum(self, tensor: Tensor) -> Tensor: ...


class LocalReducer:
    """One process: its share is the whole sum."""

    def sum(self, tensor: Tensor) -> Tensor:
        return tensor


class DistributedReducer:
    """All-reduce over a `torch.distributed` process group (the default group when `group` is None)."""

    def __init__(self, group: Any = None) -> None:
        if not torch.distributed.is_available() or not torch.distributed.is_initialized():
            raise RuntimeError(
                "DistributedReducer needs an initialised torch.distributed process group; call "
                "torch.distributed.init_process_group first, or use LocalReducer for one process."
            )
        self.group = group

    def sum(self, tensor: Tensor) -> Tensor:
        total = tensor.clone()
        torch.distributed.all_reduce(total, op=torch.distributed.ReduceOp.SUM, group=self.group)
        return total
