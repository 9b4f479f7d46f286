"""InfluenceResult: exact save/load round trip, memory-mapped loading, top-k questions, scoring new data."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import classification_data, fitted, linear_model, loader, mlp_model
from torch.utils.data import TensorDataset

import lightning_influence.storage.result as result_module
from lightning_influence import InfluenceResult, TwiceDifferentiable, compute_influence_factors, compute_influences_up
from lightning_influence import IndexedData, InfluenceArguments, compute_influence


@pytest.fixture(scope="module")
def problem():
    x, y = classification_data(60)
    module = fitted(mlp_model(), x, y)
    return module, x, y


def _result(problem, folder: Path, module=None, **kwargs) -> InfluenceResult:
    trained, x, y = problem
    module = trained if module is None else module
    model = TwiceDifferentiable(module, F.cross_entropy)
    options = dict(method="direct", hessian_regularization=0.01, batch_size=16, self_influence=True)
    options.update(kwargs)
    return compute_influence(model, IndexedData(TensorDataset(x, y)), IndexedData(TensorDataset(x[:6], y[:6])),
                             InfluenceArguments(**options), save_dir=folder)


def _assert_same(a: InfluenceResult, b: InfluenceResult) -> None:
    for name in ("scores", "query_indices", "train_indices", "factors", "self_influence"):
        left, right = getattr(a, name), getattr(b, name)
        assert left.dtype == right.dtype and torch.equal(left, right), name
    assert a.metadata == b.metadata


def test_save_load_round_trip_is_exact_and_memory_mapped(problem, tmp_path):
    result = _result(problem, tmp_path / "run")
    path = result.save(tmp_path / "copy")
    loaded = InfluenceResult.load(path)
    _assert_same(result, loaded)
    assert result.scores.dtype == torch.float64
    mapped = Path("/proc/self/maps").read_text()
    assert str((path / "scores.npy").resolve()) in mapped  # the scores are mapped from the file, not read in
    loaded.scores[0, 0] = 123.0  # copy-on-write: the file keeps its values
    assert torch.equal(InfluenceResult.load(path).scores, result.scores)
    eager = InfluenceResult.load(path, mmap=False)
    _assert_same(result, eager)
    assert isinstance(np.load(path / "scores.npy", mmap_mode="r"), np.memmap)


def test_metadata_records_the_run(problem, tmp_path):
    _, x, y = problem
    linear = fitted(linear_model(), x, y)  # p = 18: cg converges in a few passes
    result = _result(problem, tmp_path / "run", module=linear, method="cg", method_kwargs={"rtol": 1e-8},
                     self_influence=False)
    meta = result.metadata
    assert meta["method"] == "cg" and meta["method_kwargs"]["rtol"] == 1e-8
    assert meta["hessian_regularization"] == 0.01
    assert (meta["num_train"], meta["num_queries"], meta["num_params"]) == (60, 6, 18)
    assert meta["parameter_names"] == ["weight", "bias"]
    assert meta["self_influence"] is False and result.self_influence is None
    assert meta["convergence"]["max_relative_residual"] <= 1e-8
    assert meta["timings"]["total_seconds"] > 0
    assert set(meta["versions"]) == {"torch", "pytorch_lightning", "lightning_influence"}
    assert json.loads((tmp_path / "run" / "result" / "metadata.json").read_text())["complete"] is True


def test_top_k_answers_with_dataset_indices():
    scores = torch.tensor([[0.5, -2.0, 3.0, 0.1], [-1.0, 4.0, -0.5, 2.0]])
    result = InfluenceResult(scores=scores, query_indices=torch.tensor([7, 9]),
                             train_indices=torch.tensor([10, 3, 42, 5]), factors=torch.zeros(2, 3),
                             self_influence=torch.tensor([1.0, 9.0, 4.0, 0.0]))
    assert result.top_helpful(0, 2).indices.tolist() == [42, 10]
    assert result.top_helpful(0, 2).scores.tolist() == [3.0, 0.5]
    assert result.top_harmful(1, 2).indices.tolist() == [10, 42]
    assert result.top_harmful(1, 2).scores.tolist() == [-1.0, -0.5]
    assert result.top_self_influence(2).indices.tolist() == [3, 42]
    with pytest.raises(ValueError, match=r"k must be an integer in \[1, N=4\]"):
        result.top_helpful(0, 5)
    with pytest.raises(IndexError, match="query position"):
        result.top_harmful(2, 1)
    without = InfluenceResult(scores=scores, query_indices=torch.tensor([7, 9]),
                              train_indices=torch.tensor([10, 3, 42, 5]), factors=torch.zeros(2, 3))
    with pytest.raises(ValueError, match="self_influence=True"):
        without.top_self_influence(1)
    with pytest.raises(ValueError, match="train_indices must have shape"):
        InfluenceResult(scores=scores, query_indices=torch.tensor([7, 9]), train_indices=torch.tensor([1]),
                        factors=torch.zeros(2, 3))


def test_score_new_data_from_saved_factors_equals_recomputation(problem, tmp_path):
    module, x, y = problem
    loaded = InfluenceResult.load(_result(problem, tmp_path / "run").save(tmp_path / "saved"))
    model = TwiceDifferentiable(module, F.cross_entropy)
    x_new, y_new = classification_data(25, seed=5)
    new_scores = loaded.score(model, loader(x_new, y_new, batch_size=16))
    factors = compute_influence_factors(model, loader(x, y), loader(x[:6], y[:6]), "direct", hessian_perturbation=0.01)
    recomputed = compute_influences_up(model, loader(x_new, y_new, batch_size=16), factors)
    assert new_scores.shape == (6, 25)
    torch.testing.assert_close(new_scores, recomputed, rtol=1e-9, atol=1e-12)
    # scoring the training data again gives the stored scores
    torch.testing.assert_close(loaded.score(model, loader(x, y)), loaded.scores, rtol=1e-9, atol=1e-12)


def test_score_refuses_other_weights_or_parameters(problem, tmp_path):
    module, x, y = problem
    result = _result(problem, tmp_path / "run")
    other = mlp_model(seed=3)
    with pytest.raises(ValueError, match="weights differ"):
        result.score(TwiceDifferentiable(other, F.cross_entropy), loader(x, y))
    with pytest.raises(ValueError, match="parameter selection"):
        result.score(TwiceDifferentiable(module, F.cross_entropy, params="2.*"), loader(x, y))
    with pytest.raises(TypeError, match="TwiceDifferentiable"):
        result.score(module, loader(x, y))


def test_incomplete_or_foreign_folders_do_not_load(problem, tmp_path):
    with pytest.raises(FileNotFoundError, match="No complete influence result"):
        InfluenceResult.load(tmp_path)
    path = _result(problem, tmp_path / "run").save(tmp_path / "saved")
    meta = json.loads((path / "metadata.json").read_text())
    (path / "metadata.json").write_text(json.dumps({**meta, "format_version": 99}))
    with pytest.raises(ValueError, match="format version 99"):
        InfluenceResult.load(path)
    (path / "metadata.json").write_text(json.dumps({**meta, "complete": False}))
    with pytest.raises(ValueError, match="not marked complete"):
        InfluenceResult.load(path)


def test_a_crash_while_saving_keeps_the_previous_result(problem, tmp_path, monkeypatch):
    first = _result(problem, tmp_path / "run")
    path = first.save(tmp_path / "saved")
    calls = []

    def failing(target, array):
        calls.append(target)
        if len(calls) == 3:
            raise OSError("disk full")
        return original(target, array)

    original = result_module.atomic_save_array
    monkeypatch.setattr(result_module, "atomic_save_array", failing)
    changed = InfluenceResult(scores=first.scores * 2, query_indices=first.query_indices,
                              train_indices=first.train_indices, factors=first.factors, metadata=first.metadata)
    with pytest.raises(OSError, match="disk full"):
        changed.save(path)
    _assert_same(first, InfluenceResult.load(path))
    assert sorted(p.name for p in path.parent.iterdir()) == ["run", "saved"]  # no staging folder left behind


def test_perturbation_influence_is_stored_and_equals_the_functional_api(problem, tmp_path):
    from lightning_influence import compute_influences_pert

    module, x, y = problem
    result = _result(problem, tmp_path / "run", influence_type="perturbation", self_influence=False)
    model = TwiceDifferentiable(module, F.cross_entropy)
    factors = compute_influence_factors(model, loader(x, y), loader(x[:6], y[:6]), "direct", hessian_perturbation=0.01)
    expected = compute_influences_pert(model, loader(x, y), factors)
    assert result.perturbation.shape == (6, 60, 5)
    torch.testing.assert_close(result.perturbation, expected, rtol=1e-9, atol=1e-12)
    loaded = InfluenceResult.load(tmp_path / "run" / "result")
    assert torch.equal(loaded.perturbation, result.perturbation) and loaded.metadata["influence_type"] == "perturbation"
