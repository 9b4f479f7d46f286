"""A functional view of a module and its loss: per-example gradients, Hessian products, mixed derivatives.

Parameters chosen for influence are handled as one flat vector θ ∈ ℝᵖ (the selected parameters in module
order, each flattened); the other parameters and the buffers are held fixed. Every derivative is taken with
`torch.func` on `functional_call`, so a batch is one vectorised call, never a loop over examples.
"""

from __future__ import annotations

import contextlib
import fnmatch
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, jvp, vjp, vmap
from torch.utils._pytree import tree_flatten, tree_map

from lightning_influence.checks import flag, parameter_patterns, parse_memory, positive_int
from lightning_influence.errors import LayerFormError, NonFiniteError, is_out_of_memory
from lightning_influence.model.attention import second_order_attention
from lightning_influence.model.data import BatchSpan, batch_size, slice_batch
from lightning_influence.model.layers import LayerStructure
from lightning_influence.model.loss import loss_identity, summed_over_batch
from lightning_influence.model.outputs import OutputTransform, OutputTransformLike, Path, get_at, replace_at
from lightning_influence.model.projection import Projection, check_projection_options

LossFn = Callable[[Any, Tensor], Tensor]

#: The working memory of one vectorised call when the model has no `max_memory`: compute batches are sized to
#: it, whatever the loader's batch size (see `TwiceDifferentiable.compute_rows`).
DEFAULT_COMPUTE_MEMORY = 2**30
#: [rows, p] copies that a block of lifted vectors takes in a projected curvature product (the lifted block, its
#: product, and the working copies of the vectorised call), for sizing those blocks.
LIFTED_COPIES = 4

#: (exception type, message fragment) of the errors torch 2.13 raises where forward-mode AD has no formula for an
#: op, so that the same product by reverse passes alone may still work.
FORWARD_MODE_GAPS: tuple[tuple[type[Exception], str], ...] = (
    # An op without a forward derivative: "Trying to use forward AD with huber_loss_backward that does not support
    # it because it has not been implemented yet" (or "... because it is an out= function").
    (NotImplementedError, "Trying to use forward AD with"),
    # A custom autograd.Function without a jvp staticmethod.
    (NotImplementedError, "to use it with forward mode AD"),
    # The same Function under vmap (a batch's loss is the mean of its examples' losses, vmapped over them): its
    # generated vmap rule fails on the missing tangent with this assertion.
    (AssertionError, "flat_bdims must not be None"),
    # F.mse_loss: the forward derivative of its backward writes into an immutable zero tensor.
    (RuntimeError, "ZeroTensors are immutable"),
)


def forward_mode_unsupported(error: BaseException) -> bool:
    """Whether `error` says that forward-mode AD lacks a formula for an op of the model or loss (see
    `FORWARD_MODE_GAPS`), the one failure a switch to reverse mode can fix; never an out-of-memory error."""
    if is_out_of_memory(error):
        return False
    return any(isinstance(error, kind) and fragment in str(error) for kind, fragment in FORWARD_MODE_GAPS)


def select_parameters(module: nn.Module, params: str | Sequence[str] | None) -> list[str]:
    """Names of the trainable parameters chosen by `params`: exact names or glob patterns, None for all."""
    trainable = [name for name, p in module.named_parameters() if p.requires_grad]
    patterns = parameter_patterns(params)
    if patterns is None:
        chosen = trainable
    else:
        unmatched = [pat for pat in patterns if not any(fnmatch.fnmatchcase(n, pat) for n in trainable)]
        if unmatched:
            raise ValueError(
                f"params {unmatched} match no trainable parameter; the module's trainable parameters are "
                f"{trainable}."
            )
        chosen = [n for n in trainable if any(fnmatch.fnmatchcase(n, pat) for pat in patterns)]
    if not chosen:
        raise ValueError(
            "The module has no trainable parameters to compute influence for (all have requires_grad=False)."
        )
    return chosen


