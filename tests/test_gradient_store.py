"""The gradient store: training gradients written once, new queries rescored from them and the saved solver, equal
to a full run; low-precision stores within their rounding bound; resuming; refusals with what to do instead."""

from __future__ import annotations

import json
import threading
from contextlib import contextmanager

import pytest
import torch
import torch.nn.functional as F
from helpers import ExactReference, classification_data, fitted, loader, mlp_model
from torch.utils.data import Dataset, TensorDataset

from lightning_influence import (
    Distribution,
    GradientStore,
    IndexedData,
    InfluenceArguments,
    InfluenceCallback,
    InfluenceResult,
    ResultMismatchError,
    TwiceDifferentiable,
    compute_influence,
)
from lightning_influence.engine.scoring import stacked_gradients

N_TRAIN, N_QUERIES, N_NEW = 40, 5, 4
REGULARIZATION = 0.1
#: Unit roundoff of each store dtype: a stored gradient is g(1 + ε) elementwise with |ε| ≤ u.
ROUNDOFF = {"float32": 2.0**-24, "float16": 2.0**-11, "bfloat16": 2.0**-8}


@pytest.fixture(scope="module")
def problem():
    x, y = classification_data(N_TRAIN)
    xq, yq = classification_data(N_QUERIES, seed=1)
    xn, yn = classification_data(N_NEW, seed=2)
    module = fitted(mlp_model(), x, y)
    return module, (x, y), (xq, yq), (xn, yn)


def _model(problem) -> TwiceDifferentiable:
    return TwiceDifferentiable(problem[0], F.cross_entropy)


def _run(problem, folder, method="direct", store=True, query_rank=None, **options) -> InfluenceResult:
    (x, y), (xq, yq) = problem[1], problem[2]
    arguments = InfluenceArguments(method=method, method_kwargs=options, hessian_regularization=REGULARIZATION,
                                   curvature="ggn", batch_size=8, store_gradients=store, store_dtype="float64",
                                   query_rank=query_rank)
    return compute_influence(_model(problem), IndexedData(TensorDataset(x, y)), IndexedData(TensorDataset(xq, yq)),
                             arguments, save_dir=folder)


