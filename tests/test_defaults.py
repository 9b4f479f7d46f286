"""The "auto" choices (the callback's defaults) on small models whose spectra are known, and curvature_samples."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Subset, TensorDataset

from helpers import ExactReference, classification_data, fitted, loader, mlp_model, reference_ggn
from lightning_influence import (
    IndexedData,
    InfluenceArguments,
    TwiceDifferentiable,
    compute_influence,
    compute_influence_factors,
    fit_solver,
)
from lightning_influence.engine.defaults import DIRECT_BYTES_PER_ENTRY, choose_method
from lightning_influence.model.data import sample_positions


def regression_data(n=50, features=4, seed=0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, features, generator=generator, dtype=torch.float64)
    return x, x @ torch.randn(features, 2, generator=generator, dtype=torch.float64)


def test_curvature_auto_keeps_a_positive_definite_hessian_with_lambda_from_its_trace():
    """Least squares: H = 2/K · Xᵀ X ⊗ I is positive semi-definite, so "auto" keeps the Hessian, and λ is a tenth
    of its mean eigenvalue (exact here: p = 10 ≤ 32 probes)."""
    x, y = regression_data()
    model = TwiceDifferentiable(nn.Linear(4, 2).double(), F.mse_loss)
    solver = fit_solver(model, loader(x, y), "direct", hessian_regularization="auto", curvature="auto")
    choices = solver.fit_info["choices"]
    theta = torch.cat([p.detach().reshape(-1) for p in model.module.parameters()])
    hessian = torch.func.hessian(lambda t: F.mse_loss(x @ t[:8].view(2, 4).T + t[8:], y))(theta)
    exact = torch.linalg.eigvalsh(hessian)
    assert choices["curvature"] == "hessian" and "positive definite" in choices["curvature_reason"]
    assert choices["hessian_regularization"] == pytest.approx(0.1 * float(exact.mean()), rel=1e-6)
    assert choices["hessian_smallest_eigenvalue_estimate"] >= float(exact[0]) - 1e-9
    assert choices["hessian_largest_eigenvalue_estimate"] == pytest.approx(float(exact[-1]), rel=1e-6)
    assert choices["method"] == "direct" and choices["method_reason"] == "given"


def test_curvature_auto_takes_the_gauss_newton_matrix_where_the_hessian_is_indefinite():
    x, y = classification_data(60)
    module = mlp_model()  # at initialisation: H has eigenvalues far below −λ
    smallest = float(torch.linalg.eigvalsh(ExactReference(module, x, y, 0.0).hessian)[0])
    model = TwiceDifferentiable(module, F.cross_entropy)
    solver = fit_solver(model, loader(x, y), "direct", hessian_regularization="auto", curvature="auto")
    choices = solver.fit_info["choices"]
    assert choices["curvature"] == "ggn" and solver.operator.curvature == "ggn"
    assert smallest <= choices["hessian_smallest_eigenvalue_estimate"] < -choices["hessian_regularization"] / 2
    ggn = reference_ggn(module, x, y)
    # p = 75 > 32 probes: trace(G) by Hutchinson's estimate
    assert choices["hessian_regularization"] == pytest.approx(0.1 * float(torch.diagonal(ggn).mean()), rel=0.1)
    assert "Gauss" in choices["curvature_reason"] and solver.fit_info["factorization"] == "cholesky"


def test_method_auto_by_memory_budget_and_layer_support():
    linear = TwiceDifferentiable(mlp_model(), F.cross_entropy)
    p = linear.num_params
    auto = InfluenceArguments(method="auto")
    assert choose_method(linear, auto)[0].value == "direct"
    tight = InfluenceArguments(method="auto", max_memory=DIRECT_BYTES_PER_ENTRY * p * p - 1)
    method, options, reason = choose_method(linear, tight)
    assert method.value == "ekfac" and options == {} and "nn.Linear" in reason
    normed = TwiceDifferentiable(nn.Sequential(nn.Linear(5, 8), nn.LayerNorm(8), nn.Linear(8, 3)).double(),
                                 F.cross_entropy)
    method, options, reason = choose_method(normed, tight)
    assert method.value == "cg" and options == {"preconditioner": "nystroem", "rtol": 1e-4} and "outside" in reason
    assert choose_method(linear, InfluenceArguments(method="arnoldi"))[2] == "given"
    with pytest.raises(ValueError, match="method='auto' chooses the method and its options"):
        InfluenceArguments(method="auto", method_kwargs={"rank": 3})


def test_the_choices_are_saved_in_the_metadata(tmp_path):
    x, y = classification_data(40)
    data = IndexedData(TensorDataset(x, y))
    arguments = InfluenceArguments(method="auto", curvature="auto", hessian_regularization="auto")
    result = compute_influence(TwiceDifferentiable(mlp_model(), F.cross_entropy), data, data, arguments,
                               save_dir=tmp_path, query_indices=[0, 1])
    choices = result.metadata["choices"]
    assert {"method", "method_reason", "curvature", "curvature_reason", "hessian_regularization",
            "regularization_reason"} <= set(choices)
    assert result.metadata["method"] == "auto" and choices["method"] == "direct"
    assert "choices" not in result.metadata["convergence"]


@pytest.fixture(scope="module")
def trained():
    x, y = classification_data(70)
    return fitted(mlp_model(), x, y), x, y


def test_curvature_samples_equal_to_n_is_the_full_fit_exactly(trained, tmp_path):
    module, x, y = trained
    model = TwiceDifferentiable(module, F.cross_entropy)
    data = IndexedData(TensorDataset(x, y))
    runs = {}
    for k in (None, len(x), 10 * len(x)):
        arguments = InfluenceArguments(method="direct", hessian_regularization=0.05, curvature_samples=k,
                                       curvature_seed=3, self_influence=True, batch_size=16)
        runs[k] = compute_influence(model, data, data, arguments, save_dir=tmp_path / str(k), query_indices=[0, 5])
        assert runs[k].metadata["num_curvature_examples"] == len(x)
    for k in (len(x), 10 * len(x)):
        assert torch.equal(runs[k].scores, runs[None].scores)
        assert torch.equal(runs[k].self_influence, runs[None].self_influence)
    functional = [compute_influence_factors(model, loader(x, y), loader(x[:3], y[:3]), "direct",
                                            hessian_perturbation=0.05, curvature_samples=k).x for k in (None, len(x))]
    assert torch.equal(functional[0], functional[1])


def test_curvature_samples_fit_on_the_drawn_examples_and_score_all(trained, tmp_path):
    module, x, y = trained
    model = TwiceDifferentiable(module, F.cross_entropy)
    k, seed = 25, 7
    drawn = sample_positions(len(x), k, seed)
    assert len(set(drawn)) == k and drawn == sorted(drawn) and drawn != list(range(k))
    expected = ExactReference(module, x[drawn], y[drawn], 0.01).up(x[:2], y[:2], x, y)
    arguments = InfluenceArguments(method="direct", hessian_regularization=0.01, curvature_samples=k,
                                   curvature_seed=seed)
    data = IndexedData(TensorDataset(x, y))
    result = compute_influence(model, data, data, arguments, save_dir=tmp_path, query_indices=[0, 1])
    torch.testing.assert_close(result.scores, expected, rtol=1e-7, atol=1e-9)
    assert result.scores.shape == (2, len(x))
    meta = result.metadata
    assert (meta["curvature_samples"], meta["curvature_seed"], meta["num_curvature_examples"]) == (k, seed, k)
    factors = compute_influence_factors(model, DataLoader(TensorDataset(x, y), batch_size=8), loader(x[:2], y[:2]),
                                        "direct", hessian_perturbation=0.01, curvature_samples=k, curvature_seed=seed)
    subset = compute_influence_factors(model, DataLoader(Subset(TensorDataset(x, y), drawn), batch_size=8),
                                       loader(x[:2], y[:2]), "direct", hessian_perturbation=0.01)
    torch.testing.assert_close(factors.x, subset.x, rtol=1e-10, atol=1e-12)


def test_bad_curvature_samples_are_refused(trained):
    module, x, y = trained
    for value in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="curvature_samples must be a positive integer"):
            InfluenceArguments(curvature_samples=value)
    with pytest.raises(ValueError, match="curvature_seed must be an integer ≥ 0"):
        InfluenceArguments(curvature_seed=-1)
    with pytest.raises(TypeError, match="curvature_samples needs training_data to be a DataLoader"):
        fit_solver(TwiceDifferentiable(module, F.cross_entropy), [(x, y)], "direct", curvature_samples=5)


def test_the_callback_defaults_are_auto_and_the_report_names_the_choices(tmp_path):
    from lit_helpers import Classifier, blobs, loaders, make_trainer

    from lightning_influence import InfluenceCallback

    callback = InfluenceCallback(num_queries=2, top_k=2, save_dir=tmp_path / "influence")
    assert {k: callback.arguments.to_dict()[k] for k in ("method", "curvature", "hessian_regularization")} == {
        "method": "auto", "curvature": "auto", "hessian_regularization": "auto"}
    x, y = blobs(40)
    make_trainer(tmp_path, logger=False, callbacks=[callback], epochs=1).fit(Classifier(), *loaders(x, y, *blobs(6, seed=1)))
    choices = callback.result.metadata["choices"]
    assert choices["method"] == "direct" and choices["curvature"] in ("hessian", "ggn")
    report = (tmp_path / "influence" / "report" / "influence.md").read_text()
    assert report.startswith("**Influence run**") and choices["curvature_reason"] in report  # the summary table
    assert f"{choices['hessian_regularization']:.4g}" in report
