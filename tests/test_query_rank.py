"""Low-rank queries (`query_rank=r`) against today's scores and against the definition: each layer block of every
factor cut by SVD, scored with full per-example gradients, in float64."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lit_helpers import Classifier, blobs, loaders, make_trainer
from lightning_influence import (
    InfluenceCallback,
    TwiceDifferentiable,
    compute_influence_factors,
    compute_influences,
    compute_influences_pert,
    compute_influences_up,
)
from lightning_influence.engine import low_rank
from lightning_influence.engine.arguments import InfluenceArguments
from lightning_influence.engine.engine import InfluenceEngine
from lightning_influence.engine.low_rank import low_rank_factors, low_rank_scores, rank_structure, truncated_factors
from lightning_influence.storage.runs import run_identity

VOCABULARY = 7


class Sequence(nn.Module):
    """A Linear layer on [B, T, d] inputs (a sequence), mean pool, head."""

    def __init__(self) -> None:
        super().__init__()
        self.inner, self.head = nn.Linear(4, 6), nn.Linear(6, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.tanh(self.inner(x)).mean(1))


class Bag(nn.Module):
    """nn.Embedding (padding_idx 0) on token sequences, mean pool, a Linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.emb, self.head = nn.Embedding(VOCABULARY, 4, padding_idx=0), nn.Linear(4, 3)

    def forward(self, tokens: Tensor) -> Tensor:
        return self.head(self.emb(tokens).mean(1))


def problem(kind: str) -> tuple[nn.Module, DataLoader]:
    """A float64 model of `kind` and a loader of 20 examples (loader batches of 8) with 3 classes."""
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(1)
    y = torch.randint(0, 3, (20,), generator=generator)
    if kind == "mlp":
        module = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3))
        x = torch.randn(20, 5, generator=generator)
    elif kind == "conv":
        module = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(3 * 36, 3))
        x = torch.randn(20, 1, 6, 6, generator=generator)
    elif kind == "embedding":
        module = Bag()
        x = torch.randint(0, VOCABULARY, (20, 5), generator=generator)
    else:
        module = Sequence()
        x = torch.randn(20, 5, 4, generator=generator)
    x = x.double() if x.is_floating_point() else x
    return module.double(), DataLoader(TensorDataset(x, y), batch_size=8)


def random_factors(model: TwiceDifferentiable, queries: int = 4) -> Tensor:
    return torch.randn(queries, model.num_params, generator=torch.Generator().manual_seed(2), dtype=torch.float64)


@pytest.fixture(params=["auto", "fused", "dense"])
def order(request, monkeypatch):
    """Each layer scored in the order the cost model picks, or always in one of the two orders."""
    if request.param != "auto":
        monkeypatch.setattr(low_rank, "fused_is_cheaper", lambda *sizes: request.param == "fused")
    return request.param


@pytest.mark.parametrize("kind", ["mlp", "conv", "embedding", "sequence"])
def test_full_rank_equals_todays_scores(kind, order):
    module, data = problem(kind)
    model = TwiceDifferentiable(module, F.cross_entropy)
    factors = random_factors(model)
    today = compute_influences_up(model, data, factors)
    full = compute_influences_up(model, data, factors, query_rank=1000)
    torch.testing.assert_close(full, today, rtol=1e-10, atol=1e-10)


def reference_scores(model: TwiceDifferentiable, data: DataLoader, factors: Tensor, rank: int) -> Tensor:
    """The definition: every layer block cut to its `rank` largest singular triplets, back to flat vectors, and
    contracted with per-example gradients from torch.func (the vmap path)."""
    structure = rank_structure(model)
    cut = []
    for block in structure.to_matrices(factors):
        u, sigma, vh = torch.linalg.svd(block, full_matrices=False)
        cut.append(u[:, :, :rank] @ torch.diag_embed(sigma[:, :rank]) @ vh[:, :rank])
    gradients = torch.cat([model.grad(x, y) for x, y in data])
    return structure.from_matrices(cut) @ gradients.T


@pytest.mark.parametrize("kind", ["mlp", "conv", "embedding", "sequence"])
def test_low_rank_equals_the_truncated_blocks_scored_with_full_gradients(kind, order):
    module, data = problem(kind)
    model = TwiceDifferentiable(module, F.cross_entropy)
    factors, rank = random_factors(model), 2
    expected = reference_scores(model, data, factors, rank)
    assert (expected - compute_influences_up(model, data, factors)).abs().max() > 1e-3  # the cut changes scores
    torch.testing.assert_close(compute_influences_up(model, data, factors, query_rank=rank), expected)
    structure = rank_structure(model)
    stored = torch.cat([model.grad(x, y) for x, y in data])  # what a gradient store would hold
    torch.testing.assert_close(truncated_factors(structure, factors, rank) @ stored.T, expected)


def test_a_small_memory_budget_scores_queries_in_pieces_with_the_same_values(monkeypatch):
    module, data = problem("sequence")
    model = TwiceDifferentiable(module, F.cross_entropy)
    factors = random_factors(model, queries=5)
    monkeypatch.setattr(low_rank, "fused_is_cheaper", lambda *sizes: True)
    small = TwiceDifferentiable(module, F.cross_entropy, max_memory=4 * 8 * model.num_params)
    structure = rank_structure(model)
    cut = low_rank_factors(structure, factors, 2)
    torch.testing.assert_close(low_rank_scores(small, structure, data, cut),
                               low_rank_scores(model, structure, data, cut), rtol=1e-12, atol=1e-12)


