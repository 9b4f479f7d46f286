"""Contracts between the stages: the curvature operator's public interface and bookkeeping, the fitted state of
solvers, which errors a fall-back may catch, and where warnings point."""

import ast
import pathlib
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, jacrev

import lightning_influence
import lightning_influence.model.twice_differentiable as twice_differentiable
from helpers import classification_data, loader, mlp_model
from lightning_influence import CurvatureOperator, TwiceDifferentiable
from lightning_influence.errors import LayerFormError, NotFittedError, is_out_of_memory
from lightning_influence.model.layers import LayerStructure
from lightning_influence.model.twice_differentiable import forward_mode_unsupported
from lightning_influence.solvers import Solver, make_solver
from lightning_influence.solvers.base import ApproximateSolver

PACKAGE = pathlib.Path(lightning_influence.__file__).parent


@pytest.fixture
def problem():
    x, y = classification_data(24)
    model = TwiceDifferentiable(mlp_model(), F.cross_entropy)  # untrained: the Hessian is indefinite
    return model, x, y


# -- the operator's public interface -------------------------------------------------------------------------
def test_operator_keeps_its_own_bookkeeping(problem):
    model, x, y = problem
    operator = CurvatureOperator(model, loader(x, y, batch_size=10))
    assert (operator.passes, operator.num_examples) == (0, None)
    with model.evaluating():
        operator.matmat(torch.randn(2, model.num_params, dtype=torch.float64))
    assert (operator.passes, operator.num_examples) == (1, 24)
    operator.count_pass(2)
    assert operator.passes == 3
    for name in ("passes", "num_examples", "model"):
        with pytest.raises(AttributeError):
            setattr(operator, name, 0)


def test_reduce_mean_divides_by_the_global_count_and_counts_one_pass(problem):
    model, x, y = problem
    operator = CurvatureOperator(model, loader(x, y))
    total = torch.tensor([6.0, 9.0], dtype=torch.float64)
    torch.testing.assert_close(operator.reduce_mean(total, 3, "a test sum"), total / 3)
    assert (operator.passes, operator.num_examples) == (1, 3)
    with pytest.raises(ValueError, match="no examples on any process"):
        operator.count_examples(0)


def test_single_batch_and_endless_batches(problem):
    model, x, y = problem
    assert CurvatureOperator(model, loader(x, y, batch_size=24)).single_batch()
    several = CurvatureOperator(model, loader(x, y, batch_size=10))
    assert not several.single_batch()
    batches = several.cycle_batches()
    sizes = [len(next(batches)[0]) for _ in range(4)]
    assert sizes == [10, 10, 4, 10]  # restarts after the last batch


# -- fitted state ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", sorted(Solver.registry, key=lambda m: m.value), ids=lambda m: m.value)
def test_every_solver_refuses_to_solve_before_fit(method):
    solver = make_solver(method)
    name = type(solver).__name__
    assert not solver.is_fitted
    with pytest.raises(NotFittedError, match=rf"^{name}\.solve needs fit\(operator, regularization\) first$"):
        solver.solve(torch.ones(3))
    with pytest.raises(NotFittedError, match=rf"^{name}\.operator needs fit"):
        solver.operator  # noqa: B018
    with pytest.raises(NotFittedError, match=rf"^{name}\.apply_damped needs fit"):
        solver.apply_damped(torch.ones(1, 3))


APPROXIMATE_CALLS = [
    (cls.method.value, "_approximate", (torch.ones(1, 3),))
    for cls in Solver.registry.values()
    if issubclass(cls, ApproximateSolver)
] + [("nystroem", "preconditioner", ()), ("ekfac", "curvature_matrix", ())]


@pytest.mark.parametrize("method, call, args", APPROXIMATE_CALLS, ids=lambda value: str(value))
def test_approximate_solvers_refuse_their_extra_methods_before_fit(method, call, args):
    solver = make_solver(method)
    with pytest.raises(NotFittedError, match=rf"^{type(solver).__name__}\.{call} needs fit"):
        getattr(solver, call)(*args)


