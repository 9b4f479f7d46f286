"""`InfluenceEngine`: the stages of an influence computation, on one process or several.

    query gradients ─► curvature fit ─► factors ─► scores (and perturbations) ─► self-influence

Each stage is one method. The engine is the one place that knows how processes take part: which stages are
collective (the fit, solves whose Hessian products are reduced, self-influence with an iterative method), how
such solves share their right-hand sides, and how processes go through chunks in lockstep. Scoring a shard is
local. Storing and resuming are the caller's (`lightning_influence.storage.runs`); the functional API is the
engine on one process without storage.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor

from lightning_influence.checks import Curvature
from lightning_influence.curvature.operator import CurvatureOperator
from lightning_influence.engine.arguments import InfluenceArguments
from lightning_influence.engine.defaults import resolve, self_influence_rows
from lightning_influence.engine.distribution import Distribution
from lightning_influence.engine.low_rank import (
    LowRankFactors,
    check_layer_form,
    low_rank_factors,
    low_rank_scores,
    rank_structure,
)
from lightning_influence.engine.scoring import (
    gradient_blocks,
    perturbation_scores,
    regrouped,
    self_influences,
    stacked_gradients,
    up_scores,
)
from lightning_influence.engine.trust import solve_record
from lightning_influence.model.data import IndexedData, loader_length
from lightning_influence.model.twice_differentiable import TwiceDifferentiable
from lightning_influence.solvers import InverseHvpResult, Solver, make_solver


class InfluenceEngine:
    """The influence of one model's training data, stage by stage.

    Args:
        model: the functional model and loss.
        training_data: this process's training batches (the whole training set on one process); the curvature
            is fitted over them, summed across processes.
        arguments: the run's options, already validated.
        distribution: the processes taking part (default: this one alone).
        progress: show progress bars.

    With ``arguments.query_rank``, a model whose selected parameters are not all in covered layers is refused
    here, and one whose layer form fails (the logits unknown, a layer used twice) on the first training example
    when fitting starts, before any pass over the training data.
    """

    def __init__(
        self,
        model: TwiceDifferentiable,
        training_data: Iterable[Any],
        arguments: InfluenceArguments,
        *,
        distribution: Distribution | None = None,
        progress: bool = False,
    ) -> None:
        if not isinstance(model, TwiceDifferentiable):
            raise TypeError(
                f"model must be a TwiceDifferentiable, got {type(model).__name__}; wrap a module as "
                "TwiceDifferentiable(module, loss_fn)."
            )
        self.model = model
        self.training_data = training_data
        self.arguments = arguments
        self.distribution = distribution if distribution is not None else Distribution()
        self.progress = progress
        self._solver: Solver | None = None  # chosen and fitted by `fit`
        self._structure = rank_structure(model) if arguments.query_rank is not None else None
        self._low_rank: tuple[Tensor, LowRankFactors] | None = None  # the factors last cut to rank, and their cut
        #: What each self-influence solve reported (`trust.solve_record`), until `take_solve_records`.
        self.solve_records: list[dict[str, Any]] = []

    # ---------------------------------------------------------------------------------------- stage 1: queries
    def query_gradients(self, query_data: IndexedData, query_indices: Sequence[int]) -> Tensor:
        """Per-example gradients [M, p] of the queries at `query_indices`, in that order, on every process.

        Each process computes the share `Distribution.shard` gives it; the shares are gathered.
        """
        positions = self.distribution.shard(range(len(query_indices)))
        if positions:
            mine = [query_indices[i] for i in positions]
            rhs = self.gradients(query_data.loader(mine, self.arguments.batch_size), name="query_data")
        else:
            rhs = torch.zeros(0, self.model.gradient_dim, dtype=self.model.dtype, device=self.model.device)
        if not self.distribution.is_distributed:
            return rhs
        return self.distribution.gather_rows_by_index(rhs, torch.tensor(positions, dtype=torch.long))[0]

    def gradients(self, data: Iterable[Any], *, name: str) -> Tensor:
        """All per-example gradients of a (query-sized) loader on this process, [n, p]."""
        with self.model.evaluating():
            return stacked_gradients(self.model, data, name=name, progress=self.progress)

    # ---------------------------------------------------------------------------------------- stage 2: curvature
    def fit(self) -> Solver:
        """The solver fitted to (H + λI) over the training data, with every "auto" option resolved
        (`engine.defaults`, the choices and their reasons in its info under "choices"); collective, and done
        once per engine."""
        if self._solver is None:
            if self._structure is not None:
                check_layer_form(self.model, self._structure, self.training_data)
            with self.model.evaluating():
                choices = resolve(self.model, self.arguments, self._operator)
                solver = make_solver(choices.method, **choices.method_kwargs)
                solver.fit(choices.operator, choices.regularization, self.arguments.on_negative_curvature)
                solver.fit_info["choices"] = choices.record(solver)
            self._solver = solver
        return self._solver

    def _operator(self, curvature: Curvature) -> CurvatureOperator:
        return CurvatureOperator(self.model, self.training_data, reducer=self.distribution.reducer,
                                 progress=self.progress, curvature=curvature,
                                 block_diagonal=self.arguments.block_diagonal)

    @property
    def is_fitted(self) -> bool:
        return self._solver is not None

    # ---------------------------------------------------------------------------------------- stage 3: factors
    def factors(self, rhs: Tensor) -> InverseHvpResult:
        """s = (H + λI)⁻¹ g for every row of `rhs` [M, p], the same block on every process; the result on every
        process. Solvers whose solves make reduced passes solve the whole block everywhere; the others solve a
        share of the rows each, then gather."""
        solver = self.fit()
        with self.model.evaluating():
            if not self.distribution.is_distributed or solver.collective_solve:
                return solver.solve(rhs)
            positions = self.distribution.shard(range(rhs.shape[0]))
            mine = rhs[positions]
            local = solver.solve(mine) if positions else InverseHvpResult(mine.clone(), {})
        rows, _ = self.distribution.gather_rows_by_index(local.x, torch.tensor(positions, dtype=torch.int64))
        return InverseHvpResult(rows, local.info)

    # ---------------------------------------------------------------------------------------- stage 4: scores
    def scores(self, data: Iterable[Any], factors: Tensor) -> Tensor:
        """I_up of every example of `data` on every query, [M, n] in loader order ([M, 0] for an empty shard).
        Local: processes may finish at different times."""
        if loader_length(data) == 0:
            return factors.new_zeros(factors.shape[0], 0)
        if self._structure is None:
            return up_scores(self.model, data, factors, progress=self.progress)
        return low_rank_scores(self.model, self._structure, data, self._cut(factors), progress=self.progress)

    def perturbations(self, data: Iterable[Any], factors: Tensor) -> Tensor:
        """I_pert = ∇ₓ I_up of every example of a non-empty `data`, [M, n, *x_shape]; with ``query_rank``, of the
        rank-r I_up (the factors reconstructed from their cut). Local."""
        if self._structure is not None:
            factors = self._structure.from_matrices(self._cut(factors).blocks())
        return perturbation_scores(self.model, data, factors, progress=self.progress)

    def _cut(self, factors: Tensor) -> LowRankFactors:
        """`factors` cut to ``query_rank`` layer by layer, computed once for the factors every chunk is scored with."""
        if self._low_rank is None or self._low_rank[0] is not factors:
            cut = low_rank_factors(self._structure, factors, self.arguments.query_rank)  # type: ignore[arg-type]
            self._low_rank = (factors, cut)
        return self._low_rank[1]

    # ---------------------------------------------------------------------------------------- stage 5: self
    def self_influences(self, data: Iterable[Any]) -> Tensor:
        """⟨(H + λI)⁻¹ ∇ℓ(zᵢ), ∇ℓ(zᵢ)⟩ of every example of `data` (this process's, possibly none), [n].

        A solver that makes passes over the training data solves for blocks of many examples at once
        (`self_influence_rows`), so that each pass serves all of them."""
        solver = self.fit()
        rows = self_influence_rows(self.model, solver, self.arguments.max_memory)
        if self._solves_together():  # each round solves every process's block: the budget is shared
            return self._self_influences_in_rounds(data, max(1, (rows or 1) // self.distribution.world_size))
        if loader_length(data) == 0:
            return torch.zeros(0, dtype=self.model.dtype, device=self.model.device)
        return self_influences(self.model, data, lambda block: self._recorded(block, *solver.quadratic_forms(block)),
                               rows=rows, progress=self.progress)

    def _self_influences_in_rounds(self, data: Iterable[Any], rows: int | None) -> Tensor:
        """Self-influence with a collective solver: processes go block round by block round, solving the union
        of their blocks together, until every one has run out; a process without a block joins with none."""
        empty = torch.zeros(0, self.model.gradient_dim, dtype=self.model.dtype, device=self.model.device)
        values = [empty.new_zeros(0)]
        with self.model.evaluating():
            blocks = iter(()) if loader_length(data) == 0 else regrouped(gradient_blocks(
                self.model, data, name="training_data", progress=self.progress), rows)
            while True:
                block = next(blocks, None)
                if not self.distribution.any_process(block is not None):
                    return torch.cat(values)
                block = empty if block is None else block
                gathered, lengths = self.distribution.gather_rows_with_lengths(block)
                start = sum(lengths[: self.distribution.rank])
                if gathered.shape[0]:
                    forms, result = self.fit().quadratic_forms(gathered)
                    mine = slice(start, start + block.shape[0])
                    values.append(self._recorded(block, forms[mine], InverseHvpResult(result.x[mine], result.info)))

    def _recorded(self, rhs: Tensor, values: Tensor, result: InverseHvpResult) -> Tensor:
        """`values`, once what the solve of `rhs` reported and the bounds its solution keeps are noted in
        `solve_records`."""
        if rhs.shape[0]:
            self.solve_records.append(solve_record(rhs, result.x, result.info, self.arguments.curvature))
        return values

    def take_solve_records(self) -> list[dict[str, Any]]:
        """The records of the self-influence solves since the last call (one chunk's), leaving none."""
        records, self.solve_records = self.solve_records, []
        return records

    # ---------------------------------------------------------------------------------------- lockstep
    def _solves_together(self) -> bool:
        """Whether every process must take part in each solve (reduced Hessian products in `solve`); False
        before the fit, which every process joins when any has work (`prepare_self_influence`)."""
        return self.distribution.is_distributed and self._solver is not None and self._solver.collective_solve

    def prepare_self_influence(self, work_left: bool) -> None:
        """Fit before self-influence if any process still has self-influence work: fitting is collective, so
        every process must join it even when its own chunks are finished (collective)."""
        if self.distribution.any_process(work_left):
            self.fit()

    def chunk_rounds(self, stage: str, todo: Sequence[int], num_positions: int) -> Iterator[int | None]:
        """The chunk numbers this process computes for `stage`, in order.

        Self-influence with a collective solver goes in lockstep: every process steps through the same
        `num_positions` chunk positions, yielding None where it has no chunk left (it joins with an empty one),
        and positions no process needs are skipped. Other stages are local and yield `todo` as it is.
        """
        if stage != "self_influence" or not self._solves_together():
            yield from todo
            return
        pending = set(todo)
        for position in range(num_positions):
            mine = position in pending
            if self.distribution.any_process(mine):
                yield position if mine else None
