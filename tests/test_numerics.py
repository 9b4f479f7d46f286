"""Numerical honesty: automatic damping, and warnings for indefinite, ill-conditioned or swamped curvature."""

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from helpers import ExactReference, classification_data, fitted, linear_model, loader, mlp_model
from lightning_influence import TwiceDifferentiable, compute_influence_factors, fit_solver
from lightning_influence.solvers.base import AUTO_DAMPING_FRACTION


@pytest.fixture(scope="module")
def trained():
    x, y = classification_data(60)
    module = fitted(linear_model(), x, y)
    return x, y, module, ExactReference(module, x, y, 0.0)


def test_auto_damping_is_a_fraction_of_the_mean_eigenvalue_and_recorded(trained):
    x, y, module, reference = trained
    model = TwiceDifferentiable(module, F.cross_entropy)  # p = 18 ≤ 32 probes: the trace is exact
    solver = fit_solver(model, loader(x, y), "direct", hessian_regularization="auto")
    expected = AUTO_DAMPING_FRACTION * float(torch.trace(reference.hessian)) / model.num_params
    assert solver.regularization == pytest.approx(expected, rel=1e-10)
    assert solver.fit_info["regularization_source"].startswith("auto")
    result = solver.solve(reference.grads(x[:2], y[:2]))
    assert result.info["regularization"] == pytest.approx(expected, rel=1e-10)


def test_unknown_regularization_string_is_refused(trained):
    x, y, module, _ = trained
    with pytest.raises(TypeError, match="must be a number ≥ 0 or 'auto'"):
        fit_solver(TwiceDifferentiable(module, F.cross_entropy), loader(x, y), "direct", hessian_regularization="big")


def test_damping_that_swamps_the_curvature_warns(trained):
    x, y, module, _ = trained
    with pytest.warns(RuntimeWarning, match="damping swamps the curvature"):
        fit_solver(TwiceDifferentiable(module, F.cross_entropy), loader(x, y), "direct", hessian_regularization=1e3)


def test_ill_conditioned_hessian_warns_with_a_suggestion():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(200, 3, generator=generator) * torch.tensor([1e3, 1.0, 1e-3])  # feature scales 1e6 apart
    y = torch.randn(200, 1, generator=generator)
    module = nn.Linear(3, 1)
    model = TwiceDifferentiable(module, F.mse_loss)  # float32: the limit is 1e-2 / eps ≈ 8e4
    with pytest.warns(RuntimeWarning, match=r"ill-conditioned for torch.float32 \(condition number") as caught:
        solver = fit_solver(model, loader(x, y), "direct")
    assert solver.fit_info["condition_number"] > 1e10
    suggestion = solver.fit_info["suggested_regularization"]
    assert f"{suggestion:.3g}" in str(caught[0].message)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fit_solver(model, loader(x, y), "direct", hessian_regularization=suggestion)


def test_arnoldi_reports_negative_curvature_in_its_subspace():
    x, y = classification_data(60)
    module = mlp_model()  # untrained: negative eigenvalues of large magnitude
    model = TwiceDifferentiable(module, F.cross_entropy)
    with pytest.warns(RuntimeWarning, match="not positive definite"):
        solver = fit_solver(model, loader(x, y), "arnoldi", rank=model.num_params)
    assert solver.fit_info["min_eigenvalue"] < 0
    assert solver.fit_info["suggested_regularization"] > -solver.fit_info["min_eigenvalue"]


def test_well_posed_problems_warn_about_nothing(trained):
    x, y, module, _ = trained
    model = TwiceDifferentiable(module, F.cross_entropy)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for method in ("direct", "cg", "arnoldi"):
            result = compute_influence_factors(model, loader(x, y), loader(x[:3], y[:3]), method,
                                               hessian_perturbation=1e-2)
            assert torch.isfinite(result.x).all()
