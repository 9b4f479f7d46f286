"""Per-layer structure of `nn.Linear` and `nn.Conv2d`: inputs a and output gradients δ from one batched pass.

For such a layer with output s = W a (+ b), the gradient of a per-example loss is the outer product
∇_W ℓ = δ aᵀ with δ = ∂ℓ/∂s (summed over positions t for convolutions and sequences: Σₜ δₜ aₜᵀ). With the
bias as a homogeneous coordinate (a ← [a, 1]) the layer's gradient is one matrix G = δ aᵀ of shape
[out, in + 1]. Everything here works in that matrix form: it is what Kronecker-factored curvature needs, and
per-example gradients are written from it without a vmap. (Scores Σₜ δₜᵀ F aₜ could skip the [B, p] block,
but measured on benchmark problem (b) that fused form was only 20% faster per batch than writing the block and
one GEMM, which also keeps one scoring path for every layer type.)

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
from lightning_influence.model.outputs import get_at

if TYPE_CHECKING:  # the model imports this module for its per-layer path
    from lightning_influence.model.twice_differentiable import TwiceDifferentiable

SUPPORTED_LAYERS: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv2d)


@dataclass
class LayerBlock:
    """One supported layer with at least one selected parameter, in the [out, in'] matrix form."""

    name: str
    module: nn.Module
    weight: str | None  # full parameter name when the weight is selected
    bias: str | None  # full parameter name when the bias is selected
    out_features: int
    in_features: int  # columns of the weight matrix (in, or in·kh·kw for a convolution)

    @property
    def columns(self) -> int:
        """in' = weight columns (if selected) + 1 for the bias (if selected)."""
        return (self.in_features if self.weight else 0) + (1 if self.bias else 0)

    @property
    def numel(self) -> int:
        return self.out_features * self.columns


def _conv_problem(module: nn.Conv2d) -> str | None:
    if module.groups != 1:
        return f"groups={module.groups}"
    if module.padding_mode != "zeros":
        return f"padding_mode={module.padding_mode!r}"
    if isinstance(module.padding, str) and module.padding != "valid":
        return f"padding={module.padding!r}"
    return None


def layer_blocks(model: TwiceDifferentiable) -> tuple[list[LayerBlock], list[str]]:
    """The supported layer blocks covering the selected parameters, and the selected parameters they miss
    (each named with its module type), in the module's order."""
    modules = dict(model.module.named_modules())
    blocks: dict[str, LayerBlock] = {}
    unsupported: list[str] = []
    for name in model.param_names:
        owner, _, attr = name.rpartition(".")
        module = modules.get(owner)
        problem = None
        if isinstance(module, nn.Conv2d):
            problem = _conv_problem(module)
        if not isinstance(module, SUPPORTED_LAYERS) or attr not in ("weight", "bias") or problem:
            kind = type(module).__name__ if module is not None else "?"
            unsupported.append(f"{name} ({kind}{', ' + problem if problem else ''})")
            continue
        if owner not in blocks:
            weight = module.weight
            blocks[owner] = LayerBlock(owner, module, None, None, weight.shape[0], weight[0].numel())
        if attr == "weight":
            blocks[owner].weight = name
        else:
            blocks[owner].bias = name
    return list(blocks.values()), unsupported


class LayerStructure:
    """Maps flat vectors θ ∈ ℝᵖ to per-layer matrices [out, in'] and captures (a, δ) for each layer.

    Raises ValueError naming the selected parameters outside supported layers.
    """

    def __init__(self, model: TwiceDifferentiable) -> None:
        blocks, unsupported = layer_blocks(model)
        if unsupported:
            raise ValueError(
                "Only nn.Linear and nn.Conv2d (groups=1, zero padding) layers are supported here; the selected "
                f"parameters {unsupported} are in other layers. Select the supported layers only with "
                "params=[...], or use another inversion method."
            )
        self.model = model
        self.blocks = blocks
        offsets, offset = {}, 0
        for name, numel in zip(model.param_names, model.param_numels):
            offsets[name] = (offset, numel)
            offset += numel
        self._offsets = offsets

    @staticmethod
    def supports(model: TwiceDifferentiable) -> bool:
        return not layer_blocks(model)[1]

    # -- flat vectors <-> layer matrices --------------------------------------------------------------------
    def to_matrices(self, vectors: Tensor) -> list[Tensor]:
        """[k, p] → one [k, out, in'] per layer (weight columns first, then the bias column)."""
        k = vectors.shape[0]
        matrices = []
        for block in self.blocks:
            parts = []
            if block.weight:
                start, numel = self._offsets[block.weight]
                parts.append(vectors[:, start : start + numel].reshape(k, block.out_features, block.in_features))
            if block.bias:
                start, numel = self._offsets[block.bias]
                parts.append(vectors[:, start : start + numel].reshape(k, block.out_features, 1))
            matrices.append(torch.cat(parts, dim=2) if len(parts) > 1 else parts[0])
        return matrices

    def from_matrices(self, matrices: Sequence[Tensor]) -> Tensor:
        """Inverse of `to_matrices`: per-layer [k, out, in'] → [k, p] in the flat parameter order."""
        k = matrices[0].shape[0]
        pieces: dict[str, Tensor] = {}
        for block, matrix in zip(self.blocks, matrices):
            if block.weight:
                pieces[block.weight] = matrix[:, :, : block.in_features].reshape(k, -1)
            if block.bias:
                pieces[block.bias] = matrix[:, :, -1].reshape(k, -1)
        return torch.cat([pieces[name] for name in self.model.param_names], dim=1)

    # -- capture ------------------------------------------------------------------------------------------
    def _layer_input(self, block: LayerBlock, inputs: Tensor) -> Tensor:
        """a as [B, T, in'] (T positions: 1 for a plain Linear, patches for Conv2d), bias column appended."""
        module = block.module
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

    def forward(self, inputs: Any) -> tuple[Any, list[Tensor], list[Tensor]]:
        """Run the module once, recording each layer's input a [B, T, in'] and its output s (kept in the graph).

        Returns (outputs, [a per layer], [s per layer]). A layer called more than once per forward (weight
        sharing) breaks the outer-product form and raises LayerFormError.
        """
        records: dict[int, list[tuple[Tensor, Tensor]]] = {i: [] for i in range(len(self.blocks))}
        handles = []

        def hook_for(i: int) -> Callable[..., None]:
            def hook(module: nn.Module, args: tuple[Any, ...], output: Tensor) -> None:
                records[i].append((args[0].detach(), output))

            return hook

        for i, block in enumerate(self.blocks):
            handles.append(block.module.register_forward_hook(hook_for(i)))
        try:
            outputs = self.model.module(inputs)
        finally:
            for handle in handles:
                handle.remove()
        activations, layer_outputs = [], []
        for i, block in enumerate(self.blocks):
            if len(records[i]) != 1:
                raise LayerFormError(
                    f"Layer {block.name!r} ran {len(records[i])} times in one forward pass; the per-layer form "
                    "needs each layer used exactly once."
                )
            layer_input, layer_output = records[i][0]
            if not layer_output.requires_grad:
                raise LayerFormError(f"The output of layer {block.name!r} does not require grad.")
            activations.append(self._layer_input(block, layer_input))
            layer_outputs.append(layer_output)
        return outputs, activations, layer_outputs

    @staticmethod
    def backward(logits: Tensor, layer_outputs: list[Tensor], cotangent: Tensor, retain: bool) -> list[Tensor]:
        """δ for every layer as [B, T, out] from one reverse pass with cotangent u ([B, *logits_shape])."""
        deltas = torch.autograd.grad(logits, layer_outputs, grad_outputs=cotangent, retain_graph=retain)
        shaped = []
        for delta in deltas:
            if delta.ndim == 4:  # Conv2d output [B, out, H, W] → [B, H·W, out]
                shaped.append(delta.flatten(2).transpose(1, 2))
            else:
                shaped.append(delta.reshape(delta.shape[0], -1, delta.shape[-1]))
        return shaped

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

    def example_gradients(self, inputs: Any, targets: Tensor) -> Tensor:
        """Per-example gradients [B, p] as outer products δ aᵀ: one forward and one reverse pass, no vmap.

        Each layer's products are written straight into their columns of the [B, p] result (one write of
        B × p values, no intermediate copy: the write is most of the cost when p is large). An output without
        one tensor of logits raises LayerFormError (the vmap path takes any output).
        """
        outputs, activations, layer_outputs = self.forward(inputs)
        path = self.model.output_transform.path(outputs)
        if path is None:
            raise LayerFormError("The model's output is not one tensor, and no output_transform picks its logits.")
        logits = get_at(outputs, path)
        cotangent = self.example_output_gradients(logits, self.model.logit_loss(outputs, path), targets)
        deltas = self.backward(logits, layer_outputs, cotangent, retain=False)
        count = cotangent.shape[0]
        gradients = cotangent.new_empty(count, self.model.num_params)
        for block, delta, a in zip(self.blocks, deltas, activations):
            if block.weight:
                start, numel = self._offsets[block.weight]
                region = gradients[:, start : start + numel].view(count, block.out_features, block.in_features)
                weight_inputs = a[:, :, : block.in_features]
                if a.shape[1] == 1:  # one position: a plain outer product
                    torch.mul(delta[:, 0, :, None], weight_inputs[:, 0, None, :], out=region)
                else:
                    region.copy_(torch.einsum("bto,bti->boi", delta, weight_inputs))
            if block.bias:
                start, numel = self._offsets[block.bias]
                gradients[:, start : start + numel] = delta.sum(1)
        return gradients