class TwiceDifferentiable:
    """A module and a loss seen as functions of the selected parameters θ.

    Args:
        module: the trained model; its own device and dtype are used. Attention runs on kernels with second
            derivatives during influence passes (see `evaluating`).
        loss_fn: ``loss_fn(outputs, targets)`` returning the scalar mean loss of a batch, such as
            ``torch.nn.functional.cross_entropy``; ``outputs`` is exactly what the module returns (a tensor, tuple,
            dict or dataclass). The per-example loss ℓ is this function on a batch of one, and the training
            objective is (1/N) Σᵢ ℓ(zᵢ): where the output's logits f are known (a tensor output, or
            ``output_transform``), a batch's loss is taken as the mean of its examples' ℓ, so that a loss that
            averages over tokens (padding excluded) counts each sequence once; else as ``loss_fn`` on the batch.
        params: names or glob patterns (``"fc.*"``) of the parameters to differentiate; None for all trainable.
        chunk_size: examples per vectorised chunk in per-example computations (None: the whole batch). Smaller
            bounds memory without changing results.
        max_memory: bytes (or a string such as ``"2GB"``) for the per-example blocks that scoring holds at once:
            every vectorised call takes as many examples as fit (`compute_rows`), and result chunks are sized to
            fit (see `compute_influence`). Results are unchanged; None: `DEFAULT_COMPUTE_MEMORY` per call.
        layer_gradients: form per-example gradients as per-layer outer products δ aᵀ (one batched forward and
            reverse pass) when every selected parameter belongs to a layer that `LayerStructure` covers (nn.Linear,
            nn.Conv2d, nn.Embedding, nn.MultiheadAttention's projections) used once per forward and the logits
            are known; False always uses the vmap path. Both give the same values to float tolerance.
        output_transform: picks the logits f from the module's output for what needs the loss as a function of one
            tensor (``curvature="ggn"``, EK-FAC, the per-layer gradient path): None (the output is a tensor), a
            key or attribute name (``"logits"``), an index (``"0"``), a dotted path to a function, or a callable
            returning a tensor the output holds. The loss of f is ``loss_fn`` on the output with f put back, so
            it must depend on the output only through f (see `lightning_influence.model.outputs`).
        projection_dim: compress every gradient to about this many numbers per layer with seeded
            Kronecker-structured random projections (see `lightning_influence.model.projection`); per-example
            gradients, curvature products, every inversion method and the scores then work with vectors of length
            `gradient_dim` = k instead of p, and the p-dimensional per-example gradient is never formed. Needs every
            selected parameter in a layer `LayerStructure` covers, used once per forward. A layer with at most
            that many weights is kept exactly. None: no projection.
        projection_seed: the seed of the projections (each layer's derived from it and the layer's name).
        projection: the projections' entries: "gaussian" or "sparse" (±1 and 0, scaled).
    """

    def __init__(
        self,
        module: nn.Module,
        loss_fn: LossFn,
        params: str | Sequence[str] | None = None,
        *,
        chunk_size: int | None = None,
        max_memory: int | str | None = None,
        layer_gradients: bool = True,
        output_transform: OutputTransformLike = None,
        projection_dim: int | None = None,
        projection_seed: int = 0,
        projection: str = "gaussian",
    ) -> None:
        if not isinstance(module, nn.Module):
            raise TypeError(f"module must be a torch.nn.Module, got {type(module).__name__}.")
        if not callable(loss_fn):
            raise TypeError(f"loss_fn must be callable as loss_fn(outputs, targets), got {loss_fn!r}.")
        self.module = module
        self.loss_fn = loss_fn
        self.output_transform = OutputTransform(output_transform)
        self.chunk_size = positive_int("chunk_size", chunk_size, allow_none=True)
        self.param_names = select_parameters(module, params)
        named = dict(module.named_parameters())
        selected = [named[name] for name in self.param_names]
        self.param_shapes = [p.shape for p in selected]
        self.param_numels = [p.numel() for p in selected]
        dtypes = {p.dtype for p in selected}
        if len(dtypes) != 1:
            raise TypeError(f"Selected parameters must share one dtype, found {sorted(map(str, dtypes))}.")
        self.dtype: torch.dtype = selected[0].dtype
        self.device: torch.device = selected[0].device
        self._reverse_over_reverse = False
        self._activation_numel: int | None = None
        self._fixed_rows = _padding_rows(module, self.param_names)
        self.projection = self._projection(projection_dim, projection_seed, projection, layer_gradients)
        self._layer_structure = LayerStructure(self) if flag("layer_gradients", layer_gradients) and \
            LayerStructure.supports(self) else None
        self.max_memory = parse_memory(max_memory)
        if self.max_memory is not None and self.max_memory < self._example_bytes():
            raise ValueError(
                f"max_memory={max_memory!r} cannot hold one per-example gradient of {self.gradient_dim:,} "
                f"{'parameters' if self.projection is None else 'projected values'} ({self._example_bytes():,} bytes "
                "with its working copy); raise it to at least that."
            )

    def _projection(self, dim: int | None, seed: int, kind: str, layer_gradients: bool) -> Projection | None:
        """The projection for `projection_dim` = `dim` (None without), its options checked first."""
        check_projection_options(dim, seed, kind)
        if dim is None:
            return None
        if not flag("layer_gradients", layer_gradients):
            raise ValueError("projection_dim projects per-layer gradients, so it needs layer_gradients=True.")
        return Projection(self, dim, seed, kind)

    # -- memory -------------------------------------------------------------------------------------------
    def _example_bytes(self) -> int:
        """Bytes one example's row of per-example gradients takes while it is formed: the row and a copy (the
        per-layer gradient before it is flattened into the row)."""
        return 2 * self.gradient_dim * self.dtype.itemsize

    def example_bytes(self, inputs: Any, targets: Tensor, vectors: int = 0) -> int:
        """Working memory per example of one vectorised call with `vectors` vectors (0: per-example gradients).

        A call holds the network's activations for each vector and for the forward and reverse pass, and a
        per-example gradient row with its copy: itemsize × ((vectors + 2) · A + 2d), with A the activation
        values of one example, measured once on the first example of the batch (which also checks that the
        model and loss apply to it, with `batch_loss`'s message when they do not).
        """
        if self._activation_numel is None:
            self._activation_numel = self._count_activations(inputs, targets)
        return self.dtype.itemsize * ((vectors + 2) * self._activation_numel + 2 * self.gradient_dim)

    def compute_rows(self, inputs: Any, targets: Tensor, vectors: int = 0) -> int:
        """Examples per vectorised call, so that its working memory (`example_bytes`) fits `max_memory`, or
        `DEFAULT_COMPUTE_MEMORY` without a budget; at least one."""
        budget = self.max_memory if self.max_memory is not None else DEFAULT_COMPUTE_MEMORY
        return max(1, budget // self.example_bytes(inputs, targets, vectors))

    def _count_activations(self, inputs: Any, targets: Tensor) -> int:
        """Values that one example's forward pass produces: the output of every submodule, plus the input."""
        one_inputs, one_targets = slice_batch(inputs, targets, 0, 1)
        counted = [sum(t.numel() for t in tree_flatten(one_inputs)[0] if isinstance(t, Tensor))]

        def count(module: nn.Module, args: Any, output: Any) -> None:
            counted.append(sum(t.numel() for t in tree_flatten(output)[0] if isinstance(t, Tensor)))

        handles = [module.register_forward_hook(count) for module in self.module.modules()]
        try:
            with self.evaluating(), torch.no_grad():
                self.batch_loss(one_inputs, one_targets)
        finally:
            for handle in handles:
                handle.remove()
        return sum(counted)

    # -- parameters ---------------------------------------------------------------------------------------
    @property
    def num_params(self) -> int:
        """p, the number of scalar parameters influence is computed over."""
        return sum(self.param_numels)

    @property
    def gradient_dim(self) -> int:
        """The length of the gradients and curvature vectors that influence works with: k with a projection
        (`projection_dim`), else p."""
        return self.num_params if self.projection is None else self.projection.dim

    def flat_params(self) -> Tensor:
        """The selected parameters, detached, as one vector θ of length p."""
        named = dict(self.module.named_parameters())
        return torch.cat([named[name].detach().reshape(-1) for name in self.param_names])

    def unflatten(self, flat: Tensor) -> dict[str, Tensor]:
        """Split a vector of length p into the selected parameters' shapes, keyed by name."""
        pieces = torch.split(flat, self.param_numels)
        return {n: piece.view(shape) for n, piece, shape in zip(self.param_names, pieces, self.param_shapes)}

    def _state(self, flat: Tensor) -> dict[str, Tensor]:
        """All tensors `functional_call` needs: θ unflattened, the other parameters and the buffers fixed.

        An nn.Embedding's ``padding_idx`` row is held fixed too: torch gives it no gradient (it is never trained)
        although the output reads it, and treating it as a constant keeps the curvature symmetric."""
        chosen = set(self.param_names)
        fixed = {n: p.detach() for n, p in self.module.named_parameters() if n not in chosen}
        buffers = dict(self.module.named_buffers())
        theta = self.unflatten(flat)
        for name, row in self._fixed_rows.items():
            weight = theta[name]
            theta[name] = torch.cat([weight[:row], weight[row : row + 1].detach(), weight[row + 1 :]])
        return {**fixed, **buffers, **theta}

    def _outputs(self, flat: Tensor, inputs: Any) -> Any:
        return functional_call(self.module, self._state(flat), (inputs,))

    # -- losses -------------------------------------------------------------------------------------------
    def _batch_loss(self, flat: Tensor, inputs: Any, targets: Tensor) -> Tensor:
        return self.mean_loss(self._outputs(flat, inputs), targets)

    def _example_loss(self, flat: Tensor, inputs: Any, target: Tensor) -> Tensor:
        add_batch_dim = lambda t: t.unsqueeze(0) if isinstance(t, Tensor) else t  # noqa: E731
        return self.loss_fn(self._outputs(flat, tree_map(add_batch_dim, inputs)), target.unsqueeze(0))

    def mean_loss(self, outputs: Any, targets: Tensor) -> Tensor:
        """(1/B) Σᵢ ℓ(fᵢ, yᵢ) of a batch's outputs, each example's loss on its own (a batch of one) where the
        logits f are known; else ``loss_fn(outputs, targets)``, taken to be that mean."""
        path = self.output_transform.path(outputs)
        if path is None:
            return self.loss_fn(outputs, targets)
        return vmap(self.logit_loss(outputs, path))(get_at(outputs, path), targets).mean()

    def logits(self, outputs: Any, purpose: str) -> tuple[Tensor, Path]:
        """The logits f [B, ...] in a batch's `outputs` and where they sit; TypeError saying what to pass where
        the output is not one tensor and no `output_transform` picks one (`purpose` names what needs it)."""
        path = self.output_transform.path(outputs)
        if path is None:
            raise TypeError(
                f"{purpose} needs the loss as a function of one tensor of logits, but the model returns "
                f"{type(outputs).__name__}; pass output_transform= to pick it: a key or attribute such as 'logits', "
                "an index such as '0', or a callable."
            )
        return get_at(outputs, path), path

    def logit_loss(self, outputs: Any, path: Path) -> Callable[[Tensor, Tensor], Tensor]:
        """ℓ(fᵢ, yᵢ): one example's loss as a function of its logits fᵢ (no batch dimension), ``loss_fn`` on a
        batch of one with fᵢ put at `path` in `outputs` (whose other values the loss must not use)."""

        def one(example_logits: Tensor, target: Tensor) -> Tensor:
            return self.loss_fn(replace_at(outputs, path, example_logits.unsqueeze(0)), target.unsqueeze(0))

        return one

    def batch_loss(self, inputs: Any, targets: Tensor) -> Tensor:
        """The loss of a batch at the current parameters, ``loss_fn`` checked to return a scalar and
        ``output_transform`` to pick a tensor of logits."""
        try:
            outputs = self._outputs(self.flat_params(), inputs)
            loss = self.loss_fn(outputs, targets)
        except (RuntimeError, ValueError, IndexError) as error:
            if is_out_of_memory(error):
                raise
            shapes = tree_map(lambda t: tuple(t.shape) if isinstance(t, Tensor) else t, (inputs, targets))
            dtypes = tree_map(lambda t: str(t.dtype).removeprefix("torch.") if isinstance(t, Tensor) else t,
                              (inputs, targets))
            raise ValueError(
                f"The model and loss could not be applied to a batch with (inputs, targets) shapes {shapes} and "
                f"dtypes {dtypes}: {error}. Check that the data matches the model's expected input and the loss's "
                "targets (e.g. integer class labels for cross_entropy)."
            ) from error
        if not isinstance(loss, Tensor) or loss.ndim != 0:
            shape = tuple(loss.shape) if isinstance(loss, Tensor) else type(loss).__name__
            raise ValueError(
                f"loss_fn must return a scalar (the mean loss of the batch), got {shape}; use reduction='mean'."
            )
        self.output_transform.path(outputs)  # a transform that picks no tensor says so here, on the first batch
        return loss

    @property
    def loss_name(self) -> str:
        """The loss as recorded with a result (see `lightning_influence.model.loss.loss_identity`)."""
        return loss_identity(self.loss_fn)

    def check_mean_loss(self, inputs: Any, targets: Tensor) -> None:
        """Refuse a loss summed over the batch where it would be taken as the batch mean: influence assumes
        L = (1/N) Σ ℓ, and a sum scales the curvature and every score by the batch size. Where the logits are known
        (`mean_loss`) every example's loss is taken on a batch of one, so the reduction cannot matter and nothing
        is checked. Compares the loss of a batch of at least two examples with its halves'."""
        size = batch_size(inputs)
        if size < 2:
            return
        half, flat = size // 2, self.flat_params()
        with torch.no_grad():
            if self.output_transform.path(self._outputs(flat, slice_batch(inputs, targets, 0, 1)[0])) is not None:
                return
            whole, first, second = (float(self._batch_loss(flat, *slice_batch(inputs, targets, start, stop)))
                                    for start, stop in ((0, size), (0, half), (half, size)))
        if summed_over_batch(whole, first, second, half, size - half):
            raise ValueError(
                f"loss_fn sums over the batch instead of averaging: on the first training batch ({size} examples) "
                f"its value {whole:.6g} equals the sum of its two halves' losses ({first:.6g} + {second:.6g}), not "
                "their mean. Influence assumes the batch mean, L = (1/N) Σ ℓ: use reduction='mean' (the default of "
                "torch's losses) instead of reduction='sum', or divide the sum by the batch size."
            )

    # -- first derivatives --------------------------------------------------------------------------------
    @property
    def uses_layer_gradients(self) -> bool:
        """Whether `example_gradients` takes the per-layer outer-product path (see `layer_gradients`)."""
        return self._layer_structure is not None

    def example_gradients(self, inputs: Any, targets: Tensor) -> Tensor:
        """Per-example gradients ∇θ ℓ(zᵢ, θ) of a batch, [B, p] (projected: P ∇θ ℓ, [B, k]): by per-layer outer
        products where they hold, else by `grad`. A layer found to run twice per forward (weight sharing)
        switches this model to `grad` for good, except with a projection, which needs the per-layer form; any
        other error propagates."""
        if self.projection is not None:
            try:
                return self._layer_structure.example_gradients(inputs, targets)  # type: ignore[union-attr]
            except LayerFormError as error:
                raise LayerFormError(f"{error} projection_dim needs that form; use projection_dim=None.") from error
        if self._layer_structure is not None:
            try:
                return self._layer_structure.example_gradients(inputs, targets)
            except LayerFormError:
                self._layer_structure = None
        return self.grad(inputs, targets)

    def grad(self, inputs: Any, targets: Tensor) -> Tensor:
        """Per-example gradients ∇θ ℓ(zᵢ, θ) of a batch, shape [B, p], in one vmap (chunked by chunk_size); in θ's
        coordinates whatever the projection."""
        per_example = vmap(grad(self._example_loss), in_dims=(None, 0, 0), chunk_size=self.chunk_size)
        return per_example(self.flat_params(), inputs, targets)

    def batch_grad(self, inputs: Any, targets: Tensor) -> Tensor:
        """Gradient of the batch's mean loss, shape [p] (projected: [k])."""
        gradient = grad(self._batch_loss)(self.flat_params(), inputs, targets)
        return gradient if self.projection is None else self.projection.project(gradient.unsqueeze(0))[0]

    # -- second derivatives -------------------------------------------------------------------------------
    @property
    def reverse_mode_only(self) -> bool:
        """Whether second-order products run by reverse passes only, since forward mode lacked an op's formula."""
        return self._reverse_over_reverse

    def batch_hvp(self, inputs: Any, targets: Tensor, vectors: Tensor) -> Tensor:
        """Products of the batch's mean-loss Hessian with m vectors, [m, p] → [m, p]; projected, of P H Pᵀ,
        [m, k] → [m, k] (`_in_gradient_space`).

        Forward-over-reverse (a jvp of the gradient). Where forward mode fails on an op of the model or loss
        (torch 2.13's `F.mse_loss` backward, for one), this model switches to reverse-over-reverse (a vjp of the
        gradient, equal by symmetry of H) for good.
        """
        return self._in_gradient_space(self._parameter_hvp, inputs, targets, vectors)

    def _parameter_hvp(self, inputs: Any, targets: Tensor, vectors: Tensor) -> Tensor:
        """H V in θ's coordinates, [m, p] → [m, p] (see `batch_hvp`)."""
        flat = self.flat_params()
        gradient = lambda theta: grad(self._batch_loss)(theta, inputs, targets)  # noqa: E731

        def forward_over_reverse(vector: Tensor) -> Tensor:
            return jvp(gradient, (flat,), (vector,))[1]

        def reverse_over_reverse(vector: Tensor) -> Tensor:
            return vjp(gradient, flat)[1](vector)[0]

        return self._map_vectors(forward_over_reverse, reverse_over_reverse, vectors)

    def _in_gradient_space(self, product: Callable[[Any, Tensor, Tensor], Tensor], inputs: Any, targets: Tensor,
                           vectors: Tensor) -> Tensor:
        """`product(inputs, targets, V)` of a matrix C in θ's coordinates, taken in the gradient space: C V
        without a projection; with one, P C Pᵀ V for V [m, k], lifting the vectors to θ in row blocks whose
        [rows, p] copies fit the compute memory (so that a dense P C Pᵀ never holds k × p values at once)."""
        if self.projection is None:
            return product(inputs, targets, vectors)
        budget = self.max_memory if self.max_memory is not None else DEFAULT_COMPUTE_MEMORY
        rows = max(1, budget // (LIFTED_COPIES * self.num_params * self.dtype.itemsize))
        projection = self.projection
        return torch.cat([projection.project(product(inputs, targets, projection.lift(block)))
                          for block in vectors.split(rows)]) if len(vectors) else vectors.clone()

    def _second_order(self, forward_mode: Callable[[], Tensor], reverse_mode: Callable[[], Tensor]) -> Tensor:
        """`forward_mode()`; where forward mode lacks a formula for an op (`forward_mode_unsupported`), this model
        switches to `reverse_mode()` (the same derivative by reverse passes only) for good. Every other error,
        out-of-memory above all, propagates and leaves the mode as it was."""
        if not self._reverse_over_reverse:
            try:
                return forward_mode()
            except (RuntimeError, AssertionError) as error:
                if not forward_mode_unsupported(error):
                    raise
                self._reverse_over_reverse = True
        return reverse_mode()

    def _map_vectors(
        self, forward_mode: Callable[[Tensor], Tensor], reverse_mode: Callable[[Tensor], Tensor], vectors: Tensor
    ) -> Tensor:
        """`forward_mode` on each row of `vectors` in one vmap, or `reverse_mode` (see `_second_order`)."""
        return self._second_order(
            lambda: vmap(forward_mode, chunk_size=self.chunk_size)(vectors),
            lambda: vmap(reverse_mode, chunk_size=self.chunk_size)(vectors),
        )

    def batch_hessian(self, inputs: Any, targets: Tensor) -> Tensor:
        """The explicit Hessian of the batch's mean loss, [p, p] (projected: P H Pᵀ, [k, k]); for small p or k
        only. The products with every unit vector (`batch_hvp`): torch.func.hessian (jacfwd of jacrev) is wrong
        for nn.LayerNorm in torch 2.13."""
        identity = torch.eye(self.gradient_dim, dtype=self.dtype, device=self.device)
        return self.batch_hvp(inputs, targets, identity)

    def batch_ggn_vp(self, inputs: Any, targets: Tensor, vectors: Tensor) -> Tensor:
        """Products of the batch's generalised Gauss–Newton matrix with m vectors, [m, p] → [m, p]; projected, of
        P G Pᵀ, [m, k] → [m, k] (`_in_gradient_space`).

        G = Jᵀ (∇²_f L) J with J = ∂f/∂θ the Jacobian of the model's outputs f and ∇²_f L the Hessian of the
        batch's mean loss in those outputs: the Hessian without the term that the loss's first derivative
        contributes through the model's own curvature. G is positive semi-definite for a convex loss (cross
        entropy, squared error), so G + λI is invertible for every λ > 0. Each product is one jvp through the
        model, one Hessian-vector product of the loss in its outputs, and one vjp back; forward mode falls back
        to reverse mode as in `batch_hvp`. f is the output's logits (see `output_transform`), and ∇²_f L the
        Hessian of (1/B) Σᵢ ℓ(fᵢ), each example's loss on its own.
        """
        return self._in_gradient_space(self._parameter_ggn_vp, inputs, targets, vectors)

    def _parameter_ggn_vp(self, inputs: Any, targets: Tensor, vectors: Tensor) -> Tensor:
        """G V in θ's coordinates, [m, p] → [m, p] (see `batch_ggn_vp`)."""
        flat = self.flat_params()
        primal: list[tuple[Any, Path]] = []  # the first call's output and where f is in it, for the loss of f

        def forward(theta: Tensor) -> Tensor:
            outputs = self._outputs(theta, inputs)
            logits, path = self.logits(outputs, "curvature='ggn'")
            if not primal:
                primal.append((outputs, path))
            return logits

        logits, pullback = vjp(forward, flat)
        logits = logits.detach()
        example_loss = self.logit_loss(*primal[0])
        output_gradient = grad(lambda f: vmap(example_loss)(f, targets).mean())

        def forward_mode(vector: Tensor) -> Tensor:
            tangent = jvp(forward, (flat,), (vector,))[1]
            return pullback(jvp(output_gradient, (logits,), (tangent,))[1])[0]

        def reverse_mode(vector: Tensor) -> Tensor:
            # J v as the vjp of the linear map u ↦ Jᵀu; the loss's Hessian in f is symmetric.
            tangent = vjp(lambda u: pullback(u)[0], torch.zeros_like(logits))[1](vector)[0]
            return pullback(vjp(output_gradient, logits)[1](tangent)[0])[0]

        return self._map_vectors(forward_mode, reverse_mode, vectors)

    def batch_ggn(self, inputs: Any, targets: Tensor) -> Tensor:
        """The explicit Gauss–Newton matrix of the batch's mean loss, [p, p] (projected: P G Pᵀ, [k, k]); for
        small p or k only."""
        identity = torch.eye(self.gradient_dim, dtype=self.dtype, device=self.device)
        return self.batch_ggn_vp(inputs, targets, identity)

    def check_second_order(self, inputs: Any, targets: Tensor) -> None:
        """Fail early, with the reason, when the loss on this batch is not a scalar, is summed over the batch
        (`check_mean_loss`), or has no usable curvature.

        One Hessian-vector product with a fixed random probe: an error from torch.func means the loss cannot be
        differentiated twice; an exactly zero product means the loss is detached from the selected parameters
        or piecewise linear in them, where second-order influence is undefined.
        """
        self.batch_loss(inputs, targets)
        self.check_mean_loss(inputs, targets)
        generator = torch.Generator(device="cpu").manual_seed(0)
        probe = torch.randn(1, self.gradient_dim, generator=generator, dtype=self.dtype).to(self.device)
        try:
            curvature = self.batch_hvp(inputs, targets, probe)
        except RuntimeError as error:
            if is_out_of_memory(error):
                raise
            raise ValueError(
                f"loss_fn cannot be differentiated twice with torch.func ({error}). Influence needs second "
                "derivatives: build the loss from differentiable torch operations, and give custom "
                "autograd.Functions a setup_context and a jvp."
            ) from error
        if not bool(curvature.any()):
            raise ValueError(
                "The loss has zero curvature in the selected parameters on the first training batch: it is "
                "detached from them, or piecewise linear in them (such as an L1 or hinge loss), or not twice "
                "differentiable. Influence needs a twice-differentiable loss such as cross-entropy or squared error."
            )

    def mixed_grad(self, inputs: Tensor, targets: Tensor, vectors: Tensor) -> Tensor:
        """∇ₓ ⟨v, ∇θ ℓ(x, y, θ)⟩ for each of k vectors v and each example, shape [k, B, *x_shape].

        The inner product is the directional derivative of ℓ along v (a forward-mode jvp in θ); its gradient
        in the input is then one reverse pass. This is the perturbation influence of Koh & Liang. Projected, the
        vectors (of length k) are lifted to θ first: ⟨v, P ∇θ ℓ⟩ = ⟨Pᵀv, ∇θ ℓ⟩.
        """
        if not isinstance(inputs, Tensor) or not inputs.is_floating_point():
            raise TypeError("Perturbation influence needs floating-point tensor inputs to differentiate.")
        if self.projection is not None:
            vectors = self.projection.lift(vectors)
        flat = self.flat_params()

        def directional(x: Tensor, y: Tensor, v: Tensor) -> Tensor:
            return jvp(lambda theta: self._example_loss(theta, x, y), (flat,), (v,))[1]

        over_examples = vmap(grad(directional), in_dims=(0, 0, None), chunk_size=self.chunk_size)
        return vmap(over_examples, in_dims=(None, None, 0))(inputs, targets, vectors)

    # -- state --------------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def evaluating(self) -> Iterator[TwiceDifferentiable]:
        """Run in eval mode (dropout off, BatchNorm on running statistics) with grad enabled, and attention on
        kernels with second derivatives (`second_order_attention`); restore the modes and settings after."""
        modes = [(m, m.training) for m in self.module.modules()]
        self.module.eval()
        try:
            with torch.inference_mode(False), torch.enable_grad(), second_order_attention():
                yield self
        finally:
            for submodule, training in modes:
                submodule.training = training


def check_finite(tensor: Tensor, stage: str, batch: int | None = None, *, inputs: Any = None,
                 first_row: int | None = None) -> Tensor:
    """Return `tensor`, or raise NonFiniteError naming the stage and batch when it holds NaN or Inf.

    A NaN or Inf anywhere makes the sum non-finite, so one reduction (at memory speed) clears the common case;
    only a non-finite sum, which may also be an overflow of finite values, is checked element by element. When
    `batch` is a `BatchSpan` of several loader batches, the error names the loader batch to blame (from the
    rows of `tensor` when it holds one per example from `first_row` on, or from non-finite `inputs`).
    """
    if not bool(torch.isfinite(tensor.sum())) and not bool(torch.isfinite(tensor).all()):
        if isinstance(batch, BatchSpan):
            batch = batch.blame(tensor, first_row, inputs)
        raise NonFiniteError(
            stage,
            batch,
            "Check the inputs of that batch, the trained weights, and the loss for overflow or log(0).",
        )
    return tensor


def _padding_rows(module: nn.Module, names: Sequence[str]) -> dict[str, int]:
    """The ``padding_idx`` row of each selected nn.Embedding weight, by parameter name."""
    modules = dict(module.named_modules())
    rows = {}
    for name in names:
        owner, _, attr = name.rpartition(".")
        embedding = modules.get(owner)
        if isinstance(embedding, nn.Embedding) and attr == "weight" and embedding.padding_idx is not None:
            rows[name] = embedding.padding_idx
    return rows