def test_a_failed_fit_leaves_the_solver_unfitted(problem):
    _, x, y = problem
    outside = TwiceDifferentiable(nn.Sequential(nn.Linear(5, 4), nn.LayerNorm(4), nn.Linear(4, 3)).double(),
                                  F.cross_entropy)
    solver = make_solver("ekfac")
    with pytest.raises(ValueError, match="The per-layer form covers nn.Linear, nn.Conv2d"):
        solver.fit(CurvatureOperator(outside, loader(x, y)))
    assert not solver.is_fitted
    with pytest.raises(NotFittedError):
        solver.solve(torch.ones(outside.num_params, dtype=torch.float64))


def test_no_assert_statements_in_the_solvers_curvature_and_model():
    """`python -O` strips asserts: the library must not rely on them for checks."""
    files = [*sorted((PACKAGE / "solvers").glob("*.py")), *sorted((PACKAGE / "curvature").glob("*.py")),
             PACKAGE / "model" / "twice_differentiable.py", PACKAGE / "model" / "layers.py", PACKAGE / "errors.py"]
    asserts = [f"{path.name}:{node.lineno}" for path in files
               for node in ast.walk(ast.parse(path.read_text())) if isinstance(node, ast.Assert)]
    assert asserts == []


# -- out of memory propagates; forward mode falls back only where it lacks a formula ---------------------------
def test_is_out_of_memory_recognises_accelerator_and_cpu_allocation_failures():
    with pytest.raises(RuntimeError) as real:
        torch.empty(2**60, dtype=torch.uint8)  # more than any machine has: the CPU allocator refuses at once
    assert is_out_of_memory(real.value)
    assert is_out_of_memory(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert is_out_of_memory(RuntimeError("MPS backend out of memory (MPS allocated: 1 GB)"))
    assert not is_out_of_memory(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))
    assert not is_out_of_memory(ValueError("out of memory"))


OUT_OF_MEMORY = [
    torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB"),
    RuntimeError("[enforce fail at alloc_cpu.cpp:127] DefaultCPUAllocator: can't allocate memory: you tried to "
                 "allocate 9007199254740992 bytes. Error code 12 (Cannot allocate memory)"),
]


@pytest.mark.parametrize("error", OUT_OF_MEMORY, ids=["accelerator", "cpu"])
@pytest.mark.parametrize("product", ["batch_hvp", "batch_ggn_vp"])
def test_out_of_memory_in_forward_mode_propagates_and_keeps_forward_mode(problem, monkeypatch, error, product):
    model, x, y = problem

    def out_of_memory(*args, **kwargs):
        raise error

    monkeypatch.setattr(twice_differentiable, "jvp", out_of_memory)
    with pytest.raises(type(error)) as raised:
        getattr(model, product)(x, y, torch.ones(2, model.num_params, dtype=torch.float64))
    assert raised.value is error
    assert not model.reverse_mode_only
    with pytest.raises(type(error)) as raised:  # not turned into "cannot be differentiated twice"
        model.check_second_order(x, y)
    assert raised.value is error


def test_other_errors_in_forward_mode_propagate_and_keep_forward_mode(problem, monkeypatch):
    model, x, y = problem
    error = RuntimeError("mat1 and mat2 shapes cannot be multiplied (4x5 and 6x8)")

    def broken(*args, **kwargs):
        raise error

    monkeypatch.setattr(twice_differentiable, "jvp", broken)
    with pytest.raises(RuntimeError) as raised:
        model.batch_hvp(x, y, torch.ones(1, model.num_params, dtype=torch.float64))
    assert raised.value is error and not model.reverse_mode_only


