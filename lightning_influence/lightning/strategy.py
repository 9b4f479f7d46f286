"""Which Lightning strategies the influence computation runs under, and the `Distribution` of a trainer's processes."""

from __future__ import annotations

import datetime
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.strategies import (
    DDPStrategy,
    DeepSpeedStrategy,
    FSDPStrategy,
    ModelParallelStrategy,
    ParallelStrategy,
)

from lightning_influence.engine.distribution import DEFAULT_TIMEOUT, Distribution

#: What `distribution_for` accepts, for error messages.
SUPPORTED = (
    "single-device strategies (any accelerator, devices=1) and DDP-style strategies (strategy='ddp', "
    "'ddp_spawn', 'ddp_fork', 'ddp_notebook'; gloo on CPU, nccl on GPU; several nodes through num_nodes)"
)


def refuse_unsupported_strategy(strategy: Any) -> None:
    """Raise for strategies the influence computation cannot run under, naming what it supports."""
    name = type(strategy).__name__
    if isinstance(strategy, (FSDPStrategy, DeepSpeedStrategy, ModelParallelStrategy)):
        raise NotImplementedError(
            f"Influence functions are not supported under {name}: it shards the model's parameters across "
            f"processes, while the influence computation needs every parameter on every process. Supported: "
            f"{SUPPORTED}. Compute influence from a checkpoint with one of those, or with the functional API."
        )
    if isinstance(strategy, ParallelStrategy) and not isinstance(strategy, DDPStrategy):
        raise NotImplementedError(f"Influence functions are not supported under {name}. Supported: {SUPPORTED}.")


def distribution_for(trainer: pl.Trainer, *, timeout: datetime.timedelta | None = None) -> Distribution:
    """The distribution of a trainer's processes, once its strategy has set up (e.g. in `on_fit_end`).

    Collective under DDP: every rank must call it, and `close()` the result when done. One process
    (single-device strategies, devices=1) takes the plain path and pays nothing. DDP-style strategies get
    process groups of their own over the same ranks, so the influence computation's collectives have their own
    `timeout` (default: torch.distributed's 30 minutes); parameter-sharding strategies are refused.
    """
    refuse_unsupported_strategy(trainer.strategy)
    if trainer.world_size == 1:
        return Distribution()
    if not torch.distributed.is_available() or not torch.distributed.is_initialized():
        raise RuntimeError(
            f"The trainer runs {trainer.world_size} processes but torch.distributed is not initialised yet; "
            "build the Distribution after the strategy has set up (in on_fit_end or later)."
        )
    return Distribution.from_process_group(timeout=timeout or DEFAULT_TIMEOUT)
