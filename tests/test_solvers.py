"""Every inversion method against the exact float64 reference (explicit Hessian, torch.linalg.solve)."""

import warnings

import pytest
import torch
import torch.nn.functional as F

from helpers import ExactReference, classification_data, fitted, linear_model, loader, mlp_model
from lightning_influence import (
    CurvatureOperator,
    InversionMethod,
    TwiceDifferentiable,
    compute_influence_factors,
    fit_solver,
    make_solver,
)

REGULARIZATION = 0.05


def relative_error(actual, expected):
    return float((actual - expected).norm() / expected.norm())


@pytest.fixture(scope="module", params=["linear", "mlp"])
def problem(request):
    x, y = classification_data(60)
    x_test, y_test = classification_data(5, seed=1)
    module = fitted(linear_model() if request.param == "linear" else mlp_model(), x, y)
    reference = ExactReference(module, x, y, REGULARIZATION)
    return {
        "model": TwiceDifferentiable(module, F.cross_entropy),
        "train": loader(x, y, batch_size=16),
        "test": loader(x_test, y_test, batch_size=3),
        "exact": reference.factors(x_test, y_test),
        "reference": reference,
        "rhs": reference.grads(x_test, y_test),
    }


def factors(problem, method, **options):
    return compute_influence_factors(
        problem["model"], problem["train"], problem["test"], method, hessian_perturbation=REGULARIZATION, **options
    )


def test_direct_is_exact(problem):
    result = factors(problem, "direct")
    assert result.x.shape == problem["exact"].shape
    assert relative_error(result.x, problem["exact"]) < 1e-8
    assert result.info["factorization"] == "cholesky"


@pytest.mark.parametrize("preconditioner", [None, "jacobi"])
def test_cg_reaches_its_tolerance(problem, preconditioner):
    rtol = 1e-8
    result = factors(problem, "cg", rtol=rtol, preconditioner=preconditioner)
    assert result.info["converged"]
    residual = problem["rhs"] - result.x @ problem["reference"].matrix
    assert float((residual.norm(dim=1) / problem["rhs"].norm(dim=1)).max()) <= 1.01 * rtol
    assert relative_error(result.x, problem["exact"]) < 1e-5


def test_cg_runs_all_right_hand_sides_in_one_block(problem):
    """The whole block shares one Hessian pass per iteration, so passes = iterations, not M × iterations."""
    result = factors(problem, "cg", rtol=1e-8)
    assert result.info["solve_hessian_passes"] == result.info["iterations"]


def test_cg_reports_non_convergence(problem):
    with pytest.warns(RuntimeWarning, match="cg did not reach its tolerance"):
        result = factors(problem, "cg", rtol=1e-12, maxiter=2)
    assert result.info["converged"] is False
    assert result.info["iterations"] == 2


def test_arnoldi_is_exact_at_full_rank(problem):
    p = problem["model"].num_params
    result = factors(problem, "arnoldi", rank=p)
    assert relative_error(result.x, problem["exact"]) < 1e-8