class SquareWithoutJvp(torch.autograd.Function):
    """x² with a backward but no jvp: forward-mode AD cannot go through it."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x):
        return x**2

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])

    @staticmethod
    def backward(ctx, grad_output):
        (x,) = ctx.saved_tensors
        return 2 * x * grad_output


LOSSES_WITHOUT_FORWARD_MODE = {
    "huber_loss": F.huber_loss,  # huber_loss_backward has no forward derivative
    "function_without_jvp": lambda outputs, targets: SquareWithoutJvp.apply(outputs - targets).mean(),
}


@pytest.mark.parametrize("loss", LOSSES_WITHOUT_FORWARD_MODE.values(), ids=LOSSES_WITHOUT_FORWARD_MODE.keys())
def test_forward_mode_gaps_fall_back_to_reverse_mode_with_the_right_product(loss):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(20, 3, generator=generator, dtype=torch.float64)
    y = torch.randn(20, 2, generator=generator, dtype=torch.float64)
    module = nn.Linear(3, 2).double()  # linear in θ: the Gauss–Newton matrix equals the Hessian
    model = TwiceDifferentiable(module, loss)
    vectors = torch.randn(3, model.num_params, generator=generator, dtype=torch.float64)
    flat = model.flat_params()
    with pytest.raises((RuntimeError, AssertionError)) as forward_error:
        torch.func.jvp(lambda t: torch.func.grad(model._batch_loss)(t, x, y), (flat,), (vectors[0],))
    assert forward_mode_unsupported(forward_error.value)

    def mean_loss(theta):
        return loss(functional_call(module, model.unflatten(theta), (x,)), y)

    expected = vectors @ jacrev(jacrev(mean_loss))(flat)  # reverse over reverse, by definition
    torch.testing.assert_close(model.batch_hvp(x, y, vectors), expected, rtol=1e-10, atol=1e-12)
    assert model.reverse_mode_only
    fresh = TwiceDifferentiable(module, loss)
    torch.testing.assert_close(fresh.batch_ggn_vp(x, y, vectors), expected, rtol=1e-10, atol=1e-12)
    assert fresh.reverse_mode_only
    explicit = TwiceDifferentiable(module, loss).batch_hessian(x, y)
    torch.testing.assert_close(vectors @ explicit, expected, rtol=1e-10, atol=1e-12)


def test_forward_mode_unsupported_never_matches_out_of_memory():
    gap = NotImplementedError("Trying to use forward AD with huber_loss_backward that does not support it")
    assert forward_mode_unsupported(gap)
    assert not forward_mode_unsupported(torch.OutOfMemoryError("Trying to use forward AD with: out of memory"))
    assert not forward_mode_unsupported(RuntimeError("some other failure"))


def test_a_layer_used_twice_raises_its_own_error_for_a_precise_fall_back(problem):
    """Scoring falls back from the per-layer form to the generic path on this error only, never on others."""
    _, x, y = problem

    class SharedLayer(nn.Module):
        def __init__(self):
            super().__init__()
            self.layer = nn.Linear(5, 5).double()

        def forward(self, inputs):
            return self.layer(torch.tanh(self.layer(inputs)))[:, :3]

    structure = LayerStructure(TwiceDifferentiable(SharedLayer(), F.cross_entropy))
    with pytest.raises(LayerFormError, match="'layer' ran 2 times in one forward pass"):
        structure.example_gradients(x, y)


# -- warnings point at the caller's line ----------------------------------------------------------------------
def library_warnings(action):
    """The RuntimeWarnings (the library's category) that `action()` raises; torch's own UserWarnings (such as
    performance notes under `python -O`) are left out."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        action()
    return [w for w in caught if issubclass(w.category, RuntimeWarning)]


def test_warnings_from_fit_point_at_the_callers_line(problem):
    model, x, y = problem
    caught = library_warnings(
        lambda: lightning_influence.fit_solver(model, loader(x, y), "direct", hessian_regularization=0.0)
    )
    messages = [str(w.message) for w in caught]
    assert any("not positive definite" in m for m in messages), messages
    assert any("eigendecomposition pseudo-inverse" in m for m in messages), messages
    assert {w.filename for w in caught} == {__file__}


@pytest.mark.parametrize("method, options, fragment", [
    ("cg", {"maxiter": 2}, "found by cg, which stopped"),  # H is indefinite here: cg stops at it
    ("lissa", {"maxiter": 3, "check_every": 1}, "lissa did not reach"),
])
def test_warnings_from_solve_point_at_the_callers_line(problem, method, options, fragment):
    model, x, y = problem
    solver = lightning_influence.fit_solver(model, loader(x, y), method, hessian_regularization=0.0, **options)
    caught = library_warnings(lambda: solver.solve(torch.ones(2, model.num_params, dtype=torch.float64)))
    assert any(fragment in str(w.message) for w in caught), [str(w.message) for w in caught]
    assert {w.filename for w in caught} == {__file__}
