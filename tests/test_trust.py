"""Trust: every stage's convergence in the metadata and the report, the bounds solutions keep, what
`on_unconverged` does, the documented error for a singular system, and nothing non-finite saved."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from helpers import classification_data, fitted, linear_model, mlp_model
from torch.utils.data import TensorDataset

from lightning_influence import (
    ConvergenceError,
    IndexedData,
    InfluenceArguments,
    InfluenceEngine,
    InfluenceResult,
    NonFiniteError,
    TwiceDifferentiable,
    compute_influence,
)
from lightning_influence.engine.trust import eigenvalue_floor, record_warnings, solve_record
from lightning_influence.reports import write_reports

UNCONVERGED = {"method_kwargs": {"maxiter": 2}}


@pytest.fixture(scope="module")
def problem():
    x, y = classification_data(48)
    model = TwiceDifferentiable(fitted(mlp_model(), x, y, steps=50), F.cross_entropy)
    return model, IndexedData(TensorDataset(x, y), name="training_data"), IndexedData(TensorDataset(x[:4], y[:4]))


def _run(problem, folder, **options):
    model, training, queries = problem
    arguments = InfluenceArguments(**{"method": "cg", "hessian_regularization": 0.1, "curvature": "ggn",
                                      "batch_size": 16, "chunk_batches": 1, **options})
    return compute_influence(model, training, queries, arguments, save_dir=folder)


def test_every_stage_records_its_convergence(problem, tmp_path):
    result = _run(problem, tmp_path, self_influence=True)
    assert result.trustworthy and result.warnings == []
    stages = result.metadata["stages"]
    factors = stages["factors"]
    assert factors["converged"] is True and factors["iterations"] > 0 and factors["max_relative_residual"] < 1e-6
    assert (factors["rows"], factors["negative"], factors["beyond_bound"]) == (4, 0, 0)
    assert factors["eigenvalue_floor"] == 0.1  # μ = λ with curvature="ggn"
    chunks = stages["self_influence"]["chunk_records"]
    assert [(c["chunk"], c["rows"], c["converged"]) for c in chunks] == [(0, 16, True), (1, 16, True), (2, 16, True)]
    # Self-influence is a quadratic form, whose error is the square of the solve's: cg solves to √rtol for it.
    assert all(c["iterations"] > 0 and c["max_relative_residual"] < 1e-3 for c in chunks)
    assert stages["scores"]["max_abs"] == pytest.approx(float(result.scores.abs().max()))
    assert stages["self_influence"]["max_abs"] == pytest.approx(float(result.self_influence.abs().max()))


def test_an_unconverged_run_is_saved_marked_untrustworthy_and_reported_so(problem, tmp_path):
    with pytest.warns(RuntimeWarning, match="is not trustworthy: The influence factors did not converge"):
        result = _run(problem, tmp_path, self_influence=True, **UNCONVERGED)
    assert not result.trustworthy
    assert result.warnings[0].startswith("The influence factors did not converge (2 iterations, largest relative")
    assert any(w.startswith("The self-influence did not converge in 3 of 3 chunks") for w in result.warnings)
    loaded = InfluenceResult.load(tmp_path)
    assert loaded.trustworthy is False and loaded.warnings == result.warnings
    assert loaded.metadata["stages"]["factors"]["converged"] is False
    _, training, queries = problem
    report = write_reports(loaded, train_data=training, query_data=queries, top_k=2, folder=tmp_path / "report")
    markdown = (report / "influence.md").read_text()
    assert markdown.startswith("**⚠ NOT TRUSTWORTHY:** The influence factors did not converge")
    assert markdown.count("NOT TRUSTWORTHY") == 6  # above the summary, the 4 query tables and the self-influence table
    assert "| factors | 1 | 2 |" in markdown and "| **no** |" in markdown  # the convergence table
    for table in ("top_influence.csv", "self_influence.csv"):
        assert (report / table).read_text().startswith("# NOT TRUSTWORTHY: The influence factors did not converge")


def test_on_unconverged_ignore_marks_without_warning(problem, tmp_path):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = _run(problem, tmp_path, on_unconverged="ignore", **UNCONVERGED)
    assert not any("not trustworthy" in str(w.message) for w in caught)
    assert not result.trustworthy and not InfluenceResult.load(tmp_path).trustworthy


def test_on_unconverged_raise_saves_nothing_and_a_rerun_with_warn_resumes(problem, tmp_path):
    with pytest.raises(ConvergenceError, match="on_unconverged='raise'.*influence factors did not converge") as caught:
        _run(problem, tmp_path, on_unconverged="raise", **UNCONVERGED)
    assert caught.value.warnings[0].startswith("The influence factors did not converge")
    assert not (tmp_path / "result").exists() and (tmp_path / "partial" / "factors.npy").is_file()
    with pytest.warns(RuntimeWarning, match="not trustworthy"):
        result = _run(problem, tmp_path, on_unconverged="warn", **UNCONVERGED)
    assert result.metadata["resumed"] and not result.trustworthy
    with pytest.raises(ConvergenceError, match="influence factors did not converge"):  # nor is the saved one reused
        _run(problem, tmp_path, on_unconverged="raise", **UNCONVERGED)


def test_an_indefinite_system_makes_the_result_untrustworthy(tmp_path):
    x, y = classification_data(48)
    model = TwiceDifferentiable(mlp_model(), F.cross_entropy)  # untrained: its Hessian is indefinite
    data = IndexedData(TensorDataset(x, y))
    with pytest.warns(RuntimeWarning, match="not trustworthy: The influence factors solved an H \\+ λI that is not"):
        result = compute_influence(model, data, data, InfluenceArguments(method="direct", hessian_regularization=1e-3),
                                   save_dir=tmp_path, query_indices=[0, 1])
    assert not result.trustworthy and result.metadata["stages"]["factors"]["indefinite"]
    assert "increase hessian_regularization, or use curvature='ggn'" in result.warnings[0]


def test_solutions_beyond_the_bounds_are_counted_and_named():
    rhs = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    info = {"method": "cg", "regularization": 0.5, "converged": True, "iterations": 3}
    good = solve_record(rhs, rhs, info, "ggn")  # ‖x‖ = ‖g‖ ≤ ‖g‖/μ with μ = λ = 0.5
    assert (good["negative"], good["beyond_bound"], good["eigenvalue_floor"]) == (0, 0, 0.5)
    assert record_warnings("self-influence", good) == []
    bad = solve_record(rhs, torch.tensor([[-1.0, 0.0], [0.0, 10.0]]), info, "ggn")  # ⟨x, g⟩ < 0; ‖x‖ = 10 > 1.1·2/0.5
    assert (bad["negative"], bad["beyond_bound"]) == (1, 1)
    assert record_warnings("self-influence", bad) == [
        "1 of 2 self-influence values ⟨(H + λI)⁻¹g, g⟩ are negative, which a positive definite H + λI cannot give: "
        "increase hessian_regularization, or use curvature='ggn' (positive semi-definite) with λ > 0.",
        "1 of 2 self-influence solutions exceed ‖g‖/μ (μ = 0.5, the least eigenvalue H + λI can have), so the solve "
        "diverged: increase hessian_regularization, or raise the method's maxiter.",
    ]
    assert solve_record(rhs, 100 * rhs, info, "hessian")["beyond_bound"] == 0  # cg on the Hessian: μ unknown
    # μ from a spectrum the solver found, λ + min(0, smallest eigenvalue); none once refine solves the exact system
    assert eigenvalue_floor({"method": "direct", "regularization": 0.5, "min_eigenvalue": -0.2}, "hessian") == 0.3
    assert eigenvalue_floor({"method": "arnoldi", "options": {"refine": 2}, "regularization": 0.5,
                             "min_eigenvalue": 1.0}, "hessian") is None
    assert solve_record(rhs, rhs, {"method": "direct", "regularization": 0.1, "min_eigenvalue": -0.2},
                        "hessian")["indefinite"]
    assert solve_record(rhs, rhs, {"method": "nystroem", "indefinite": True}, "hessian")["indefinite"]


def test_a_singular_system_with_cg_is_stopped_and_marked_naming_the_fix(tmp_path):
    x, y = classification_data(40)
    x[:, 0] = 0  # no training example uses feature 0, so with λ = 0 the Hessian is singular on its weights
    queries = x[:3].clone()
    queries[:, 0] = 1.0  # the queries do
    model = TwiceDifferentiable(linear_model(), F.cross_entropy)
    data, query_data = IndexedData(TensorDataset(x, y)), IndexedData(TensorDataset(queries, y[:3]))
    with pytest.warns(RuntimeWarning, match="not positive definite"):
        result = compute_influence(model, data, query_data, InfluenceArguments(method="cg", hessian_regularization=0.0),
                                   save_dir=tmp_path / "warn")
    assert result.trustworthy is False and bool(torch.isfinite(result.scores).all())
    assert any("hessian_regularization" in w and "curvature='ggn'" in w for w in result.warnings)
    with pytest.raises(ConvergenceError, match="not trustworthy"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        compute_influence(model, data, query_data, InfluenceArguments(method="cg", hessian_regularization=0.0,
                                                                      on_unconverged="raise"), save_dir=tmp_path / "raise")


def test_a_run_never_raises_a_raw_linear_algebra_error(problem, tmp_path, monkeypatch):
    def singular(self, rhs):
        raise torch.linalg.LinAlgError("linalg.cholesky: The factorization could not be completed")

    monkeypatch.setattr(InfluenceEngine, "factors", singular)
    with pytest.raises(NonFiniteError, match=r"a linear-algebra routine \(linalg.cholesky: .*\), while computing the "
                                             r"influence factors. H \+ λI is singular"):
        _run(problem, tmp_path)


def test_nothing_non_finite_is_stored_or_saved(problem, tmp_path, monkeypatch):
    result = InfluenceResult(scores=torch.tensor([[1.0, float("inf")]]), query_indices=torch.tensor([0]),
                             train_indices=torch.arange(2), factors=torch.zeros(1, 3))
    with pytest.raises(NonFiniteError, match="the result's scores"):
        result.save(tmp_path / "direct")
    assert not (tmp_path / "direct").exists()
    overflowing = lambda self, data, factors: torch.full((factors.shape[0], 16), float("inf"))  # noqa: E731
    monkeypatch.setattr(InfluenceEngine, "scores", overflowing)
    with pytest.raises(NonFiniteError, match="the scores of chunk 0, while computing the scores"):
        _run(problem, tmp_path / "run")
    assert not (tmp_path / "run" / "result").exists()
    assert not list((tmp_path / "run" / "partial").rglob("scores-*.npy"))
