"""`max_memory`: per-example gradients and score chunks sized to a byte budget, with unchanged results."""

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

from helpers import classification_data, fitted, loader, mlp_model
from lightning_influence import (
    InfluenceCallback,
    TwiceDifferentiable,
    compute_influence_factors,
    compute_influences_pert,
    compute_influences_up,
    compute_self_influences,
    fit_solver,
)
from lightning_influence.checks import parse_memory
from lightning_influence import IndexedData, InfluenceArguments, compute_influence
from lightning_influence.engine.scoring import gradients

REGULARIZATION = 0.05


@pytest.mark.parametrize("value, expected", [
    (4096, 4096), ("512MB", 512 * 10**6), ("2GiB", 2 * 2**30), ("1.5 kb", 1500), ("300", 300), (None, None),
])
def test_memory_sizes_are_read_in_bytes(value, expected):
    assert parse_memory(value) == expected


@pytest.mark.parametrize("value, error", [
    ("lots", ValueError), ("12 parsecs", ValueError), ("-1MB", ValueError), (0, ValueError), (True, TypeError),
    (1.5e9, TypeError),
])
def test_malformed_memory_sizes_are_refused(value, error):
    with pytest.raises(error, match="max_memory"):
        parse_memory(value)


@pytest.fixture(scope="module")
def problem():
    x, y = classification_data(50)
    module = fitted(mlp_model(), x, y)
    x_test, y_test = classification_data(4, seed=1)
    return module, x, y, x_test, y_test


def budgeted(module, rows, inputs, targets):
    """The model with a budget of exactly `rows` examples' working memory for per-example gradients."""
    per_example = TwiceDifferentiable(module, F.cross_entropy).example_bytes(inputs, targets)
    return TwiceDifferentiable(module, F.cross_entropy, max_memory=rows * per_example)


def test_a_budget_too_small_for_one_gradient_is_refused_with_the_size_needed(problem):
    module = problem[0]
    with pytest.raises(ValueError, match=r"cannot hold one per-example gradient of 75 parameters \(1,200 bytes"):
        TwiceDifferentiable(module, F.cross_entropy, max_memory=1000)


def test_gradients_come_in_pieces_that_fit_and_scores_are_unchanged(problem):
    module, x, y, x_test, y_test = problem
    free = TwiceDifferentiable(module, F.cross_entropy)
    tight = budgeted(module, 3, x, y)
    assert tight.compute_rows(x, y) == 3
    with tight.evaluating():
        blocks = [block for _, block in gradients(tight, loader(x, y, batch_size=16), name="train")]
    assert max(len(b) for b in blocks) == 3 and sum(len(b) for b in blocks) == 50
    factors = compute_influence_factors(free, loader(x, y), loader(x_test, y_test), "direct",
                                        hessian_perturbation=REGULARIZATION)
    torch.testing.assert_close(compute_influences_up(tight, loader(x, y), factors),
                               compute_influences_up(free, loader(x, y), factors), rtol=1e-12, atol=1e-14)
    solver = fit_solver(free, loader(x, y), "direct", hessian_regularization=REGULARIZATION)
    torch.testing.assert_close(compute_self_influences(tight, loader(x, y), solver),
                               compute_self_influences(free, loader(x, y), solver), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(compute_influences_pert(tight, loader(x, y), factors),
                               compute_influences_pert(free, loader(x, y), factors), rtol=1e-12, atol=1e-14)


def test_the_pipeline_sizes_score_chunks_to_the_budget(problem, tmp_path):
    module, x, y, _, _ = problem
    data = IndexedData(TensorDataset(x, y))
    options = dict(method="direct", hessian_regularization=REGULARIZATION, batch_size=16)

    def run(folder: str, budget: int | None, **extra):
        model = TwiceDifferentiable(module, F.cross_entropy, max_memory=budget)
        arguments = InfluenceArguments(max_memory=budget, **options, **extra)
        return compute_influence(model, data, data, arguments, save_dir=tmp_path / folder, query_indices=[0, 1, 2, 3])

    free = run("free", None)
    assert free.metadata["chunk_size"] == 16 * 8 and free.metadata["max_memory"] is None
    # 4 queries × 8 bytes = 32 bytes of scores per training example: 2,400 bytes hold chunks of 75 examples.
    tight = run("tight", 2400)
    assert tight.metadata["chunk_size"] == 75 and tight.metadata["max_memory"] == 2400
    torch.testing.assert_close(tight.scores, free.scores, rtol=1e-12, atol=1e-14)
    # Perturbation adds [M, x_numel] values per example: 4 × (1 + 5) × 8 bytes = 192, so 12 examples per chunk.
    free = run("pfree", None, influence_type="perturbation")
    tight = run("ptight", 2400, influence_type="perturbation")
    assert tight.metadata["chunk_size"] == 12
    torch.testing.assert_close(tight.perturbation, free.perturbation, rtol=1e-12, atol=1e-14)


def test_the_callback_refuses_a_malformed_budget_before_training():
    with pytest.raises(ValueError, match="max_memory='a lot' is not a memory size"):
        InfluenceCallback(max_memory="a lot")
