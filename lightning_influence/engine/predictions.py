"""What the trained model says about each example: its per-example loss and, for classifiers, its predicted class.

Reports show these beside the influence scores, so that a reader sees at once which training labels the model
disagrees with (suspect labels) and how badly a query was predicted.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.func import vmap
from torch.utils._pytree import tree_map

from lightning_influence.errors import is_out_of_memory
from lightning_influence.model.twice_differentiable import TwiceDifferentiable


def example_row(batch: Any, row: int) -> Any:
    """Example `row` of a batch (every tensor leaf indexed along its first dimension)."""
    return tree_map(lambda t: t[row] if isinstance(t, Tensor) else t, batch)


def _one(value: Any) -> Any:
    """A single example as a batch of one (tensor leaves gain a leading dimension)."""
    return tree_map(lambda t: t.unsqueeze(0) if isinstance(t, Tensor) else t, value)


def example_losses(model: TwiceDifferentiable, outputs: Any, targets: Tensor) -> Tensor:
    """ℓ(zᵢ) for each example of a batch: the model's loss on a batch of one, as the influence conventions define
    it. Vectorised with `vmap`; a loss that `vmap` cannot trace (e.g. one calling `.item()`) is looped instead."""
    def one(output: Any, target: Tensor) -> Tensor:
        return model.loss_fn(_one(output), target.unsqueeze(0))

    try:
        return vmap(one)(outputs, targets)
    except RuntimeError as error:
        if is_out_of_memory(error):
            raise
    return torch.stack([one(example_row(outputs, r), targets[r]) for r in range(targets.shape[0])])


def predicted_classes(outputs: Any, targets: Tensor) -> Tensor | None:
    """The arg-max class of [B, C] scores when the targets are class indices [B]; None for other tasks."""
    if not isinstance(outputs, Tensor) or outputs.ndim != 2 or outputs.shape[1] < 2:
        return None
    if targets.ndim != 1 or targets.is_floating_point() or targets.is_complex():
        return None
    return outputs.argmax(dim=1)


def losses_and_predictions(model: TwiceDifferentiable, inputs: Any, targets: Tensor) -> tuple[Tensor, Tensor | None]:
    """Per-example losses [B] and predicted classes [B] (None unless a classifier) of one batch, on the model's
    device, without gradients. Call inside `model.evaluating()` so dropout and BatchNorm behave as at test time."""
    with torch.no_grad():
        outputs = model.module(inputs)
        return example_losses(model, outputs, targets).detach(), predicted_classes(outputs, targets)
