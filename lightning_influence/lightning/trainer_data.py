"""The data a trainer fits on, found before training starts as well as after it ends."""

from __future__ import annotations

from typing import Any, Literal

import pytorch_lightning as pl
from torch.utils.data import DataLoader

Stage = Literal["train", "val"]


def _given(trainer: pl.Trainer, stage: Stage) -> Any:
    """What `trainer.fit` was given for `stage` (loaders, or the datamodule's or module's `*_dataloader()`), or
    None. Read from the fit loop's data source, Lightning's record of it, so that it is found before the loop
    sets data up, and for validation also when the module has no `validation_step` (Lightning then sets none
    up); through the datamodule where a Lightning version keeps no such record."""
    loop = trainer.fit_loop if stage == "train" else trainer.fit_loop.epoch_loop.val_loop
    source = getattr(loop, "_data_source", None)
    if source is not None and getattr(source, "instance", None) is not None:
        return source.dataloader() if source.is_defined() else None
    if trainer.datamodule is not None:
        return getattr(trainer.datamodule, f"{stage}_dataloader")()
    return None


def trainer_loader(trainer: pl.Trainer, stage: Stage) -> DataLoader:
    """The trainer's training or first validation DataLoader: the one its fit loop set up, else the one
    `trainer.fit` was given. A clear error, naming the callback argument to pass, when there is none."""
    loaders = trainer.train_dataloader if stage == "train" else trainer.val_dataloaders
    if loaders is None:
        loaders = _given(trainer, stage)
    if isinstance(loaders, (list, tuple)) and loaders:
        loaders = loaders[0]
    argument = "training_data" if stage == "train" else "query_data"
    if loaders is None:
        what = "training" if stage == "train" else "validation"
        raise ValueError(
            f"Found no {what} data to take the {'training examples' if stage == 'train' else 'queries'} from: "
            f"trainer.fit got no {stage}_dataloaders, and neither a datamodule nor the module defines "
            f"{stage}_dataloader(). Pass InfluenceCallback({argument}=...), a Dataset or DataLoader."
        )
    if not isinstance(loaders, DataLoader):
        raise TypeError(
            f"The trainer's {stage} data is a {type(loaders).__name__}, not one DataLoader; pass {argument}=... ."
        )
    return loaders
