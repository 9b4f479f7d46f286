"""Across processes: sharding by dataset index, uneven and empty shards, gathering, failures on one rank, and the
same numbers as one process (functional API under a two-process gloo group)."""

from __future__ import annotations

import pytest
import torch
from distributed_workers import BATCH, LISSA, METHODS, REGULARIZATION, functional_body, launch, make_model
from helpers import classification_data, fitted, linear_model, loader

from lightning_influence import compute_influence_factors, compute_influences_up, compute_self_influences, fit_solver
from lightning_influence.engine.distribution import Distribution
from lightning_influence.engine.scoring import stacked_gradients

N_TRAIN, N_QUERIES = 37, 5  # odd on purpose: two shards of 19 and 18; queries split 3 and 2


def test_shard_is_disjoint_and_complete_for_any_size():
    for n in (0, 1, 2, 5, 37):
        for world in (1, 2, 3, 8):
            shards = [Distribution(rank=r, world_size=world).shard(range(n)) for r in range(world)]
            flat = sorted(i for shard in shards for i in shard)
            assert flat == list(range(n))
            assert max(map(len, shards)) - min(map(len, shards)) <= 1


def test_local_gather_sorts_by_index_and_refuses_duplicates():
    local = Distribution()
    values = torch.arange(12.0).reshape(2, 6)
    indices = torch.tensor([5, 0, 3, 1, 4, 2])
    gathered, order = local.gather_by_index(values, indices)
    assert order.tolist() == [0, 1, 2, 3, 4, 5]
    assert gathered[0].tolist() == [1.0, 3.0, 5.0, 2.0, 4.0, 0.0]
    with pytest.raises(ValueError, match=r"scored more than once.*DistributedSampler"):
        local.gather_by_index(values, torch.tensor([0, 1, 2, 2, 3, 4]))
    with pytest.raises(ValueError, match="one dataset index per row"):
        local.gather_by_index(values, torch.tensor([0, 1]))


def test_local_distribution_pays_nothing():
    local = Distribution()
    assert not local.is_distributed and local.is_global_zero
    tensor = torch.ones(3)
    assert local.reducer.sum(tensor) is tensor
    rows = torch.randn(4, 2)
    assert local.all_gather_rows(rows) is rows
    with local.stage("anything"):
        pass
    with pytest.raises(KeyError):  # one process: the error itself, not a wrapper
        with local.stage("anything"):
            raise KeyError("x")


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory):
    """One spawn of two gloo processes running every functional case, and the one-process answers."""
    directory = tmp_path_factory.mktemp("functional")
    x, y = classification_data(N_TRAIN)
    xq, yq = classification_data(N_QUERIES, seed=1)
    state = fitted(linear_model(), x, y).state_dict()
    torch.save({"x": x, "y": y, "xq": xq, "yq": yq, "state": state}, directory / "problem.pt")
    launch(functional_body, (str(directory / "init"), str(directory)), deadline_s=150)
    ranks = [torch.load(directory / f"rank{r}.pt") for r in range(2)]
    model = make_model(state)
    train_loader, query_loader = loader(x, y, N_TRAIN), loader(xq, yq, BATCH)  # one batch: a different sum order
    reference = {}
    for method, options in METHODS:
        solver = fit_solver(model, train_loader, method, hessian_regularization=REGULARIZATION, **options)
        factors = compute_influence_factors(
            model, train_loader, query_loader, method, hessian_perturbation=REGULARIZATION, **options
        ).x
        reference[method] = {
            "factors": factors,
            "scores": compute_influences_up(model, train_loader, factors),
            "self": compute_self_influences(model, train_loader, solver),
        }
    lissa = fit_solver(model, loader(x, y, 2 * BATCH), "lissa", hessian_regularization=REGULARIZATION, **LISSA)
    with pytest.warns(RuntimeWarning, match="lissa did not reach"):  # a fixed number of steps on purpose
        reference["lissa"] = lissa.solve(stacked_gradients(model, loader(xq, yq, 1), name="queries")).x
    full_batch = fit_solver(model, train_loader, "lissa", hessian_regularization=REGULARIZATION, maxiter=40,
                            rtol=1e-30)
    with pytest.warns(RuntimeWarning, match="lissa did not reach"):  # a fixed number of steps on purpose
        reference["lissa_one_batch"] = full_batch.solve(stacked_gradients(model, loader(xq, yq, 1), name="q")).x
    return ranks, reference


