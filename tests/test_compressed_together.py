"""Projection, query rank and the gradient store together: each composes with the others exactly as its
definition says (scores in the projected space; a rank-r cut of the projected factors; a store of projected
gradients rescoring to the run's scores), and a store refuses a model projected another way."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import classification_data, fitted, loader, mlp_model
from torch.utils.data import TensorDataset

from lightning_influence import (
    IndexedData,
    InfluenceArguments,
    InfluenceResult,
    TwiceDifferentiable,
    compute_influence,
    compute_influence_factors,
    compute_influences_up,
)
from lightning_influence.engine.low_rank import rank_structure, truncated_factors
from lightning_influence.engine.scoring import stacked_gradients

N_TRAIN, N_QUERIES = 30, 4
REGULARIZATION = 0.1


@pytest.fixture(scope="module")
def problem():
    x, y = classification_data(N_TRAIN)
    xq, yq = classification_data(N_QUERIES, seed=1)
    module = fitted(mlp_model(hidden=12), x, y)
    return module, (x, y), (xq, yq)


def _projected(module, seed: int = 0) -> TwiceDifferentiable:
    # layers [12, 6] and [3, 13]: 20 numbers per layer is a real compression of both
    return TwiceDifferentiable(module, F.cross_entropy, projection_dim=20, projection_seed=seed)


def test_query_rank_cuts_the_projected_factors(problem):
    module, (x, y), (xq, yq) = problem
    model = _projected(module)
    factors = compute_influence_factors(model, loader(x, y), loader(xq, yq), "direct",
                                        hessian_perturbation=REGULARIZATION).x
    ranked = compute_influences_up(model, loader(x, y), factors, query_rank=1)
    cut = truncated_factors(rank_structure(model), factors, 1)
    with model.evaluating():
        expected = cut @ stacked_gradients(model, loader(x, y), name="training").T
    torch.testing.assert_close(ranked, expected, rtol=1e-10, atol=1e-12)
    full = compute_influences_up(model, loader(x, y), factors)
    assert not torch.allclose(ranked, full)  # rank 1 is a real cut of the projected [k_o, k_i] blocks


def _run(model, problem, folder, **options) -> InfluenceResult:
    (x, y), (xq, yq) = problem[1], problem[2]
    arguments = InfluenceArguments(method="direct", hessian_regularization=REGULARIZATION, batch_size=8,
                                   store_gradients=True, store_dtype="float64", **options)
    return compute_influence(model, IndexedData(TensorDataset(x, y)), IndexedData(TensorDataset(xq, yq)),
                             arguments, save_dir=folder)


@pytest.mark.parametrize("query_rank", [None, 1])
def test_a_store_of_projected_gradients_rescores_to_the_run_scores(problem, tmp_path, query_rank):
    module, _, (xq, yq) = problem
    result = _run(_projected(module), problem, tmp_path, query_rank=query_rank)
    assert result.metadata["gradient_dim"] == _projected(module).gradient_dim < _projected(module).num_params
    rescored = InfluenceResult.load(tmp_path).score_queries(_projected(module), loader(xq, yq, batch_size=3))
    torch.testing.assert_close(rescored.scores, result.scores, rtol=1e-10, atol=1e-12)


def test_the_report_summary_names_the_query_rank_and_the_store(problem, tmp_path):
    from lightning_influence.reports.write import write_reports

    result = _run(_projected(problem[0]), problem, tmp_path, query_rank=1)
    (x, y), (xq, yq) = problem[1], problem[2]
    write_reports(result, train_data=IndexedData(TensorDataset(x, y)), query_data=IndexedData(TensorDataset(xq, yq)),
                  top_k=3, folder=tmp_path / "report", loggers=[], step=0, model=_projected(problem[0]))
    summary = (tmp_path / "report" / "influence.md").read_text()
    assert "| query rank | 1 per layer block of every factor |" in summary
    assert f"| gradient store | float64 [{N_TRAIN}, {result.metadata['gradient_dim']}]: new queries" in summary


def test_a_store_refuses_a_model_projected_another_way(problem, tmp_path):
    module, _, (xq, yq) = problem
    _run(_projected(module), problem, tmp_path)
    loaded = InfluenceResult.load(tmp_path)
    for other in (_projected(module, seed=1), TwiceDifferentiable(module, F.cross_entropy)):
        with pytest.raises(ValueError, match="projection"):
            loaded.score_queries(other, loader(xq, yq))
