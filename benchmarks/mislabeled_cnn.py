"""Benchmark: self-influence with the callback's defaults on a CNN with BatchNorm, finding flipped labels.

A convolutional network with BatchNorm (conv 1→16 → BN → ReLU → conv 16→32 → BN → ReLU → 2×2 max-pool → linear
512→10, p = 9,930) is trained with Adam on scikit-learn's digits as 1×8×8 images, 1,300 of them with 10% of the
labels flipped to a wrong class. Such a network ends training away from any minimum: its Hessian has negative
eigenvalues. `InfluenceCallback(self_influence=True)` with every numerical option at its default ("auto") then
ranks the training images; the script counts the flipped labels among the top 10% by self-influence, by training
loss, and at random, and prints the choices "auto" made (saved in the result's metadata under "choices").

    python benchmarks/mislabeled_cnn.py [--epochs 30] [--threads 2] [--root runs/mislabeled_cnn]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "examples"))
from mislabeled_digits import noisy_digits  # noqa: E402

from lightning_influence import InfluenceCallback  # noqa: E402


class DigitCNN(pl.LightningModule):
    """Two 3×3 convolutions with BatchNorm and ReLU, a 2×2 max-pool and a linear classifier."""

    def __init__(self, lr: float = 3e-3) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(32 * 4 * 4, 10),
        )
        self.loss_fn = F.cross_entropy
        self.lr = lr

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        return self.loss_fn(self(x), y)

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x, y = batch
        self.log("val_accuracy", (self(x).argmax(1) == y).float().mean())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.lr)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--root", default="runs/mislabeled_cnn", help="where logs and influence files go")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    pl.seed_everything(args.seed, verbose=False)
    train_set, val_set, flipped = noisy_digits(args.seed)
    callback = InfluenceCallback(self_influence=True, num_queries=8)  # method, curvature and λ: "auto"
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, max_epochs=args.epochs, default_root_dir=args.root, logger=False,
        callbacks=[callback], enable_checkpointing=False, enable_model_summary=False, enable_progress_bar=False,
    )
    module = DigitCNN()
    trainer.fit(module, DataLoader(train_set, batch_size=64, shuffle=True), DataLoader(val_set, batch_size=256))
    result = callback.result
    assert result is not None

    n, k = len(train_set), len(train_set) // 10
    x_train, y_train = train_set.tensors
    with torch.no_grad():
        losses = F.cross_entropy(module.eval()(x_train), y_train, reduction="none")
    is_flipped = torch.zeros(n, dtype=torch.bool)
    is_flipped[flipped] = True
    found = {
        "self-influence (callback defaults)": int(is_flipped[result.top_self_influence(k).indices].sum()),
        "training loss": int(is_flipped[losses.topk(k).indices].sum()),
        "random": int(is_flipped[torch.randperm(n, generator=torch.Generator().manual_seed(1))[:k]].sum()),
    }
    timings = result.metadata["timings"]
    print(f"validation accuracy {float(trainer.callback_metrics['val_accuracy']):.3f}; p = "
          f"{sum(p.numel() for p in module.parameters()):,}; {len(flipped)} of {n} labels flipped; "
          f"{torch.get_num_threads()} threads\n")
    print(f"| top 10% ({k} of {n}) ranked by | flipped labels found (of {len(flipped)}) |")
    print("| --- | ---: |")
    for name, count in found.items():
        print(f"| {name} | {count} |")
    print(f"\nchoices made by 'auto': {json.dumps(result.metadata['choices'], indent=2, ensure_ascii=False)}")
    convergence = {key: result.metadata["convergence"].get(key) for key in ("iterations", "max_relative_residual")}
    print(f"convergence of the factors: {convergence}")
    print(f"influence {timings['total_seconds']:.1f} s (self-influence {timings.get('self_influence_seconds', 0):.1f}"
          f" s, {1000 * timings.get('self_influence_seconds', 0) / n:.1f} ms per example); whole run "
          f"{time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