@pytest.mark.parametrize(("method", "options"), [
    ("direct", {}), ("ekfac", {"refine": 0}), ("nystroem", {"rank": 20, "refine": 0}),
    ("arnoldi", {"rank": 20, "refine": 0}),
])
def test_rescoring_the_run_queries_from_the_store_gives_the_run_scores(problem, tmp_path, method, options):
    result = _run(problem, tmp_path, method, **options)
    loaded = InfluenceResult.load(tmp_path)  # the save_dir: the result and its store are found from there
    rescored = loaded.score_queries(_model(problem), loader(*problem[2], batch_size=3), top_k=3)
    assert rescored.scores.shape == (N_QUERIES, N_TRAIN)
    # Equal to float64 rounding: the saved solver's tensors come back contiguous, so BLAS may sum in another order.
    torch.testing.assert_close(rescored.scores, result.scores, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(rescored.factors, result.factors, rtol=1e-12, atol=1e-14)
    if method == "direct":
        assert torch.equal(rescored.scores, result.scores)
    best = result.scores.topk(3, dim=1)
    assert torch.equal(rescored.helpful.indices, result.train_indices[best.indices])
    assert torch.equal(rescored.harmful.indices, result.train_indices[result.scores.topk(3, dim=1, largest=False)
                                                                      .indices])


def test_rescoring_cuts_new_factors_to_the_run_query_rank(problem, tmp_path):
    result = _run(problem, tmp_path, query_rank=1)
    full = _run(problem, tmp_path / "full")
    rescored = InfluenceResult.load(tmp_path).score_queries(_model(problem), loader(*problem[2], batch_size=3))
    torch.testing.assert_close(rescored.scores, result.scores, rtol=1e-10, atol=1e-12)
    assert not torch.allclose(result.scores, full.scores)  # rank 1 is a real cut of these layers


def test_new_queries_get_the_exact_influence(problem, tmp_path):
    module, (x, y), _, (xn, yn) = problem
    _run(problem, tmp_path)
    rescored = InfluenceResult.load(tmp_path).score_queries(_model(problem), loader(xn, yn))
    reference = ExactReference(module, x, y, REGULARIZATION)
    reference.matrix = _ggn_matrix(problem)
    torch.testing.assert_close(rescored.scores, reference.up(xn, yn, x, y), rtol=1e-9, atol=1e-12)


def _ggn_matrix(problem):
    from helpers import reference_ggn

    module, (x, y) = problem[0], problem[1]
    ggn = reference_ggn(module, x, y)
    return ggn + REGULARIZATION * torch.eye(len(ggn), dtype=torch.float64)


def test_cg_rescores_over_the_training_data_it_is_given_and_refuses_without(problem, tmp_path):
    (x, y), (xq, yq) = problem[1], problem[2]
    result = _run(problem, tmp_path, "cg", rtol=1e-10)
    loaded = InfluenceResult.load(tmp_path)
    with pytest.raises(ValueError, match=r"saved solver \(cg\) solves with curvature products over the training "
                                         r"data.*pass training_data=.*direct, ekfac, nystroem, or arnoldi"):
        loaded.score_queries(_model(problem), loader(xq, yq))
    rescored = loaded.score_queries(_model(problem), loader(xq, yq), training_data=loader(x, y, batch_size=8))
    torch.testing.assert_close(rescored.scores, result.scores, rtol=1e-12, atol=1e-14)
    indexed = loaded.score_queries(_model(problem), loader(xq, yq), training_data=IndexedData(TensorDataset(x, y)))
    torch.testing.assert_close(indexed.scores, result.scores, rtol=1e-12, atol=1e-14)


def test_refine_steps_need_the_training_data(problem, tmp_path):
    _run(problem, tmp_path, "ekfac", refine=2)
    with pytest.raises(ValueError, match=r"saved solver \(ekfac with refine=2\)"):
        InfluenceResult.load(tmp_path).score_queries(_model(problem), loader(*problem[2]))


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_a_low_precision_store_is_within_its_rounding_bound(problem, tmp_path, dtype):
    """|stored score − exact score| ≤ u · Σⱼ |sⱼ gᵢⱼ| (the bound the module documents), and not far below it."""
    (x, y) = problem[1]
    model = _model(problem)
    store = GradientStore.build(model, TensorDataset(x, y), tmp_path, dtype=dtype, chunk_size=16)
    with model.evaluating():
        exact = stacked_gradients(model, loader(x, y), name="training_data")
    factors = torch.randn(3, exact.shape[1], dtype=torch.float64)
    error = (store.scores(factors) - factors @ exact.T).abs()
    bound = ROUNDOFF[dtype] * (factors.abs() @ exact.abs().T)
    assert bool((error <= bound + 1e-300).all())
    assert float(error.max()) > 0.01 * float(bound.max())  # really stored in that precision
    assert store.dtype == dtype and (store.num_train, store.dim) == (N_TRAIN, exact.shape[1])


def test_gradients_beyond_float16_are_refused(problem, tmp_path):
    x, y = problem[1]
    model = TwiceDifferentiable(problem[0], lambda outputs, targets: 1e7 * F.cross_entropy(outputs, targets))
    with pytest.raises(ValueError, match=r"do not fit store_dtype='float16'.*'bfloat16' or 'float32'"):
        GradientStore.build(model, TensorDataset(x, y), tmp_path, dtype="float16")


class _Failing(Dataset):
    """A dataset that fails at index `fail_at` (None: never), and records which indices were read."""

    def __init__(self, x, y, fail_at=None):
        self.x, self.y, self.fail_at, self.read = x, y, fail_at, set()

    def __len__(self):
        return len(self.x)

    def __getitem__(self, index):
        if index == self.fail_at:
            raise RuntimeError("interrupted")
        self.read.add(index)
        return self.x[index], self.y[index]


def test_an_interrupted_build_resumes_to_the_same_store(problem, tmp_path):
    x, y = problem[1]
    model = _model(problem)
    whole = GradientStore.build(model, TensorDataset(x, y), tmp_path / "whole", chunk_size=8, dtype="float16")
    with pytest.raises(RuntimeError, match="interrupted"):
        GradientStore.build(model, _Failing(x, y, fail_at=27), tmp_path / "resumed", chunk_size=8, dtype="float16")
    with pytest.raises(FileNotFoundError, match="unfinished build.*again with the same arguments"):
        GradientStore.open(tmp_path / "resumed")
    rest = _Failing(x, y)
    resumed = GradientStore.build(model, rest, tmp_path / "resumed", chunk_size=8, dtype="float16")
    assert min(rest.read) == 24  # chunks 0-2 (examples 0-23) were finished and are not recomputed
    for (columns, block), (other_columns, other_block) in zip(whole.blocks(), resumed.blocks(), strict=True):
        assert torch.equal(columns, other_columns) and torch.equal(block, other_block)
    again = GradientStore.build(model, rest, tmp_path / "resumed", chunk_size=8, dtype="float16")
    assert again.train_indices.tolist() == list(range(N_TRAIN))  # a finished store is opened as it is
    with pytest.raises(ResultMismatchError, match="store_dtype: stored 'float16', now 'float32'"):
        GradientStore.build(model, rest, tmp_path / "resumed", chunk_size=8, dtype="float32")


def test_a_changed_model_is_refused(problem, tmp_path):
    _run(problem, tmp_path)
    changed = mlp_model()
    changed.load_state_dict(problem[0].state_dict())
    with torch.no_grad():
        changed[0].weight[0, 0] += 1e-3
    other = TwiceDifferentiable(changed, F.cross_entropy)
    loaded = InfluenceResult.load(tmp_path)
    with pytest.raises(ValueError, match="weights differ from the weights this result was computed with"):
        loaded.score_queries(other, loader(*problem[3]))
    with pytest.raises(ValueError, match="weights differ from the weights the gradient store was computed with"):
        GradientStore.open(tmp_path / "gradients").check_model(other)
    with pytest.raises(ResultMismatchError, match=r"model weights \(parameter hash\)"):
        GradientStore.build(other, TensorDataset(*problem[1]), tmp_path / "gradients", chunk_size=4096)


def test_a_missing_store_or_solver_state_is_refused_saying_what_to_do(problem, tmp_path):
    result = _run(problem, tmp_path / "plain", store=False)
    assert result.solver_state is None and "gradient_store" not in result.metadata
    with pytest.raises(FileNotFoundError, match="no gradient store. Run again with store_gradients=True"):
        InfluenceResult.load(tmp_path / "plain").score_queries(_model(problem), loader(*problem[3]))
    with pytest.raises(FileNotFoundError, match=r"No complete gradient store .* GradientStore.build"):
        InfluenceResult.load(tmp_path / "plain").score_queries(_model(problem), loader(*problem[3]),
                                                               store=tmp_path / "nowhere")
    store = GradientStore.build(_model(problem), TensorDataset(*problem[1]), tmp_path / "store")
    with pytest.raises(ValueError, match="no saved solver state.*store_gradients=True"):
        InfluenceResult.load(tmp_path / "plain").score_queries(_model(problem), loader(*problem[3]), store=store)


def test_a_finished_run_adds_its_store_without_recomputing(problem, tmp_path):
    first = _run(problem, tmp_path, store=False)
    second = _run(problem, tmp_path, store=True)
    assert second.metadata["timings"]["total_seconds"] == first.metadata["timings"]["total_seconds"]  # reused
    assert second.metadata["gradient_store"]["dtype"] == "float64"
    rescored = InfluenceResult.load(tmp_path).score_queries(_model(problem), loader(*problem[2]))
    assert torch.equal(rescored.scores, first.scores)


def test_results_of_format_version_2_still_load(problem, tmp_path):
    folder = _run(problem, tmp_path, store=False).folder
    metadata = json.loads((folder / "metadata.json").read_text())
    (folder / "metadata.json").write_text(json.dumps({**metadata, "format_version": 2}))
    loaded = InfluenceResult.load(folder)
    assert loaded.solver_state is None and loaded.num_train == N_TRAIN


def test_bad_store_options_are_refused(problem, tmp_path):
    with pytest.raises(ValueError, match=r"store_dtype must be one of \['float32', 'float16', 'bfloat16'"):
        InfluenceArguments(store_dtype="int8")
    with pytest.raises(TypeError, match="store_gradients must be True or False"):
        InfluenceArguments(store_gradients="yes")
    with pytest.raises(TypeError, match="store_gradients must be True or False"):
        InfluenceCallback(store_gradients="yes")
    with pytest.raises(ValueError, match="store_dtype must be one of"):
        InfluenceCallback(store_dtype="int8")
    data = TensorDataset(*problem[1])
    with pytest.raises(ValueError, match="dtype must be one of"):
        GradientStore.build(_model(problem), data, tmp_path, dtype="float8")
    with pytest.raises(ValueError, match="chunk_size must be a positive integer"):
        GradientStore.build(_model(problem), data, tmp_path, chunk_size=0)
    with pytest.raises(TypeError, match="model must be a TwiceDifferentiable"):
        GradientStore.build(problem[0], data, tmp_path)
    store = GradientStore.build(_model(problem), data, tmp_path)
    with pytest.raises(ValueError, match=r"factors must have shape \[M, 75\]"):
        store.scores(torch.zeros(2, 3, dtype=torch.float64))


class _ThreadRank(Distribution):
    """Rank `rank` of two threads in this process: barriers and gathers between threads, no process group."""

    def __init__(self, rank: int, barrier: threading.Barrier, posted: list) -> None:
        super().__init__(rank=rank, world_size=2)
        self._barrier, self._posted = barrier, posted

    @contextmanager
    def stage(self, name):
        yield

    def barrier(self) -> None:
        self._barrier.wait(timeout=60)

    def gather_objects(self, value):
        self._posted[self.rank] = value
        self.barrier()
        gathered = list(self._posted)
        self.barrier()
        return gathered


def test_two_shards_are_written_apart_and_read_back_in_global_order(problem, tmp_path):
    """Two ranks (threads standing in for processes) each write their share of every second example, in chunks of
    8, to their own folder; the store reads them back by dataset index."""
    x, y = problem[1]
    barrier, posted, stores = threading.Barrier(2), [None, None], [None, None]

    def build(rank: int) -> None:
        module = mlp_model()
        module.load_state_dict(problem[0].state_dict())
        stores[rank] = GradientStore.build(TwiceDifferentiable(module, F.cross_entropy), TensorDataset(x, y),
                                           tmp_path, chunk_size=8, dtype="float64",
                                           train_indices=list(range(N_TRAIN - 1, -1, -1)),
                                           distribution=_ThreadRank(rank, barrier, posted))

    threads = [threading.Thread(target=build, args=(rank,)) for rank in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    manifest = json.loads((tmp_path / "store.json").read_text())
    assert [shard["folder"] for shard in manifest["shards"]] == ["rank0-of-2", "rank1-of-2"]
    assert [shard["indices"] for shard in manifest["shards"]] == [list(range(39, -1, -2)), list(range(38, -1, -2))]
    assert sorted(path.name for path in (tmp_path / "rank1-of-2").glob("gradients-*.npy")) == [
        "gradients-000000.npy", "gradients-000001.npy", "gradients-000002.npy"]  # 20 examples in chunks of 8
    model = _model(problem)
    with model.evaluating():
        exact = stacked_gradients(model, loader(x, y), name="training_data")
    factors = torch.randn(2, exact.shape[1], dtype=torch.float64)
    for store in stores:
        assert store.train_indices.tolist() == list(range(N_TRAIN))
        torch.testing.assert_close(store.scores(factors), factors @ exact.T, rtol=1e-12, atol=1e-15)


@pytest.mark.slow
def test_two_processes_write_one_shard_each_read_back_in_global_order(tmp_path):
    """A stored run under two gloo processes: each rank's shard (every second example, chunks of 8) in its own
    folder, read back by dataset index, rescoring to the one-process run's scores."""
    from distributed_workers import BATCH, REGULARIZATION as DDP_REGULARIZATION, launch, make_model, store_body
    from helpers import linear_model

    x, y = classification_data(37)
    xq, yq = classification_data(3, seed=1)
    state = fitted(linear_model(), x, y).state_dict()
    torch.save({"x": x, "y": y, "xq": xq, "yq": yq, "state": state}, tmp_path / "problem.pt")
    launch(store_body, (str(tmp_path / "init"), str(tmp_path)), deadline_s=120)
    store = GradientStore.open(tmp_path / "run" / "gradients")
    manifest = json.loads((tmp_path / "run" / "gradients" / "store.json").read_text())
    assert [shard["folder"] for shard in manifest["shards"]] == ["rank0-of-2", "rank1-of-2"]
    assert [shard["indices"] for shard in manifest["shards"]] == [list(range(0, 37, 2)), list(range(1, 37, 2))]
    assert [shard["chunks"] for shard in manifest["shards"]] == [3, 3]  # 19 and 18 examples in chunks of 8
    model = make_model(state)
    with model.evaluating():
        exact = stacked_gradients(model, loader(x, y), name="training_data")
    factors = torch.randn(2, exact.shape[1], dtype=torch.float64)
    assert store.train_indices.tolist() == list(range(37))
    torch.testing.assert_close(store.scores(factors), factors @ exact.T, rtol=1e-12, atol=1e-15)
    arguments = InfluenceArguments(method="direct", hessian_regularization=DDP_REGULARIZATION, batch_size=BATCH)
    alone = compute_influence(model, IndexedData(TensorDataset(x, y)), IndexedData(TensorDataset(xq, yq)),
                              arguments, save_dir=tmp_path / "alone")
    rescored = InfluenceResult.load(tmp_path / "run").score_queries(model, loader(xq, yq))
    torch.testing.assert_close(rescored.scores, alone.scores, rtol=1e-10, atol=1e-13)


def test_the_callback_keeps_a_store_that_rescores_new_queries(tmp_path):
    import pytorch_lightning as pl
    from lit_helpers import Classifier, blobs, loaders, make_trainer

    from lightning_influence import InfluenceCallback

    pl.seed_everything(0, verbose=False)
    callback = InfluenceCallback(method="direct", hessian_regularization=0.1, curvature="ggn", num_queries=3,
                                 store_gradients=True, save_dir=tmp_path / "influence")
    trainer = make_trainer(tmp_path, logger=False, callbacks=[callback], epochs=1)
    x, y = blobs(24)
    xv, yv = blobs(6, seed=1)
    module = Classifier()
    trainer.fit(module, *loaders(x, y, xv, yv))
    assert (tmp_path / "influence" / "gradients" / "store.json").is_file()
    loaded = InfluenceResult.load(tmp_path / "influence")
    assert loaded.metadata["gradient_store"]["dtype"] == "float32"
    model = TwiceDifferentiable(module, F.cross_entropy)
    same = loaded.score_queries(model, loader(xv[:3], yv[:3]), top_k=2)
    torch.testing.assert_close(same.scores, loaded.scores, rtol=1e-5, atol=1e-6)  # float32 model and store
    xn, yn = blobs(7, seed=5)
    new = loaded.score_queries(model, loader(xn, yn), top_k=2)
    assert new.scores.shape == (7, 24) and new.helpful.indices.shape == (7, 2)
    factors = new.factors
    with model.evaluating():
        exact = stacked_gradients(model, loader(x, y), name="training_data")
    torch.testing.assert_close(new.scores, factors @ exact.T, rtol=1e-5, atol=1e-6)
