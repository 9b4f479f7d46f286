"""Small LightningModules and data for the callback, report and resume tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, TensorDataset


def blobs(n: int, features: int = 5, classes: int = 3, seed: int = 0) -> tuple[Tensor, Tensor]:
    """A float32 classification problem with some label noise."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, features, generator=generator)
    weights = torch.randn(features, classes, generator=generator)
    y = (x @ weights + 0.5 * torch.randn(n, classes, generator=generator)).argmax(1)
    return x, y


def tiny_images(n: int, seed: int = 0) -> tuple[Tensor, Tensor]:
    """n single-channel 6×6 images of two classes (bright left half or bright right half, plus noise)."""
    generator = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 2, (n,), generator=generator)
    x = 0.3 * torch.randn(n, 1, 6, 6, generator=generator)
    x[y == 0, :, :, :3] += 1.0
    x[y == 1, :, :, 3:] += 1.0
    return x, y


class DictDataset(Dataset):
    """Examples as dicts {"x": input, "y": label}, batched by the default collate into dicts of tensors."""

    def __init__(self, x: Tensor, y: Tensor) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        return {"x": self.x[index], "y": self.y[index]}


class Classifier(pl.LightningModule):
    """An MLP classifier with optional dropout and BatchNorm; its loss is the `loss_fn` attribute."""

    def __init__(self, features: int = 5, classes: int = 3, hidden: int = 8, dropout: float = 0.0,
                 batchnorm: bool = False, flatten: bool = False, lr: float = 0.05) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()] if flatten else []
        layers.append(nn.Linear(features, hidden))
        if batchnorm:
            layers.append(nn.BatchNorm1d(hidden))
        layers.append(nn.Tanh())
        if dropout:
            layers.append(nn.Dropout(dropout))
        layers.append(nn.Linear(hidden, classes))
        self.net = nn.Sequential(*layers)
        self.loss_fn = F.cross_entropy
        self.lr = lr

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    @staticmethod
    def _split(batch: Any) -> tuple[Tensor, Tensor]:
        return (batch["x"], batch["y"]) if isinstance(batch, dict) else (batch[0], batch[1])

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = self._split(batch)
        loss = self.loss_fn(self(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = self._split(batch)
        self.log("val_loss", self.loss_fn(self(x), y))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.lr)


def make_trainer(root: Path, *, logger: Any = True, callbacks: list[pl.Callback] = (), epochs: int = 3,
                 **kwargs: Any) -> pl.Trainer:
    """A quiet CPU trainer for tests; `logger=True` gives a TensorBoardLogger under `root`."""
    if logger is True:
        logger = pl.loggers.TensorBoardLogger(str(root), name="tb")
    options: dict[str, Any] = dict(
        accelerator="cpu", devices=1, max_epochs=epochs, logger=logger, callbacks=list(callbacks),
        enable_checkpointing=False, enable_model_summary=False, enable_progress_bar=False, log_every_n_steps=1,
        num_sanity_val_steps=0, default_root_dir=str(root), deterministic=True,
    )
    options.update(kwargs)
    return pl.Trainer(**options)


def loaders(x: Tensor, y: Tensor, x_val: Tensor, y_val: Tensor, batch_size: int = 16,
            shuffle: bool = True) -> tuple[DataLoader, DataLoader]:
    return (DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=shuffle),
            DataLoader(TensorDataset(x_val, y_val), batch_size=batch_size))
