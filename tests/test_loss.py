"""The loss: refused when it sums over the batch, recorded with a result, and another one refused by `score()` and
by a resumed run."""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F
from helpers import classification_data, linear_model, loader
from torch import nn
from torch.utils.data import TensorDataset

from lightning_influence import (
    IndexedData,
    InfluenceArguments,
    InfluenceResult,
    ResultMismatchError,
    TwiceDifferentiable,
    compute_influence,
    fit_solver,
)
from lightning_influence.model.loss import loss_identity


class DictOutput(nn.Module):
    """A linear model returning {"scores": ...}: its loss is taken on the whole batch, as the batch mean."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = linear_model()

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"scores": self.layer(x)}


def test_a_summed_loss_is_refused_where_it_is_taken_as_the_batch_mean_and_a_mean_loss_is_not():
    x, y = classification_data(16)
    summed_sum = functools.partial(F.cross_entropy, reduction="sum")
    summed = TwiceDifferentiable(DictOutput(), lambda out, t: summed_sum(out["scores"], t))
    with pytest.raises(ValueError, match=r"loss_fn sums over the batch instead of averaging: on the first training "
                                         r"batch \(16 examples\) its value .* equals the sum of its two halves' "
                                         r"losses .* use reduction='mean'"):
        fit_solver(summed, loader(x, y), "direct", hessian_regularization=0.1)
    summed.check_mean_loss(x[:1], y[:1])  # one example: nothing to compare
    for mean_like in (F.cross_entropy, lambda o, t: F.cross_entropy(o, t) + 1.0):  # a constant added is no sum
        TwiceDifferentiable(linear_model(), mean_like).check_second_order(x, y)


def test_a_summed_loss_on_known_logits_gives_the_mean_loss_influence():
    """With the logits known every example's loss is taken on its own, so reduction='sum' cannot scale anything."""
    x, y = classification_data(16)
    solvers = [fit_solver(TwiceDifferentiable(linear_model(), loss), loader(x, y), "direct", hessian_regularization=0.1)
               for loss in (F.cross_entropy, functools.partial(F.cross_entropy, reduction="sum"))]
    rhs = torch.ones(2, solvers[0].operator.num_params, dtype=torch.float64)
    torch.testing.assert_close(solvers[1].solve(rhs).x, solvers[0].solve(rhs).x, rtol=1e-12, atol=1e-12)


def test_the_loss_is_named_by_import_path_or_by_a_hash_of_what_decides_it():
    assert loss_identity(F.cross_entropy) == "torch.nn.functional.cross_entropy"
    first = lambda o, t: F.cross_entropy(o, t)  # noqa: E731
    same = lambda o, t: F.cross_entropy(o, t)  # noqa: E731
    other = lambda o, t: F.cross_entropy(o, t, label_smoothing=0.1)  # noqa: E731
    assert "<lambda>#" in loss_identity(first) and loss_identity(first) == loss_identity(same) != loss_identity(other)
    assert loss_identity(nn.CrossEntropyLoss()) != loss_identity(nn.CrossEntropyLoss(label_smoothing=0.1))
    assert loss_identity(nn.CrossEntropyLoss()) == loss_identity(nn.CrossEntropyLoss())
    assert loss_identity(functools.partial(F.cross_entropy, label_smoothing=0.1)) != loss_identity(
        functools.partial(F.cross_entropy))


def test_score_and_a_rerun_refuse_another_loss(tmp_path):
    x, y = classification_data(30)
    module = linear_model()
    data = IndexedData(TensorDataset(x, y))
    arguments = InfluenceArguments(method="direct", hessian_regularization=0.1)
    mean = TwiceDifferentiable(module, F.cross_entropy)
    result = compute_influence(mean, data, data, arguments, save_dir=tmp_path, query_indices=[0, 1])
    assert result.metadata["loss"] == "torch.nn.functional.cross_entropy"
    smoothed = TwiceDifferentiable(module, lambda o, t: F.cross_entropy(o, t, label_smoothing=0.2))
    loaded = InfluenceResult.load(tmp_path)
    with pytest.raises(ValueError, match=r"The model's loss '\S+<lambda>#\w+' differs from the loss this result was "
                                         r"computed with \('torch.nn.functional.cross_entropy'\)"):
        loaded.score(smoothed, loader(x, y))
    torch.testing.assert_close(loaded.score(mean, loader(x, y)), result.scores)
    with pytest.raises(ResultMismatchError,
                       match=r"loss: stored 'torch.nn.functional.cross_entropy', now '\S+<lambda>#"):
        compute_influence(smoothed, data, data, arguments, save_dir=tmp_path, query_indices=[0, 1])
