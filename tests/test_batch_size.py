"""The loader's batch size decides neither the numbers nor the number of vectorised calls; the direct method's
spectrum report estimates the ends of a large spectrum by Lanczos."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import classification_data, fitted, loader, mlp_model

from lightning_influence import NonFiniteError, TwiceDifferentiable, compute_influences, compute_influences_up
from lightning_influence.curvature.operator import CurvatureOperator
from lightning_influence.model.data import BatchSpan, iterate_batches, rebatched
from lightning_influence.solvers.direct import EXACT_SPECTRUM_SIZE, _spectrum


@pytest.fixture(scope="module")
def trained():
    x, y = classification_data(90)
    return fitted(mlp_model(), x, y, steps=50), x, y


def _counting(model: TwiceDifferentiable, name: str) -> list[int]:
    """Record the number of examples of every call to `model.<name>`."""
    calls: list[int] = []
    original = getattr(model, name)

    def counted(inputs, *args, **kwargs):
        calls.append(len(inputs))
        return original(inputs, *args, **kwargs)

    setattr(model, name, counted)
    return calls


@pytest.mark.parametrize("method", ["direct", "cg"])
def test_scores_do_not_depend_on_the_loader_batch_size(trained, method):
    module, x, y = trained
    model = TwiceDifferentiable(module, F.cross_entropy)
    scores = [compute_influences(model, loader(x, y, batch_size=size), test_data=loader(x[:5], y[:5]),
                                 inversion_method=method, hessian_regularization=0.1, **({"rtol": 1e-12} if method
                                                                                         == "cg" else {}))
              for size in (4, 90)]
    torch.testing.assert_close(scores[0], scores[1], rtol=1e-9, atol=1e-12)


def test_a_pass_makes_as_many_calls_at_batch_4_as_at_batch_90(trained):
    module, x, y = trained
    counts = {}
    for size in (4, 90):
        model = TwiceDifferentiable(module, F.cross_entropy)
        products, gradients = _counting(model, "batch_hvp"), _counting(model, "example_gradients")
        with model.evaluating():
            CurvatureOperator(model, loader(x, y, batch_size=size)).matmat(torch.ones(3, model.num_params,
                                                                                      dtype=torch.float64))
        compute_influences_up(model, loader(x, y, batch_size=size), torch.ones(2, model.num_params,
                                                                                dtype=torch.float64))
        counts[size] = (products, gradients)
    assert counts[4] == counts[90] == ([90], [90])  # one call over all 90 examples, however they were loaded


def test_a_budget_bounds_the_compute_batches_and_keeps_the_order(trained):
    module, x, y = trained
    model = TwiceDifferentiable(module, F.cross_entropy)
    rows = 10
    per_example = model.example_bytes(x, y)
    budgeted = TwiceDifferentiable(module, F.cross_entropy, max_memory=rows * per_example)
    batches = iterate_batches(loader(x, y, batch_size=4), budgeted.device, budgeted.dtype, name="data")
    joined = list(rebatched(batches, budgeted.compute_rows))
    assert [len(inputs) for _, inputs, _ in joined] == [8] * 10 + [10]  # whole loader batches, at most 10 rows
    assert torch.equal(torch.cat([inputs for _, inputs, _ in joined]), x)
    assert [int(span) for span, _, _ in joined] == list(range(0, 21, 2))


def test_a_non_finite_value_names_its_loader_batch_inside_a_compute_batch(trained):
    module, x, y = trained
    model = TwiceDifferentiable(module, F.cross_entropy)
    broken = x.clone()
    broken[37, 2] = math.nan  # loader batch 9 of size 4
    with pytest.raises(NonFiniteError, match="per-example gradients of input_data in batch 9"):
        compute_influences_up(model, loader(broken, y, batch_size=4), torch.ones(1, model.num_params,
                                                                                  dtype=torch.float64))
    span = BatchSpan(3, [4, 4, 2])
    assert (span.loader_batch(0), span.loader_batch(4), span.loader_batch(9)) == (3, 4, 5)
    assert f"batch {span}" == "batch 3"


def test_the_spectrum_of_a_large_block_is_estimated_at_both_ends():
    size = EXACT_SPECTRUM_SIZE + 200
    generator = torch.Generator().manual_seed(0)
    basis = torch.linalg.qr(torch.randn(size, size, generator=generator, dtype=torch.float64)).Q
    values = torch.cat([torch.tensor([-0.3, 5.0], dtype=torch.float64), torch.rand(size - 2, generator=generator,
                                                                                    dtype=torch.float64)])
    matrix = basis @ torch.diag(values) @ basis.T
    estimate = _spectrum(matrix)
    assert len(estimate) < size  # Ritz values, not the whole spectrum
    assert float(estimate.min()) == pytest.approx(-0.3, rel=1e-8)
    assert float(estimate.max()) == pytest.approx(5.0, rel=1e-8)


def test_batches_padded_to_other_lengths_are_not_joined():
    padded = [(torch.zeros(2, length), torch.zeros(2, dtype=torch.long)) for length in (3, 3, 5, 3)]
    joined = list(rebatched(iterate_batches(padded, torch.device("cpu"), torch.float64, name="data"),
                            lambda inputs, targets: 100))
    assert [tuple(inputs.shape) for _, inputs, _ in joined] == [(4, 3), (2, 5), (2, 3)]
    assert [int(span) for span, _, _ in joined] == [0, 2, 3]