@pytest.mark.parametrize("case", ["strided", "empty"])
@pytest.mark.parametrize("method", [method for method, _ in METHODS])
def test_two_gloo_processes_give_the_one_process_answer(two_process_run, case, method):
    ranks, reference = two_process_run
    expected = reference[method]
    for rank, results in enumerate(ranks):
        key = f"{case}/{method}"
        assert results["rank"] == rank and results["world_size"] == 2
        assert results[f"{key}/N"] == N_TRAIN  # global count: no example missing or counted twice
        assert results[f"{key}/indices"].tolist() == list(range(N_TRAIN))
        assert results[f"{key}/self_indices"].tolist() == list(range(N_TRAIN))
        torch.testing.assert_close(results[f"{key}/plain_factors"], expected["factors"], rtol=1e-7, atol=1e-9)
        torch.testing.assert_close(results[f"{key}/factors"], expected["factors"], rtol=1e-7, atol=1e-9)
        torch.testing.assert_close(results[f"{key}/scores"], expected["scores"], rtol=1e-7, atol=1e-9)
        torch.testing.assert_close(results[f"{key}/self"], expected["self"], rtol=1e-7, atol=1e-9)
    # Every rank holds the same gathered result.
    torch.testing.assert_close(ranks[0][f"{case}/{method}/scores"], ranks[1][f"{case}/{method}/scores"])


def test_lissa_steps_on_the_union_of_the_ranks_batches(two_process_run):
    ranks, reference = two_process_run
    for results in ranks:
        torch.testing.assert_close(results["lissa/factors"], reference["lissa"], rtol=1e-9, atol=1e-12)


def test_lissa_takes_the_same_branch_on_every_rank(two_process_run):
    ranks, reference = two_process_run
    for results in ranks:  # one batch per rank: the whole training set each step, accelerated like one process
        torch.testing.assert_close(results["lissa_one_batch_each/factors"], reference["lissa_one_batch"],
                                   rtol=1e-7, atol=1e-10)
    # Two batches on rank 0, one on rank 1: neither accelerates alone (which would leave the other waiting).
    torch.testing.assert_close(ranks[0]["lissa_uneven_batches/factors"], ranks[1]["lissa_uneven_batches/factors"],
                               rtol=0, atol=0)
    assert torch.isfinite(ranks[0]["lissa_uneven_batches/factors"]).all()


def test_a_failure_on_one_rank_raises_on_every_rank(two_process_run):
    ranks, _ = two_process_run
    for results in ranks:
        assert "'scoring' failed on rank(s) [1]" in results["local_failure"]
        assert "ValueError in stage 'scoring': a broken batch on rank 1" in results["local_failure"]
        # Rank 0 failed while writing; rank 1 waited at a barrier and was told instead of waiting for ever.
        assert "failed on rank(s) [0]" in results["barrier_failure"]
        assert "OSError in stage 'writing': disk full" in results["barrier_failure"]
        # Rank 0 was inside an all-reduce when rank 1 failed: released by the 3 s timeout, not left hanging.
        assert "'inversion' failed on rank(s)" in results["collective_failure"]
        assert "out of memory on rank 1" in results["collective_failure"]
        assert results["collective_failure_seconds"] < 20
    assert "[0, 1]" in ranks[0]["collective_failure"]  # rank 0 reports its own timeout too



def test_a_distribution_destroys_the_groups_it_created(two_process_run):
    ranks, _ = two_process_run
    assert all(results["groups_destroyed"] for results in ranks)
