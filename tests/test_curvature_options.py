"""`curvature="ggn"` and `block_diagonal=True`: products and solves against float64 matrices built by definition."""

import warnings

import pytest
import torch
import torch.nn.functional as F

from helpers import ExactReference, classification_data, fitted, linear_model, loader, mlp_model, reference_ggn
from lightning_influence import (
    CurvatureOperator,
    InfluenceCallback,
    TwiceDifferentiable,
    compute_influence_factors,
    compute_influences,
    fit_solver,
)
from lightning_influence.curvature.operator import parameter_blocks
from lightning_influence import IndexedData, InfluenceArguments, ResultMismatchError, compute_influence

REGULARIZATION = 0.05


@pytest.fixture(scope="module")
def trained():
    x, y = classification_data(48)
    module = fitted(mlp_model(), x, y)
    return module, x, y


def block_mask(model):
    p = model.num_params
    mask = torch.zeros(p, p, dtype=torch.bool)
    for _, block in parameter_blocks(model):
        mask[block, block] = True
    return mask


def test_parameter_blocks_group_each_modules_weight_and_bias(trained):
    module, _, _ = trained
    model = TwiceDifferentiable(module, F.cross_entropy)
    assert parameter_blocks(model) == [("0", slice(0, 48)), ("2", slice(48, 75))]
    only_weights = TwiceDifferentiable(module, F.cross_entropy, params="*.weight")
    assert [name for name, _ in parameter_blocks(only_weights)] == ["0", "2"]


