"""The curvature of the training objective as a linear operator.

H = ∇²θ L(θ) with L(θ) = (1/N) Σᵢ ℓ(zᵢ, θ). A batch b of size B contributes B · ∇²(mean loss of b) to the
sum N·H, so uneven last batches weigh exactly right. Every product is a pass over the training loader,
summed locally, combined by the reducer across processes, then divided by the global N.

Two options replace H by a cheaper or better-behaved curvature, for every inversion method alike:
`curvature="ggn"` takes the generalised Gauss–Newton matrix G = Jᵀ ∇²_f L J (positive semi-definite), and
`block_diagonal=True` keeps only the blocks of one layer's parameters (one block per module owning
parameters), dropping the cross-layer terms: products then cost one product per block, and the direct
method factorises p_b × p_b blocks instead of p × p.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import Tensor

from lightning_influence.checks import Curvature
from lightning_influence.curvature.reducer import LocalReducer, Reducer
from lightning_influence.model.data import batch_size, iterate_batches, loader_length, rebatched
from lightning_influence.model.twice_differentiable import TwiceDifferentiable, check_finite


def parameter_blocks(model: TwiceDifferentiable) -> list[tuple[str, slice]]:
    """The selected parameters grouped by the module that owns them, as (module name, slice of θ), in order; with
    a projection, the projected coordinates grouped the same way."""
    if model.projection is not None:
        return model.projection.blocks()
    blocks: list[tuple[str, slice]] = []
    offset = 0
    for name, numel in zip(model.param_names, model.param_numels):
        owner = name.rpartition(".")[0]
        if blocks and blocks[-1][0] == owner:
            blocks[-1] = (owner, slice(blocks[-1][1].start, offset + numel))
        else:
            blocks.append((owner, slice(offset, offset + numel)))
        offset += numel
    return blocks


class CurvatureOperator:
    """Products with the curvature H of `model` over `training_data` (without damping λ).

    The operator keeps its own bookkeeping: `num_examples` (the global N of the last reduction) and `passes` (over
    the training data so far). Solvers use its public methods only: products (`matmat`, `batch_matmat`, `dense`,
    …), and for a solver that makes its own passes, `batches`, `sum_over_processes`, `count_examples`,
    `reduce_mean` and `count_pass`. Arguments are validated where they enter (`InfluenceArguments`), not here.

    Args:
        model: the functional model and loss.
        training_data: iterable of (inputs, targets) batches; iterated once per product.
        reducer: combines per-process sums (None: this process alone).
        progress: show a progress bar for each pass over the data.
        curvature: ``"hessian"`` (the mean-loss Hessian) or ``"ggn"`` (its generalised Gauss–Newton part).
        block_diagonal: keep only the per-layer diagonal blocks of the curvature.
    """

    def __init__(
        self,
        model: TwiceDifferentiable,
        training_data: Iterable[Any],
        *,
        reducer: Reducer | None = None,
        progress: bool = False,
        curvature: Curvature = "hessian",
        block_diagonal: bool = False,
    ) -> None:
        self._model = model
        self._training_data = training_data
        self._reducer: Reducer = reducer if reducer is not None else LocalReducer()
        self.progress = progress
        self.curvature = curvature
        self.block_diagonal = block_diagonal
        self.blocks = parameter_blocks(model) if block_diagonal else [("", slice(0, model.gradient_dim))]
        self._num_examples: int | None = None
        self._passes = 0

    @property
    def model(self) -> TwiceDifferentiable:
        """The functional model and loss whose curvature this is."""
        return self._model

    @property
    def num_examples(self) -> int | None:
        """N, the number of training examples on all processes together (None before the first pass)."""
        return self._num_examples

    @property
    def passes(self) -> int:
        """Passes over the training data so far, by this operator's products and by solvers (`count_pass`)."""
        return self._passes

    @property
    def num_params(self) -> int:
        """p, the number of selected parameters."""
        return self.model.num_params

    @property
    def gradient_dim(self) -> int:
        """The length of the vectors the curvature acts on: p, or the projection's k (see
        `TwiceDifferentiable.gradient_dim`)."""
        return self.model.gradient_dim

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def distributed(self) -> bool:
        """Whether sums are combined with other processes (whose shards may hold what this one lacks)."""
        return not isinstance(self._reducer, LocalReducer)

    # -- the training data --------------------------------------------------------------------------------
    def batches(self, desc: str, vectors: int | None = None) -> Iterator[tuple[int, Any, Tensor]]:
        """This process's training batches on the model's device (possibly none when distributed: the global
        count is checked after reduction).

        With `vectors`, consecutive loader batches are joined into compute batches sized for products with that
        many vectors (`TwiceDifferentiable.compute_rows`), so a pass costs the same whatever the loader's batch
        size; sums weighted by batch size are unchanged. Without, the loader's own batches come (LiSSA's
        stochastic steps are defined on them).
        """
        batches = iterate_batches(
            self._training_data,
            self.device,
            self.dtype,
            name="training_data",
            progress=self.progress,
            desc=desc,
            allow_empty=self.distributed,
        )
        if vectors is None:
            return batches
        return rebatched(batches, lambda inputs, targets: self.model.compute_rows(inputs, targets, vectors))

    def check(self) -> None:
        """Check the loss on this process's first training batch (see `TwiceDifferentiable.check_second_order`),
        so that a bad loss fails in seconds instead of after a long fit."""
        for _, inputs, targets in self.batches("checking the loss"):
            self.model.check_second_order(inputs, targets)
            return

    def single_batch(self) -> bool:
        """Whether one batch is the whole training set: this process's loader yields one batch, or across
        processes each yields at most one. Collective: every process must call it, and all get the same answer."""
        length = loader_length(self._training_data)
        several = length is None or length > 1 or (length == 0 and not self.distributed)
        return float(self.sum_over_processes(self._scalar(several))) == 0

    def cycle_batches(self, desc: str = "lissa batches") -> Iterator[tuple[Any, Tensor | None]]:
        """Endless (inputs, targets) batches of this process's training data, restarting each epoch.

        A process whose shard holds no batches yields (None, None): it still takes part in every reduced product
        (see `batch_matmat`).
        """
        while True:
            empty = True
            for _, inputs, targets in self.batches(desc):
                empty = False
                yield inputs, targets
            if empty:
                yield None, None

    # -- reductions over the training data ----------------------------------------------------------------
    def sum_over_processes(self, tensor: Tensor) -> Tensor:
        """The sum of every process's `tensor` (this process's share of a sum over training examples)."""
        return self._reducer.sum(tensor)

    def count_examples(self, count: int) -> int:
        """N from this process's `count` of examples, summed over processes and recorded as `num_examples`;
        ValueError when no process holds any."""
        n = int(round(self.sum_over_processes(self._scalar(count)).item()))
        if n == 0:
            raise ValueError("training_data holds no examples on any process.")
        self._num_examples = n
        return n

    def count_pass(self, passes: int = 1) -> None:
        """Record `passes` passes over the training data made by a solver through `batches`."""
        self._passes += passes

    def reduce_mean(self, total: Tensor, count: int, stage: str) -> Tensor:
        """The mean over all N examples of a sum `total` over this process's `count` examples, checked finite
        (`stage` names it in the error); one pass over the data is counted."""
        n = self.count_examples(count)
        total = self.sum_over_processes(total)
        self.count_pass()
        return check_finite(total / n, stage)

    def _scalar(self, value: float) -> Tensor:
        """A float64 scalar on the model's device, for reducing counts and flags across processes."""
        return torch.tensor(float(value), dtype=torch.float64, device=self.device)

    # -- products -----------------------------------------------------------------------------------------
    def _batch_product(self, inputs: Any, targets: Tensor, vectors: Tensor) -> Tensor:
        """One batch's curvature times k vectors; in block-diagonal mode each block's slice of every vector is
        multiplied on its own (k · blocks products in one vectorised call) and only that block's rows kept.
        Always in the model's evaluation settings (eval mode, attention with second derivatives), also when a
        solver is used outside the engine."""
        product = self.model.batch_ggn_vp if self.curvature == "ggn" else self.model.batch_hvp
        with self.model.evaluating():
            if len(self.blocks) == 1:
                return product(inputs, targets, vectors)
            pieces = torch.zeros(len(self.blocks), *vectors.shape, dtype=vectors.dtype, device=vectors.device)
            for position, (_, block) in enumerate(self.blocks):
                pieces[position, :, block] = vectors[:, block]
            products = product(inputs, targets, pieces.flatten(0, 1)).view_as(pieces)
        return torch.cat([products[position, :, block] for position, (_, block) in enumerate(self.blocks)], dim=1)

    def matmat(self, vectors: Tensor) -> Tensor:
        """H V for a block of m vectors, [m, d] → [m, d] (d = `gradient_dim`): one pass over the training data."""
        total = torch.zeros_like(vectors)
        count = 0
        for index, inputs, targets in self.batches("Hessian products", vectors=len(vectors) * len(self.blocks)):
            size = batch_size(inputs)
            product = self._batch_product(inputs, targets, vectors)
            total += size * check_finite(product, "Hessian-vector products", index, inputs=inputs)
            count += size
        return self.reduce_mean(total, count, "Hessian-vector products")

    def matvec(self, vector: Tensor) -> Tensor:
        """H v for one vector of length `gradient_dim`."""
        return self.matmat(vector.unsqueeze(0)).squeeze(0)

    def batch_matmat(self, inputs: Any, targets: Tensor | None, vectors: Tensor) -> Tensor:
        """Hb V with Hb the Hessian of one batch's mean loss (a stochastic estimate of H V).

        Across processes every process passes its own batch (or `inputs=None` when its shard has none) and the
        result is the Hessian of the mean loss over the union of those batches, the same on every process.
        """
        if inputs is None:
            product, size = torch.zeros_like(vectors), 0
        else:
            product = check_finite(self._batch_product(inputs, targets, vectors), "Hessian-vector products")
            size = batch_size(inputs)
        if not self.distributed:
            return product
        count = self.sum_over_processes(self._scalar(size))
        return self.sum_over_processes(size * product) / count.clamp_min(1).item()

    def dense(self) -> Tensor:
        """The explicit curvature H, [d, d] (d = `gradient_dim`), summed batch by batch (zero off the diagonal
        blocks in block-diagonal mode); for small d only."""
        p = self.gradient_dim
        explicit = self.model.batch_ggn if self.curvature == "ggn" else self.model.batch_hessian
        total = torch.zeros(p, p, dtype=self.dtype, device=self.device)
        count = 0
        for index, inputs, targets in self.batches("explicit Hessian", vectors=p):
            size = batch_size(inputs)
            with self.model.evaluating():
                matrix = explicit(inputs, targets)
            total += size * check_finite(matrix, "explicit Hessian", index, inputs=inputs)
            count += size
        if len(self.blocks) > 1:
            kept = torch.zeros(p, p, dtype=torch.bool, device=self.device)
            for _, block in self.blocks:
                kept[block, block] = True
            total = total * kept
        return self.reduce_mean(total, count, "explicit Hessian")

    def diagonal(self, num_probes: int = 32, seed: int = 0) -> Tensor:
        """diag(H): exact (identity probes) when d ≤ num_probes, else Hutchinson's E[v ⊙ Hv] with ±1 probes."""
        p = self.gradient_dim
        if p <= num_probes:
            probes = torch.eye(p, dtype=self.dtype, device=self.device)
            return torch.diagonal(self.matmat(probes)).clone()
        generator = torch.Generator(device="cpu").manual_seed(seed)
        signs = torch.randint(0, 2, (num_probes, p), generator=generator).to(self.device, self.dtype) * 2 - 1
        return (signs * self.matmat(signs)).mean(0)

    def largest_eigenvalue(self, iterations: int = 20, seed: int = 0) -> float:
        """An estimate of the largest-magnitude eigenvalue of H by power iteration (one pass per step)."""
        generator = torch.Generator(device="cpu").manual_seed(seed)
        vector = torch.randn(self.gradient_dim, generator=generator, dtype=torch.float64).to(self.device, self.dtype)
        vector /= vector.norm()
        estimate = 0.0
        for _ in range(iterations):
            product = self.matvec(vector)
            estimate = float(torch.dot(vector, product))
            norm = product.norm()
            if norm == 0:
                return 0.0
            vector = product / norm
        return estimate
