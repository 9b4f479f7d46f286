"""Per-layer structure of linear maps: inputs a and output gradients δ of each layer from one batched pass.

For a layer with output s = W a (+ b), the gradient of a per-example loss is the outer product ∇_W ℓ = δ aᵀ
with δ = ∂ℓ/∂s, summed over positions t for convolutions and sequences: Σₜ δₜ aₜᵀ. Inputs are batch-first,
[B, ..., in]: a Linear layer on [B, T, d] is a sequence, its activations and output gradients summed over T for
each example (as kronfluence does). With the bias as a homogeneous coordinate (a ← [a, 1]) the layer's gradient
is one matrix G = δ aᵀ of shape [out, in + 1]. Everything here works in that matrix form: it is what
Kronecker-factored curvature needs, and per-example gradients are written from it without a vmap. (Scores
Σₜ δₜᵀ F aₜ could skip the [B, p] block, but measured on benchmark problem (b) that fused form was only 20%
faster per batch than writing the block and one GEMM, which also keeps one scoring path for every layer type.)

The linear maps covered:
- nn.Linear, and nn.Conv2d (groups=1, zero padding) on unfolded patches.
- nn.Embedding: the map Wᵀ on one-hot tokens (its weight [V, d] read as the matrix [d, V]). The tokens are kept
  as indices, never as one-hot rows: δ aᵀ is δ summed into its token's column, and the activation factor
  E[Σₜ aₜ aₜᵀ] is diagonal (token counts). The ``padding_idx`` token has a = 0: torch never trains its row.
- nn.MultiheadAttention: its q, k and v input projections are three blocks (rows of ``in_proj_weight`` and
  ``in_proj_bias`` when packed) and ``out_proj`` an nn.Linear, all seen through `explicit_attention`.

δ is obtained by back-propagating per-example cotangents u of the logits f (the model's output, or what
``output_transform`` picks) through the network in one batched reverse pass (hooks record each layer's input
and output). With u = ∇_f ℓ(fᵢ, yᵢ) computed for each example alone (a vmap over a batch of one), δ is exactly
what the vmap path would give, for any loss; the network must treat examples independently (true in eval
mode for standard layers).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import grad, jacfwd, vmap

from lightning_influence.errors import LayerFormError
from lightning_influence.model.attention import explicit_attention
from lightning_influence.model.data import batch_size
from lightning_influence.model.outputs import get_at

if TYPE_CHECKING:  # the model and the projection import this module
    from lightning_influence.model.projection import Projection
    from lightning_influence.model.twice_differentiable import TwiceDifferentiable

COVERED = ("nn.Linear, nn.Conv2d (groups=1, zero padding), nn.Embedding (no max_norm or scale_grad_by_freq) and "
           "nn.MultiheadAttention's projections")
#: nn.MultiheadAttention's projection weights: the role (0 q, 1 k, 2 v) of each, None for all three packed.
ATTENTION_WEIGHTS: dict[str, int | None] = {
    "in_proj_weight": None, "q_proj_weight": 0, "k_proj_weight": 1, "v_proj_weight": 2,
}


@dataclass
class LayerBlock:
    """One linear map with at least one selected parameter, in the [out, in'] matrix form."""

    name: str  # the module's name; "<attention>.q_proj" (k, v) for nn.MultiheadAttention's input projections
    module: nn.Module
    weight: str | None  # full parameter name when the weight is selected
    bias: str | None  # full parameter name when the bias is selected
    out_features: int
    in_features: int  # columns of the weight matrix (in, in·kh·kw for a convolution, V for an embedding)
    role: int | None = None  # nn.MultiheadAttention's input projections: 0 q, 1 k, 2 v
    weight_row: int = 0  # first row of this block in its weight (a packed in_proj_weight)
    bias_row: int = 0  # first entry of this block in its bias (in_proj_bias)

    @property
    def one_hot(self) -> bool:
        """Whether the inputs are token indices (nn.Embedding; weight stored [in, out], diagonal input factor)."""
        return isinstance(self.module, nn.Embedding)

    @property
    def columns(self) -> int:
        """in' = weight columns (if selected) + 1 for the bias (if selected)."""
        return (self.in_features if self.weight else 0) + (1 if self.bias else 0)

    @property
    def numel(self) -> int:
        return self.out_features * self.columns


def _problem(module: nn.Module | None, attr: str) -> str | None:
    """Why parameter `attr` of `module` is outside the per-layer form ("" for a module type it does not cover),
    or None when it is covered."""
    if isinstance(module, nn.MultiheadAttention):
        covered = attr in ATTENTION_WEIGHTS or attr == "in_proj_bias"
        return None if covered else "not a projection"
    if not isinstance(module, (nn.Linear, nn.Conv2d, nn.Embedding)) or attr not in ("weight", "bias"):
        return ""
    if isinstance(module, nn.Embedding) and module.max_norm is not None:
        return "max_norm"  # renormalises the weight in place as it runs
    if isinstance(module, nn.Embedding) and module.scale_grad_by_freq:
        return "scale_grad_by_freq"  # its gradient is not the loss's
    if isinstance(module, nn.Conv2d):
        if module.groups != 1:
            return f"groups={module.groups}"
        if module.padding_mode != "zeros":
            return f"padding_mode={module.padding_mode!r}"
        if isinstance(module.padding, str) and module.padding != "valid":
            return f"padding={module.padding!r}"
    return None


def _new_block(owner: str, module: nn.Module, role: int | None) -> LayerBlock:
    """An empty block (no parameter attached yet) for `module`, or its q/k/v projection `role`."""
    if isinstance(module, nn.MultiheadAttention):
        inputs = (module.embed_dim, module.kdim, module.vdim)[role]  # type: ignore[index]
        return LayerBlock(f"{owner}.{'qkv'[role]}_proj", module, None, None, module.embed_dim, inputs, role)
    if isinstance(module, nn.Embedding):
        return LayerBlock(owner, module, None, None, module.embedding_dim, module.num_embeddings)
    weight = module.weight
    return LayerBlock(owner, module, None, None, weight.shape[0], weight[0].numel())


def _parts(module: nn.Module, attr: str) -> list[tuple[int | None, str, int]]:
    """(role, "weight" or "bias", first row) of each block that parameter `attr` of `module` belongs to."""
    if not isinstance(module, nn.MultiheadAttention):
        return [(None, attr, 0)]
    size = module.embed_dim
    if attr == "in_proj_bias":
        return [(role, "bias", role * size) for role in range(3)]
    role = ATTENTION_WEIGHTS[attr]
    return [(role, "weight", 0)] if role is not None else [(r, "weight", r * size) for r in range(3)]


def _shared(module: nn.Module) -> dict[str, list[str]]:
    """For each parameter name, the other names under which the same tensor is used (weight tying)."""
    names: dict[int, list[str]] = {}
    for name, parameter in module.named_parameters(remove_duplicate=False):
        names.setdefault(id(parameter), []).append(name)
    return {name: [other for other in group if other != name] for group in names.values() for name in group}


def layer_blocks(model: TwiceDifferentiable) -> tuple[list[LayerBlock], list[str]]:
    """The layer blocks covering the selected parameters, and the selected parameters they miss (each named with
    its module type and the reason), in the module's order."""
    modules = dict(model.module.named_modules())
    shared = _shared(model.module)
    blocks: dict[tuple[str, int | None], LayerBlock] = {}
    unsupported: list[str] = []
    for name in model.param_names:
        owner, _, attr = name.rpartition(".")
        module = modules.get(owner)
        problem = _problem(module, attr)
        if problem is None and shared[name]:
            problem = f"shared with {shared[name]}"
        if problem is not None:
            kind = type(module).__name__ if module is not None else "?"
            unsupported.append(f"{name} ({kind}{', ' + problem if problem else ''})")
            continue
        for role, part, row in _parts(module, attr):  # type: ignore[arg-type]  # None has a problem
            block = blocks.setdefault((owner, role), _new_block(owner, module, role))  # type: ignore[arg-type]
            setattr(block, part, name)
            setattr(block, f"{part}_row", row)
    return list(blocks.values()), unsupported


def covered_blocks(model: TwiceDifferentiable, what: str, fallback: str) -> list[LayerBlock]:
    """The layer blocks of the selected parameters; a ValueError saying that `what` covers only `COVERED`, naming
    the selected parameters outside them, the `params=` that selects the covered ones, and `fallback`."""
    blocks, unsupported = layer_blocks(model)
    if unsupported:
        missing = {entry.partition(" ")[0] for entry in unsupported}
        covered = [name for name in model.param_names if name not in missing]
        choice = f"Select only the covered layers with params={covered}" if covered else "None is covered"
        raise ValueError(
            f"{what} covers {COVERED}; it would leave out the selected parameters {unsupported}. {choice}, or "
            f"{fallback}."
        )
    return blocks


def token_sums(delta: Tensor, tokens: Tensor, count: int, out: Tensor | None = None) -> Tensor:
    """Σₜ δₜ e_{tokenₜ}ᵀ per example as [B, count, d] (transposed): each δₜ [B, T, d] added into its token's row;
    tokens [B, T] of −1 (padding) add nothing. Written into `out` when given."""
    keep = (tokens >= 0).unsqueeze(-1)
    index = tokens.clamp_min(0).unsqueeze(-1).expand_as(delta)
    result = out.zero_() if out is not None else delta.new_zeros(delta.shape[0], count, delta.shape[-1])
    return result.scatter_add_(1, index, delta * keep)


class LayerStructure:
    """Maps flat vectors θ ∈ ℝᵖ to per-layer matrices [out, in'] and captures (a, δ) for each layer.

    With the model's `projection` (``projected=True``, the default) everything is in the projected layout
    instead: flat vectors of length k, matrices [k_o, k_i], activations P_in a and deltas P_out δ (see
    `lightning_influence.model.projection`); `shapes` and `one_hot` say what each layer's matrices look like.
    Raises ValueError naming the selected parameters outside the covered layers, the `params=` that selects
    only the covered ones, and `fallback`: what else the caller can do.
    """

    def __init__(self, model: TwiceDifferentiable, projected: bool = True, *,
                 fallback: str = "use another inversion method") -> None:
        self.model = model
        self.blocks = covered_blocks(model, "The per-layer form", fallback)
        self.projection: Projection | None = model.projection if projected else None
        offsets, offset = {}, 0
        for name, numel in zip(model.param_names, model.param_numels):
            offsets[name] = offset
            offset += numel
        self._offsets = offsets

    @staticmethod
    def supports(model: TwiceDifferentiable) -> bool:
        return not layer_blocks(model)[1]

    # -- the layout ---------------------------------------------------------------------------------------
    @property
    def dim(self) -> int:
        """The length of a flat vector: p, or the projection's k."""
        return self.model.num_params if self.projection is None else self.projection.dim

    @property
    def shapes(self) -> list[tuple[int, int]]:
        """(rows, columns) of every layer's matrices: (out, in'), or (k_o, k_i) when projected."""
        if self.projection is not None:
            return self.projection.shapes
        return [(block.out_features, block.columns) for block in self.blocks]

    def one_hot(self, layer: int) -> bool:
        """Whether layer `layer`'s activations are token indices [B, T] (an embedding whose inputs are not
        projected) rather than rows [B, T, columns]."""
        block = self.blocks[layer]
        return block.one_hot and (self.projection is None or self.projection.layers[layer].in_matrix is None)

    # -- flat vectors <-> layer matrices --------------------------------------------------------------------
    def _weight_slice(self, block: LayerBlock) -> slice:
        """The block's weight entries in θ (contiguous: whole rows of the parameter)."""
        start = self._offsets[block.weight] + block.weight_row * block.in_features  # type: ignore[index]
        return slice(start, start + block.out_features * block.in_features)

    def _bias_slice(self, block: LayerBlock) -> slice:
        start = self._offsets[block.bias] + block.bias_row  # type: ignore[index]
        return slice(start, start + block.out_features)

    def to_matrices(self, vectors: Tensor) -> list[Tensor]:
        """[k, p] → one [k, out, in'] per layer (weight columns first, then the bias column); projected,
        [k, dim] → one [k, k_o, k_i] per layer."""
        if self.projection is not None:
            return self.projection.to_matrices(vectors)
        k = vectors.shape[0]
        matrices = []
        for block in self.blocks:
            parts = []
            if block.weight:
                weight = vectors[:, self._weight_slice(block)]
                parts.append(weight.reshape(k, block.in_features, block.out_features).transpose(1, 2)
                             if block.one_hot else weight.reshape(k, block.out_features, block.in_features))
            if block.bias:
                parts.append(vectors[:, self._bias_slice(block)].reshape(k, block.out_features, 1))
            matrices.append(torch.cat(parts, dim=2) if len(parts) > 1 else parts[0])
        return matrices

    def from_matrices(self, matrices: Sequence[Tensor]) -> Tensor:
        """Inverse of `to_matrices`: per-layer [k, out, in'] → [k, p] in the flat parameter order."""
        if self.projection is not None:
            return self.projection.from_matrices(matrices)
        k = matrices[0].shape[0]
        flat = matrices[0].new_empty(k, self.model.num_params)
        for block, matrix in zip(self.blocks, matrices):
            if block.weight:
                weight = matrix[:, :, : block.in_features]
                weight = weight.transpose(1, 2) if block.one_hot else weight
                flat[:, self._weight_slice(block)] = weight.reshape(k, -1)
            if block.bias:
                flat[:, self._bias_slice(block)] = matrix[:, :, -1]
        return flat

    # -- capture ------------------------------------------------------------------------------------------
    def _layer_input(self, block: LayerBlock, inputs: Tensor) -> Tensor:
        """a as [B, T, in'] (T positions: 1 for a plain Linear, patches for Conv2d), bias column appended; for an
        embedding the token indices [B, T], −1 at ``padding_idx``."""
        module = block.module
        if isinstance(module, nn.Embedding):
            tokens = inputs.reshape(inputs.shape[0], -1)
            return tokens if module.padding_idx is None else tokens.masked_fill(tokens == module.padding_idx, -1)
        if isinstance(module, nn.Conv2d):
            padding = 0 if module.padding == "valid" else module.padding
            patches = F.unfold(inputs, module.kernel_size, module.dilation, padding, module.stride)
            a = patches.transpose(1, 2)  # [B, T, in·kh·kw]
        else:
            a = inputs.reshape(inputs.shape[0], -1, inputs.shape[-1])
        parts = [a] if block.weight else []
        if block.bias:
            parts.append(torch.ones(*a.shape[:2], 1, dtype=a.dtype, device=a.device))
        return torch.cat(parts, dim=2) if len(parts) > 1 else parts[0]

    def _run(self, inputs: Any) -> tuple[Any, list[list[tuple[Tensor, Tensor]]]]:
        """The module's outputs on `inputs`, and each block's recorded (input, output) pairs."""
        records: list[list[tuple[Tensor, Tensor]]] = [[] for _ in self.blocks]
        projections = {(id(b.module), b.role): i for i, b in enumerate(self.blocks) if b.role is not None}

        def hook_for(i: int) -> Callable[..., None]:
            def hook(module: nn.Module, args: tuple[Any, ...], output: Tensor) -> None:
                records[i].append((args[0].detach(), output))

            return hook

        def record(attention: nn.MultiheadAttention, role: int, layer_input: Tensor, output: Tensor) -> None:
            if (id(attention), role) in projections:
                records[projections[id(attention), role]].append((layer_input.detach(), output))

        handles = [b.module.register_forward_hook(hook_for(i)) for i, b in enumerate(self.blocks) if b.role is None]
        try:
            with explicit_attention(self.model.module, record):
                outputs = self.model.module(inputs)
        finally:
            for handle in handles:
                handle.remove()
        return outputs, records

    def forward(self, inputs: Any) -> tuple[Any, list[Tensor], list[Tensor]]:
        """Run the module once, recording each layer's input a [B, T, in'] (projected: P_in a, [B, T, k_i]) and its
        output s (kept in the graph).

        Returns (outputs, [a per layer], [s per layer]). A layer called more than once per forward (weight
        sharing), or whose input is not batch-first, breaks the outer-product form and raises LayerFormError.
        """
        outputs, records = self._run(inputs)
        count = batch_size(inputs)
        activations, layer_outputs = [], []
        for block, record in zip(self.blocks, records):
            if len(record) != 1:
                raise LayerFormError(
                    f"Layer {block.name!r} ran {len(record)} times in one forward pass; the per-layer form "
                    "needs each layer used exactly once."
                )
            layer_input, layer_output = record[0]
            if not layer_output.requires_grad:
                raise LayerFormError(f"The output of layer {block.name!r} does not require grad.")
            if layer_input.ndim == 0 or layer_input.shape[0] != count:
                raise LayerFormError(
                    f"The input of layer {block.name!r} has shape {tuple(layer_input.shape)}, not a batch of {count} "
                    "first; the per-layer form needs batch-first layers (e.g. batch_first=True)."
                )
            a = self._layer_input(block, layer_input)
            if self.projection is not None:
                a = self.projection.layers[len(activations)].activations(a, tokens=block.one_hot)
            activations.append(a)
            layer_outputs.append(layer_output)
        return outputs, activations, layer_outputs

    def backward(self, logits: Tensor, layer_outputs: list[Tensor], cotangent: Tensor, retain: bool) -> list[Tensor]:
        """δ for every layer as [B, T, out] (projected: P_out δ, [B, T, k_o]) from one reverse pass with cotangent
        u ([B, *logits_shape])."""
        deltas = torch.autograd.grad(logits, layer_outputs, grad_outputs=cotangent, retain_graph=retain)
        shaped = []
        for delta in deltas:
            if delta.ndim == 4:  # Conv2d output [B, out, H, W] → [B, H·W, out]
                shaped.append(delta.flatten(2).transpose(1, 2))
            else:
                shaped.append(delta.reshape(delta.shape[0], -1, delta.shape[-1]))
        if self.projection is None:
            return shaped
        return [layer.deltas(delta) for layer, delta in zip(self.projection.layers, shaped)]

    @staticmethod
    def example_output_gradients(logits: Tensor, loss: Callable[[Tensor, Tensor], Tensor], targets: Tensor
                                 ) -> Tensor:
        """u = ∇_f ℓ(fᵢ, yᵢ) per example, with `loss` = ℓ(fᵢ, yᵢ) on a batch of one (the loss's own per-example
        meaning; see `TwiceDifferentiable.logit_loss`)."""
        return vmap(grad(loss))(logits.detach(), targets)

    @staticmethod
    def output_hessian_roots(logits: Tensor, loss: Callable[[Tensor, Tensor], Tensor], targets: Tensor) -> Tensor:
        """Per-example factors R [B, K, K] with R Rᵀ = ∇²_f ℓ(fᵢ, yᵢ) (negative eigenvalues clipped to 0), so that
        the Gauss-Newton matrix is (1/N) Σᵢ Σ_c (Jᵢᵀ rᵢc)(Jᵢᵀ rᵢc)ᵀ over the columns rᵢc of Rᵢ."""
        shape = logits.shape[1:]

        def one(flat_logits: Tensor, target: Tensor) -> Tensor:
            return loss(flat_logits.view(shape), target)

        hessians = vmap(jacfwd(grad(one)))(logits.detach().reshape(logits.shape[0], -1), targets)
        hessians = (hessians + hessians.transpose(1, 2)) / 2
        values, vectors = torch.linalg.eigh(hessians)
        return vectors * values.clamp_min(0).sqrt().unsqueeze(1)

    def capture(self, inputs: Any, targets: Tensor) -> tuple[list[Tensor], list[Tensor]]:
        """Each layer's inputs a (as `forward` gives them) and the output gradients δ (as `backward` gives them)
        of every example's own loss ℓ(zᵢ): one forward and one reverse pass. An output without one tensor of
        logits raises LayerFormError (the vmap path takes any output)."""
        outputs, activations, layer_outputs = self.forward(inputs)
        path = self.model.output_transform.path(outputs)
        if path is None:
            raise LayerFormError("The model's output is not one tensor, and no output_transform picks its logits.")
        logits = get_at(outputs, path)
        cotangent = self.example_output_gradients(logits, self.model.logit_loss(outputs, path), targets)
        return activations, self.backward(logits, layer_outputs, cotangent, retain=False)

    def example_gradients(self, inputs: Any, targets: Tensor) -> Tensor:
        """Per-example gradients [B, p] (projected: [B, k]) as outer products δ aᵀ from `capture`, no vmap.

        Each layer's products are written straight into their columns of the result (one write of B × p values,
        no intermediate copy: the write is most of the cost when p is large).
        """
        activations, deltas = self.capture(inputs, targets)
        gradients = deltas[0].new_empty(deltas[0].shape[0], self.dim)
        if self.projection is None:
            self._write_parameters(gradients, deltas, activations)
        else:
            self._write_matrices(gradients, deltas, activations)
        return gradients

    def _write_parameters(self, gradients: Tensor, deltas: list[Tensor], activations: list[Tensor]) -> None:
        """Each layer's δ aᵀ into its weight's and bias's columns of θ, [B, p]."""
        count = gradients.shape[0]
        for block, delta, a in zip(self.blocks, deltas, activations):
            if block.weight and block.one_hot:
                region = gradients[:, self._weight_slice(block)].view(count, block.in_features, block.out_features)
                token_sums(delta, a, block.in_features, out=region)
            elif block.weight:
                region = gradients[:, self._weight_slice(block)].view(count, block.out_features, block.in_features)
                _outer_products(delta, a[:, :, : block.in_features], region)
            if block.bias:
                gradients[:, self._bias_slice(block)] = delta.sum(1)

    def _write_matrices(self, gradients: Tensor, deltas: list[Tensor], activations: list[Tensor]) -> None:
        """Each layer's Σₜ δₜ aₜᵀ, [B, rows, columns], into its block of the layout's flat vectors (projected)."""
        for layer, (region, delta, a) in enumerate(zip(self.to_matrices(gradients), deltas, activations)):
            if self.one_hot(layer):  # token sums are [B, V, rows], the transpose of the layer's matrix
                region.copy_(token_sums(delta, a, region.shape[2]).transpose(1, 2))
            else:
                _outer_products(delta, a, region)


def _outer_products(delta: Tensor, a: Tensor, out: Tensor) -> None:
    """Σₜ δₜ aₜᵀ per example into `out` [B, rows, columns], from δ [B, T, rows] and a [B, T, columns]."""
    if a.shape[1] == 1:  # one position: a plain outer product
        torch.mul(delta[:, 0, :, None], a[:, 0, None, :], out=out)
    else:
        out.copy_(torch.einsum("bto,bti->boi", delta, a))