def test_ggn_products_and_matrix_match_the_definition(trained):
    module, x, y = trained
    model = TwiceDifferentiable(module, F.cross_entropy)
    expected = reference_ggn(module, x, y)
    operator = CurvatureOperator(model, loader(x, y, batch_size=20), curvature="ggn")
    vectors = torch.randn(3, model.num_params, dtype=torch.float64)
    with model.evaluating():
        torch.testing.assert_close(operator.matmat(vectors), vectors @ expected, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(operator.dense(), expected, rtol=1e-10, atol=1e-12)
    # The Gauss–Newton matrix differs from the Hessian of a nonlinear model, and has no negative eigenvalue.
    hessian = ExactReference(module, x, y, 0.0).hessian
    assert float((expected - hessian).norm() / hessian.norm()) > 1e-3
    assert float(torch.linalg.eigvalsh(expected).min()) > -1e-12


@pytest.mark.parametrize("reverse_mode", [False, True])
def test_ggn_of_squared_error_in_forward_and_reverse_mode(reverse_mode):
    x, _ = classification_data(30)
    targets = torch.randn(30, 3, dtype=torch.float64)
    module = mlp_model()
    model = TwiceDifferentiable(module, F.mse_loss)
    model._reverse_over_reverse = reverse_mode  # False: forward mode, falling back where torch lacks it
    operator = CurvatureOperator(model, loader(x, targets, batch_size=30), curvature="ggn")
    vectors = torch.randn(2, model.num_params, dtype=torch.float64)
    with model.evaluating():
        product = operator.matmat(vectors)
    torch.testing.assert_close(product, vectors @ reference_ggn(module, x, targets, loss="mse"), rtol=1e-10,
                               atol=1e-12)


def test_ggn_equals_the_hessian_for_a_model_linear_in_its_parameters():
    x, y = classification_data(40)
    module = fitted(linear_model(), x, y)
    model = TwiceDifferentiable(module, F.cross_entropy)
    with model.evaluating():
        ggn = CurvatureOperator(model, loader(x, y), curvature="ggn").dense()
    torch.testing.assert_close(ggn, ExactReference(module, x, y, 0.0).hessian, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("curvature", ["hessian", "ggn"])
def test_block_diagonal_products_drop_exactly_the_cross_layer_terms(trained, curvature):
    module, x, y = trained
    model = TwiceDifferentiable(module, F.cross_entropy)
    full = reference_ggn(module, x, y) if curvature == "ggn" else ExactReference(module, x, y, 0.0).hessian
    expected = full * block_mask(model)
    operator = CurvatureOperator(model, loader(x, y, batch_size=20), curvature=curvature, block_diagonal=True)
    vectors = torch.randn(4, model.num_params, dtype=torch.float64)
    with model.evaluating():
        torch.testing.assert_close(operator.matmat(vectors), vectors @ expected, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(operator.dense(), expected, rtol=1e-10, atol=1e-12)
        # LiSSA's one-batch products take the same path.
        xb, yb = x[:20], y[:20]
        batch_full = ExactReference(module, xb, yb, 0.0).hessian if curvature == "hessian" else reference_ggn(
            module, xb, yb)
        torch.testing.assert_close(operator.batch_matmat(xb, yb, vectors), vectors @ (batch_full * block_mask(model)),
                                   rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("method, options, tolerance", [
    ("direct", {}, 1e-9),
    ("cg", {"rtol": 1e-10}, 1e-7),
    ("arnoldi", {"rank": 75}, 1e-7),
])
@pytest.mark.parametrize("curvature, block_diagonal", [("ggn", False), ("hessian", True), ("ggn", True)])
def test_solvers_invert_the_chosen_curvature(trained, method, options, tolerance, curvature, block_diagonal):
    module, x, y = trained
    model = TwiceDifferentiable(module, F.cross_entropy)
    full = reference_ggn(module, x, y) if curvature == "ggn" else ExactReference(module, x, y, 0.0).hessian
    matrix = (full * block_mask(model) if block_diagonal else full) + REGULARIZATION * torch.eye(model.num_params,
                                                                                                 dtype=torch.float64)
    x_test, y_test = classification_data(4, seed=1)
    rhs = ExactReference(module, x, y, 0.0).grads(x_test, y_test)
    expected = torch.linalg.solve(matrix, rhs.T).T
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the spectrum report's notes on conditioning
        factors = compute_influence_factors(model, loader(x, y, batch_size=20), loader(x_test, y_test), method,
                                            hessian_perturbation=REGULARIZATION, curvature=curvature,
                                            block_diagonal=block_diagonal, **options)
    assert float((factors.x - expected).norm() / expected.norm()) < tolerance


def test_direct_block_diagonal_factorises_one_block_per_layer(trained):
    module, x, y = trained
    model = TwiceDifferentiable(module, F.cross_entropy)
    solver = fit_solver(model, loader(x, y), "direct", hessian_regularization=REGULARIZATION, block_diagonal=True)
    assert [factor.shape for factor in solver._factors] == [(48, 48), (27, 27)]


def test_bad_curvature_options_are_refused_early(trained, tmp_path):
    module, x, y = trained
    model = TwiceDifferentiable(module, F.cross_entropy)
    with pytest.raises(ValueError, match=r"curvature must be one of \['hessian', 'ggn', 'auto'\], got 'fisher'"):
        compute_influences(model, loader(x, y), inversion_method="direct", curvature="fisher")
    with pytest.raises(TypeError, match="block_diagonal must be True or False"):
        fit_solver(model, loader(x, y), "cg", block_diagonal="layer")
    with pytest.raises(ValueError, match="curvature must be one of"):
        InfluenceCallback(curvature="gauss-newton")
    with pytest.raises(TypeError, match="block_diagonal must be True or False"):
        InfluenceCallback(block_diagonal=1)


def test_ggn_refuses_models_whose_outputs_are_not_one_tensor():
    class TwoHeads(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(5, 3).double()

        def forward(self, x):
            return {"logits": self.layer(x)}

    x, y = classification_data(10)
    model = TwiceDifferentiable(TwoHeads(), lambda out, t: F.cross_entropy(out["logits"], t))
    operator = CurvatureOperator(model, loader(x, y), curvature="ggn")
    with pytest.raises(TypeError, match="curvature='ggn' needs the loss as a function of one tensor.*output_transform"):
        operator.matvec(torch.ones(model.num_params, dtype=torch.float64))


def test_the_pipeline_records_the_curvature_and_refuses_to_resume_another(trained, tmp_path):
    module, x, y = trained
    model = TwiceDifferentiable(module, F.cross_entropy)
    data = IndexedData(torch.utils.data.TensorDataset(x, y))
    options = dict(method="direct", hessian_regularization=REGULARIZATION, batch_size=16, block_diagonal=True)
    run = dict(save_dir=tmp_path, query_indices=[0, 1])
    result = compute_influence(model, data, data, InfluenceArguments(curvature="ggn", **options), **run)
    assert result.metadata["curvature"] == "ggn" and result.metadata["block_diagonal"] is True
    with pytest.raises(ResultMismatchError, match="curvature: stored 'ggn', now 'hessian'"):
        compute_influence(model, data, data, InfluenceArguments(curvature="hessian", **options), **run)