def test_arnoldi_converges_as_rank_grows(problem):
    p = problem["model"].num_params
    errors = [relative_error(factors(problem, "arnoldi", rank=r, refine=0).x, problem["exact"]) for r in (2, p // 2, p)]
    assert errors[0] > errors[1] > errors[2]


def test_lissa_is_close_with_a_sufficient_budget(problem):
    x, y = problem["train"].dataset.tensors
    full_batch = loader(x, y, batch_size=len(x))  # deterministic steps: the series converges to the solution
    result = compute_influence_factors(
        problem["model"], full_batch, problem["test"], "lissa", hessian_perturbation=REGULARIZATION,
        maxiter=5000, rtol=1e-10,
    )
    assert result.info["converged"]
    assert relative_error(result.x, problem["exact"]) < 1e-6


def test_lissa_on_sampled_batches_is_close(problem):
    with pytest.warns(RuntimeWarning, match="lissa did not reach"):  # batch noise keeps it moving
        result = factors(problem, "lissa", maxiter=400, rtol=1e-12, check_every=50, acceleration=None)
    assert result.info["iterations"] == 400
    assert relative_error(result.x, problem["exact"]) < 0.3


def test_float32_model_matches_reference_to_single_precision():
    x, y = classification_data(60)
    x_test, y_test = classification_data(5, seed=1)
    module = fitted(mlp_model(), x, y)
    exact = ExactReference(module, x, y, REGULARIZATION).factors(x_test, y_test)
    module32 = module.float()
    model = TwiceDifferentiable(module32, F.cross_entropy)
    for method, options in [("direct", {}), ("cg", {"rtol": 1e-5}), ("arnoldi", {"rank": model.num_params})]:
        result = compute_influence_factors(
            model, loader(x.float(), y), loader(x_test.float(), y_test), method,
            hessian_perturbation=REGULARIZATION, **options,
        )
        assert result.x.dtype == torch.float32
        assert relative_error(result.x.double(), exact) < 1e-3, method


def test_indefinite_hessian_warns_and_solves_by_eigendecomposition():
    x, y = classification_data(60)
    x_test, y_test = classification_data(3, seed=1)
    module = mlp_model()  # untrained: the Hessian is indefinite
    model = TwiceDifferentiable(module, F.cross_entropy)
    reference = ExactReference(module, x, y, 0.0)
    assert float(torch.linalg.eigvalsh(reference.matrix)[0]) < 0
    with pytest.warns(RuntimeWarning) as caught:
        result = compute_influence_factors(model, loader(x, y), loader(x_test, y_test), "direct")
    messages = [str(w.message) for w in caught]
    assert any("not positive definite (smallest eigenvalue -" in m for m in messages), messages
    assert any("eigendecomposition pseudo-inverse" in m for m in messages), messages
    assert result.info["factorization"] == "eigh"
    assert result.info["suggested_regularization"] > -result.info["min_eigenvalue"]
    # Softmax logits shifted together leave the loss unchanged: H is singular there, and the pseudo-inverse
    # (not torch.linalg.solve, which returns noise in that direction) is the reference.
    pseudo_inverse = torch.linalg.pinv(reference.matrix, hermitian=True, rtol=1e-10)
    expected = reference.grads(x_test, y_test) @ pseudo_inverse
    assert relative_error(result.x, expected) < 1e-6


def test_solver_is_fitted_once_and_solves_many_blocks(problem):
    solver = fit_solver(problem["model"], problem["train"], "direct", hessian_regularization=REGULARIZATION)
    passes = solver.operator.passes
    first = solver.solve(problem["rhs"][:2]).x
    second = solver.solve(problem["rhs"][2]).x
    assert solver.operator.passes == passes
    assert relative_error(torch.cat([first, second[None]]), problem["exact"][:3]) < 1e-8


def test_jacobi_diagonal_is_exact_for_few_parameters(problem):
    operator = CurvatureOperator(problem["model"], problem["train"])
    p = problem["model"].num_params
    diagonal = operator.diagonal(num_probes=p)
    torch.testing.assert_close(diagonal, torch.diagonal(problem["reference"].hessian), atol=1e-12, rtol=1e-10)


def test_unknown_method_lists_the_valid_ones():
    with pytest.raises(ValueError, match=r"Unknown inversion method 'newton'; choose one of 'direct', 'cg'"):
        make_solver("newton")


def test_unknown_option_lists_the_accepted_ones():
    with pytest.raises(TypeError, match=r"Unknown option\(s\) \['rank'\] for inversion method 'cg'; it accepts"):
        make_solver("cg", rank=3)


@pytest.mark.parametrize(
    ("method", "options", "message"),
    [
        ("arnoldi", {"rank": 0}, "rank must be a positive integer"),
        ("cg", {"maxiter": -1}, "maxiter must be a positive integer"),
        ("cg", {"rtol": -1.0}, "rtol must be a finite number"),
        ("cg", {"preconditioner": "ilu"}, "Unknown cg preconditioner"),
        ("lissa", {"dampen": 1.5}, r"dampen must be in \[0, 1\)"),
        ("lissa", {"scale": 0}, "scale must be a positive number"),
    ],
)
def test_bad_solver_options_are_refused_before_any_work(method, options, message):
    with pytest.raises(ValueError, match=message):
        make_solver(method, **options)


def test_enum_members_and_plain_strings_are_both_accepted(problem):
    by_string = factors(problem, "direct").x
    by_enum = factors(problem, InversionMethod.direct).x
    torch.testing.assert_close(by_string, by_enum, atol=0, rtol=0)


def test_negative_regularization_is_refused(problem):
    with pytest.raises(ValueError, match="must be finite and ≥ 0"):
        compute_influence_factors(problem["model"], problem["train"], problem["test"], "direct", hessian_perturbation=-1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        factors(problem, "direct")  # a positive definite problem warns about nothing