def test_compute_influences_with_query_rank_scores_the_cut_factors_and_their_perturbations():
    module, data = problem("mlp")
    model = TwiceDifferentiable(module, F.cross_entropy)
    solved = compute_influence_factors(model, data, data, "direct", hessian_perturbation=0.1, curvature="ggn").x
    options = dict(test_data=data, inversion_method="direct", hessian_regularization=0.1, curvature="ggn",
                   query_rank=2)
    torch.testing.assert_close(compute_influences(model, data, **options), reference_scores(model, data, solved, 2))
    pert = compute_influences(model, data, **options, influence_type="perturbation")
    cut = truncated_factors(rank_structure(model), solved, 2)
    torch.testing.assert_close(pert, compute_influences_pert(model, data, cut))
    torch.testing.assert_close(pert, compute_influences_pert(model, data, solved, query_rank=2))


def test_the_callback_saves_query_rank_with_the_result_and_in_the_run_identity(tmp_path):
    callback = InfluenceCallback(method="direct", hessian_regularization=0.1, num_queries=3, query_rank=2,
                                 save_dir=tmp_path / "influence", top_k=2, batch_size=2)  # chunks of 16 examples
    x, y = blobs(24)
    module = Classifier()
    make_trainer(tmp_path, logger=False, callbacks=[callback], epochs=1).fit(module, *loaders(x, y, *blobs(6, seed=1)))
    result = callback.result
    assert result.metadata["query_rank"] == 2 and run_identity(result.metadata)["query_rank"] == 2
    model = TwiceDifferentiable(module, F.cross_entropy)
    expected = compute_influences_up(model, DataLoader(TensorDataset(x, y), batch_size=5), result.factors,
                                     query_rank=2)
    torch.testing.assert_close(result.scores, expected, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(result.score(model, DataLoader(TensorDataset(x, y), batch_size=7)), expected)


def test_the_callback_refuses_uncovered_parameters_before_training(tmp_path):
    callback = InfluenceCallback(method="direct", query_rank=2, save_dir=tmp_path / "influence")
    trainer = make_trainer(tmp_path, logger=False, callbacks=[callback], epochs=1)
    x, y = blobs(24)
    with pytest.raises(ValueError, match=r"net\.1\.weight \(BatchNorm1d\).*params=.*query_rank=None"):
        trainer.fit(Classifier(batchnorm=True), *loaders(x, y, *blobs(6, seed=1)))
    assert trainer.global_step == 0


@pytest.mark.parametrize("value", [0, -3, 2.5, True, "8"])
def test_bad_query_ranks_are_refused_where_they_enter(value):
    message = f"query_rank must be a positive integer, got {value!r}"
    with pytest.raises(ValueError, match=message):
        InfluenceArguments(query_rank=value)
    with pytest.raises(ValueError, match=message):
        InfluenceCallback(query_rank=value)
    module, data = problem("mlp")
    model = TwiceDifferentiable(module, F.cross_entropy)
    with pytest.raises(ValueError, match=message):
        compute_influences_up(model, data, random_factors(model), query_rank=value)


class Untouchable:
    """Training data that fails the test if anything reads it."""

    def __iter__(self):
        raise AssertionError("the training data was read")

    def __len__(self) -> int:
        return 1


def test_parameters_outside_the_covered_layers_are_refused_before_the_training_data_is_read():
    module = nn.Sequential(nn.Linear(5, 8), nn.LayerNorm(8), nn.Linear(8, 3)).double()
    model = TwiceDifferentiable(module, F.cross_entropy)
    with pytest.raises(ValueError, match=r"'1\.weight \(LayerNorm\)'.*params=\['0\.weight', '0\.bias', '2\.weight', "
                                         r"'2\.bias'\].*query_rank=None"):
        InfluenceEngine(model, Untouchable(), InfluenceArguments(method="direct", query_rank=4))
    covered = TwiceDifferentiable(module, F.cross_entropy, params=["0.*", "2.*"])
    InfluenceEngine(covered, Untouchable(), InfluenceArguments(method="direct", query_rank=4))  # accepted


class DictOutput(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Linear(5, 3)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        return {"logits": self.net(x)}


def test_a_model_output_without_known_logits_is_refused_before_the_curvature_fit():
    torch.manual_seed(0)
    module = DictOutput().double()
    loss = lambda out, y: F.cross_entropy(out["logits"], y)  # noqa: E731
    x, y = blobs(12)
    data = DataLoader(TensorDataset(x.double(), y), batch_size=4)
    model = TwiceDifferentiable(module, loss)
    engine = InfluenceEngine(model, data, InfluenceArguments(method="direct", query_rank=2))
    with pytest.raises(ValueError, match="query_rank scores layer by layer.*output_transform="):
        engine.fit()
    assert not engine.is_fitted
    with pytest.raises(ValueError, match="output_transform="):
        compute_influences(model, data, inversion_method="direct", query_rank=2)
    picked = TwiceDifferentiable(module, loss, output_transform="logits")
    factors = random_factors(picked)
    torch.testing.assert_close(compute_influences_up(picked, data, factors, query_rank=3),
                               compute_influences_up(picked, data, factors), rtol=1e-10, atol=1e-10)


def test_each_layer_is_scored_in_the_order_with_fewer_multiply_adds():
    queries, rank = 100, 32
    assert low_rank.fused_is_cheaper(queries, 1, rank, 512, 513, tokens=False)  # an MLP layer: 8x fewer
    assert not low_rank.fused_is_cheaper(queries, 64, rank, 256, 257, tokens=False)  # 64 positions: the block wins
    assert low_rank.fused_is_cheaper(queries, 64, rank, 256, 30_000, tokens=True)  # tokens: a look-up per position
