"""Influence scores as a bilinear form, streamed over the training data one batch at a time.

Memory stays bounded by the model's compute budget plus M × p: per-example gradients of one compute batch
(`model.compute_rows` examples, whatever the loader's batch size) are formed, contracted with the factors, and
dropped before the next batch is read.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import Tensor

from lightning_influence.model.data import batch_size, iterate_batches, rebatched, row_slices, slice_batch
from lightning_influence.model.twice_differentiable import TwiceDifferentiable, check_finite


def compute_batches(
    model: TwiceDifferentiable, data: Iterable[Any], *, name: str, progress: bool = False
) -> Iterator[tuple[int, int, Any, Tensor]]:
    """The examples of `data` in loader order as compute batches (index, first row, inputs, targets): the index
    of the loader batch (or `BatchSpan` of them) a compute batch comes from and its first row there.

    Loader batches are joined into compute batches of `model.compute_rows` examples (and a larger loader batch
    is cut to that size), so the number of vectorised calls depends on the memory budget, not on the loader's
    batch size.
    """
    batches = _first_checked(model, iterate_batches(data, model.device, model.dtype, name=name, progress=progress))
    for index, inputs, targets in rebatched(batches, model.compute_rows):
        rows = model.compute_rows(inputs, targets)
        for start, stop in row_slices(batch_size(inputs), rows):
            yield index, start, *slice_batch(inputs, targets, start, stop)


def gradients(
    model: TwiceDifferentiable, data: Iterable[Any], *, name: str, progress: bool = False
) -> Iterator[tuple[int, Tensor]]:
    """Per-example gradients ∇θ ℓ(zᵢ, θ), [B, p] blocks in loader order (`compute_batches`), checked finite, with
    the index of the loader batch each block starts in."""
    for index, start, inputs, targets in compute_batches(model, data, name=name, progress=progress):
        block = model.example_gradients(inputs, targets)
        yield index, check_finite(block, f"per-example gradients of {name}", index, first_row=start)


def _first_checked(model: TwiceDifferentiable, batches: Iterator[tuple[int, Any, Tensor]]
                   ) -> Iterator[tuple[int, Any, Tensor]]:
    """`batches` as they come, the first loader batch checked with `model.batch_loss`: a clear error for data that
    does not fit the model or the loss, and for a non-scalar loss, before any vectorised call."""
    for index, inputs, targets in batches:
        if index == 0:
            model.batch_loss(inputs, targets)
        yield index, inputs, targets


def stacked_gradients(model: TwiceDifferentiable, data: Iterable[Any], *, name: str, progress: bool = False) -> Tensor:
    """All per-example gradients of a (query-sized) data set, [M, p]."""
    return torch.cat([block for _, block in gradients(model, data, name=name, progress=progress)])


def gradient_blocks(model: TwiceDifferentiable, data: Iterable[Any], *, name: str, progress: bool = False
                    ) -> Iterator[Tensor]:
    """The per-example gradient blocks of `gradients`, without their batch index."""
    return (block for _, block in gradients(model, data, name=name, progress=progress))


def up_scores(model: TwiceDifferentiable, data: Iterable[Any], factors: Tensor, *, progress: bool = False) -> Tensor:
    """I_up = factors · ∇θ ℓ(zᵢ)ᵀ for every example of `data`, [M, N] in loader order, formed batch by batch."""
    with model.evaluating():
        blocks = [factors @ block.T for block in gradient_blocks(model, data, name="input_data", progress=progress)]
    return torch.cat(blocks, dim=1)


def perturbation_scores(model: TwiceDifferentiable, data: Iterable[Any], factors: Tensor, *, progress: bool = False
                        ) -> Tensor:
    """I_pert = ∇ₓ ⟨s, ∇θ ℓ(zᵢ)⟩ for every example of `data`, [M, N, *x_shape]; under the model's `max_memory`
    each block holds as many examples as fit (at least one)."""
    blocks = []
    with model.evaluating():
        batches = iterate_batches(data, model.device, model.dtype, name="input_data", progress=progress)
        for index, inputs, targets in batches:
            if index == 0:
                model.batch_loss(inputs, targets)  # checked once: the check costs a forward pass
            rows = None
            if model.max_memory is not None and isinstance(inputs, Tensor):
                rows = model.max_memory // (factors.shape[0] * inputs[0].numel() * inputs.element_size())
            for start, stop in row_slices(batch_size(inputs), rows):
                piece_inputs, piece_targets = slice_batch(inputs, targets, start, stop)
                block = model.mixed_grad(piece_inputs, piece_targets, factors)
                blocks.append(check_finite(block, "perturbation influence", index))
    return torch.cat(blocks, dim=1)


def regrouped(blocks: Iterable[Tensor], rows: int | None) -> Iterator[Tensor]:
    """The rows of `blocks` [bᵢ, p] in blocks of `rows` (the last may be shorter); as they come when None."""
    if rows is None:
        yield from blocks
        return
    pending: list[Tensor] = []
    count = 0
    for block in blocks:
        pending.append(block)
        count += block.shape[0]
        while count >= rows:
            joined = torch.cat(pending)
            yield joined[:rows]
            pending, count = [joined[rows:]], count - rows
    if count:
        yield torch.cat(pending)


def self_influences(model: TwiceDifferentiable, data: Iterable[Any], quadratic_forms: Callable[[Tensor], Tensor],
                    *, rows: int | None = None, progress: bool = False) -> Tensor:
    """⟨(H + λI)⁻¹ ∇θ ℓ(zᵢ), ∇θ ℓ(zᵢ)⟩ of every example of `data`, [N]; `quadratic_forms` maps a block of
    gradients [B, p] to those values. The gradients go to it in blocks of `rows` examples (None: batch by batch),
    so that an iterative solver shares each pass over the training data among many of them."""
    with model.evaluating():
        blocks = gradient_blocks(model, data, name="training_data", progress=progress)
        return torch.cat([quadratic_forms(block) for block in regrouped(blocks, rows)])
