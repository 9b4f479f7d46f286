"""Find mislabelled training images with self-influence (Koh & Liang 2017, section 5.4), in a Lightning run.

Trains a small network on scikit-learn's 8×8 digits with 10% of the training labels flipped to a wrong class.
`InfluenceCallback(self_influence=True)` computes, when fitting ends, the influence of every training image on
a few validation images and the self-influence of every training image, writes a TensorBoard report and saves
the tensors. The script then checks the top 10% of training images by self-influence for flipped labels and
compares with the top 10% by training loss and with random picks. It saves the trained weights as a checkpoint and
reuses the saved result on them, as the README shows.

    python examples/mislabeled_digits.py            # then: tensorboard --logdir runs/mislabeled_digits
                                                    # and open the INFLUENCE tab
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_influence import InfluenceCallback, InfluenceResult, TwiceDifferentiable
from lightning_influence.reports import ExampleStore

FLIP_FRACTION = 0.10
WEIGHT_DECAY = 1e-3


class DigitNet(pl.LightningModule):
    """An MLP on 1×8×8 images: 64 → 32 (tanh) → 10. `loss_fn` is what the callback differentiates."""

    def __init__(self, lr: float = 1e-2) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.features = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.Tanh())
        self.classifier = nn.Linear(32, 10)
        self.loss_fn = F.cross_entropy
        self.lr = lr

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x))

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        loss = self.loss_fn(self(x), y)
        self.log("train_loss", loss, on_epoch=True, on_step=False)
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x, y = batch
        logits = self(x)
        self.log("val_loss", self.loss_fn(logits, y))
        self.log("val_accuracy", (logits.argmax(1) == y).float().mean())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.lr, weight_decay=WEIGHT_DECAY)


def noisy_digits(seed: int = 0) -> tuple[TensorDataset, TensorDataset, Tensor]:
    """Train/validation datasets of 1×8×8 images in [0, 1]; 10% of training labels flipped to another class.
    Returns the datasets and the dataset indices of the flipped training examples."""
    digits = load_digits()
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(digits.target), generator=generator)
    x = torch.tensor(digits.images, dtype=torch.float32)[order].unsqueeze(1) / 16.0
    y = torch.tensor(digits.target)[order]
    x_train, y_train, x_val, y_val = x[:1300], y[:1300].clone(), x[1300:], y[1300:]
    flipped = torch.randperm(len(y_train), generator=generator)[: int(FLIP_FRACTION * len(y_train))]
    shift = torch.randint(1, 10, (len(flipped),), generator=generator)
    y_train[flipped] = (y_train[flipped] + shift) % 10  # always a different class
    return TensorDataset(x_train, y_train), TensorDataset(x_val, y_val), flipped.sort().values


def reuse(checkpoint: Path, folder: Path, train_set: TensorDataset) -> str:
    """The README's reuse snippet: load the weights and the saved result, score training examples again from the
    saved factors, and compare with the saved scores."""
    module = DigitNet.load_from_checkpoint(checkpoint, weights_only=True)
    later = InfluenceResult.load(folder)
    model = TwiceDifferentiable(module, module.loss_fn, params=later.metadata["parameter_names"])
    new_scores = later.score(model, DataLoader(torch.utils.data.Subset(train_set, range(16)), batch_size=16))
    difference = (new_scores - later.scores[:, :16]).abs().max() / later.scores[:, :16].abs().max()
    return f"scored 16 training examples from the saved factors, relative difference {difference:.1e}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--root", default="runs/mislabeled_digits", help="where logs and influence files go")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    started = time.perf_counter()
    pl.seed_everything(args.seed, verbose=False)
    train_set, val_set, flipped = noisy_digits(args.seed)

    callback = InfluenceCallback(
        method="direct",  # exact: the classifier layer has 330 parameters
        params="classifier.*",  # influence through the last layer, as in Koh & Liang's §5.4 experiments
        hessian_regularization=WEIGHT_DECAY,  # the weight decay the loss leaves out
        self_influence=True,
        num_queries=8,
        top_k=5,
        batch_size=256,
    )
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, max_epochs=args.epochs, default_root_dir=args.root,
        logger=pl.loggers.TensorBoardLogger(args.root, name=""), callbacks=[callback],
        enable_checkpointing=False, enable_model_summary=False, enable_progress_bar=False, log_every_n_steps=5,
    )
    module = DigitNet()
    trainer.fit(module, DataLoader(train_set, batch_size=64, shuffle=True), DataLoader(val_set, batch_size=256))
    result: InfluenceResult = callback.result
    assert result is not None

    n = len(train_set)
    k = n // 10
    x_train, y_train = train_set.tensors
    with torch.no_grad():
        losses = F.cross_entropy(module.eval()(x_train), y_train, reduction="none")
    is_flipped = torch.zeros(n, dtype=torch.bool)
    is_flipped[flipped] = True
    by_self = int(is_flipped[result.top_self_influence(k).indices].sum())
    by_loss = int(is_flipped[losses.topk(k).indices].sum())
    by_random = int(is_flipped[torch.randperm(n, generator=torch.Generator().manual_seed(1))[:k]].sum())
    expected_random = k * len(flipped) / n

    accuracy = trainer.callback_metrics.get("val_accuracy", torch.tensor(float("nan")))
    print(f"validation accuracy {float(accuracy):.3f} (trained on labels with {len(flipped)} of {n} flipped)")
    print(f"flipped labels among the top {k} training images (10%), of {len(flipped)} flipped in all:")
    print(f"  by self-influence  {by_self:4d}  ({by_self / len(flipped):.0%} found)")
    print(f"  by training loss   {by_loss:4d}  ({by_loss / len(flipped):.0%} found)")
    print(f"  at random          {by_random:4d}  (expected {expected_random:.1f})")
    folder = Path(trainer.log_dir) / "influence"
    suspects = torch.from_numpy(ExampleStore(folder / "report" / "examples").train.suspects.copy())
    print(f"the report marks {int(suspects.sum())} training labels as suspect (the model predicts another class); "
          f"{int((suspects & is_flipped).sum())} of them were flipped")
    checkpoint = Path(trainer.log_dir) / "checkpoints" / "final.ckpt"
    trainer.save_checkpoint(checkpoint)  # the weights the result belongs to, for `InfluenceResult.score` later
    print(f"influence: {result.metadata['timings']['total_seconds']:.1f} s; tensors in {folder / 'result'}, "
          f"report in {folder / 'report'}, weights in {checkpoint}; total {time.perf_counter() - started:.0f} s")
    print(f"reuse: {reuse(checkpoint, folder, train_set)}")
    print(f"view it: tensorboard --logdir {args.root}, then open the INFLUENCE tab (also TEXT: tables, IMAGES: "
          "grids, HISTOGRAMS: scores)")


if __name__ == "__main__":
    main()
