"""Low-rank query factors (``query_rank=r``): scores from a rank-r factorisation of each layer's block of every
factor, without forming the block or any per-example gradient.

In the per-layer matrix form of `LayerStructure`, a factor s = (H + λI)⁻¹ g is one matrix S [out, in'] per layer,
and a training example's gradient there is G = Σₜ δₜ aₜᵀ. With S kept as its best rank-r approximation (Eckart–Young,
by SVD) S_r = Σ_{k≤r} σ_k u_k v_kᵀ, the layer's score term is

    ⟨S_r, G⟩ = Σₜ Σ_k (σ_k u_kᵀ δₜ)(v_kᵀ aₜ),

T·r·(out + in') multiply-adds per query and example instead of out·in' (kronfluence's query_gradient_rank). With
many positions T (convolutions, long sequences) that can cost more than the block itself: such a layer is scored as
⟨S_r, G⟩ with S_r formed once, the same numbers in the cheaper order.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from lightning_influence.engine.scoring import compute_batches
from lightning_influence.errors import LayerFormError
from lightning_influence.model.data import iterate_batches, slice_batch
from lightning_influence.model.layers import LayerStructure, token_sums
from lightning_influence.model.twice_differentiable import DEFAULT_COMPUTE_MEMORY, TwiceDifferentiable, check_finite

__all__ = ["LowRankFactors", "check_layer_form", "low_rank_factors", "low_rank_scores", "rank_structure",
           "truncated_factors"]


@dataclass
class LowRankFactors:
    """Factors [M, p] kept layer by layer as S_r = left · rightᵀ, in the layout of `LayerStructure.to_matrices`.

    Attributes:
        rank: the requested rank r; a layer keeps k = min(r, out, in') directions.
        left: per layer U_k diag(σ_k), [M, out, k].
        right: per layer V_k, [M, in', k].
    """

    rank: int
    left: list[Tensor]
    right: list[Tensor]
    _blocks: dict[int, Tensor] = field(default_factory=dict, repr=False)  # S_r of the layers formed so far

    def block(self, layer: int) -> Tensor:
        """S_r of one layer, [M, out, in'], formed once."""
        if layer not in self._blocks:
            self._blocks[layer] = self.left[layer] @ self.right[layer].transpose(1, 2)
        return self._blocks[layer]

    def blocks(self) -> list[Tensor]:
        """S_r of every layer."""
        return [self.block(layer) for layer in range(len(self.left))]


def rank_structure(model: TwiceDifferentiable) -> LayerStructure:
    """The per-layer structure that ``query_rank`` scores through; a ValueError naming the selected parameters
    outside the layers it covers and the ``params=`` that leaves them out."""
    return LayerStructure(model, fallback="query_rank=None (full-rank queries take any parameter)")


def low_rank_factors(structure: LayerStructure, factors: Tensor, rank: int) -> LowRankFactors:
    """`factors` [M, p] with each layer's block of each row cut to its best rank-`rank` approximation.

    A block with min(out, in') ≤ rank is kept exactly, as S · I (or I · S), with no SVD."""
    left, right, exact = [], [], {}
    for layer, block in enumerate(structure.to_matrices(factors)):
        queries, out, columns = block.shape
        if min(out, columns) <= rank:
            exact[layer] = block
            eye = torch.eye(min(out, columns), dtype=block.dtype, device=block.device).expand(queries, -1, -1)
            left.append(block if columns <= out else eye)
            right.append(eye if columns <= out else block.transpose(1, 2))
            continue
        u, sigma, vh = torch.linalg.svd(block, full_matrices=False)
        left.append(u[:, :, :rank] * sigma[:, None, :rank])
        right.append(vh[:, :rank].transpose(1, 2))
    return LowRankFactors(rank, left, right, exact)


def truncated_factors(structure: LayerStructure, factors: Tensor, rank: int) -> Tensor:
    """The rank-`rank` reconstruction of `factors` [M, p] (each layer block replaced by S_r, as in
    `low_rank_factors`), for scoring by plain dot products: ⟨row, ∇θ ℓ(zᵢ)⟩ is `low_rank_scores`' value."""
    return structure.from_matrices(low_rank_factors(structure, factors, rank).blocks())


def _captured(structure: LayerStructure, inputs: Any, targets: Tensor) -> tuple[list[Tensor], list[Tensor]]:
    """`LayerStructure.capture`, its LayerFormError (a layer run twice, no logits) as a ValueError for query_rank."""
    try:
        return structure.capture(inputs, targets)
    except LayerFormError as error:
        raise ValueError(
            f"query_rank scores layer by layer, which this model does not allow: {error} Pass output_transform= "
            "to pick the logits where the output is not one tensor, or query_rank=None."
        ) from error


def check_layer_form(model: TwiceDifferentiable, structure: LayerStructure, data: Iterable[Any]) -> None:
    """Raise now, on the first example of `data`, the ValueError that low-rank scoring would raise on it (the
    logits unknown, a layer used twice per forward); nothing for empty data."""
    for _, inputs, targets in iterate_batches(data, model.device, model.dtype, name="training_data"):
        with model.evaluating():
            _captured(structure, *slice_batch(inputs, targets, 0, 1))
        return


def low_rank_scores(model: TwiceDifferentiable, structure: LayerStructure, data: Iterable[Any],
                    factors: LowRankFactors, *, progress: bool = False) -> Tensor:
    """I_up with the rank-r factors for every example of `data`, [M, N] in loader order: per compute batch
    (`compute_batches`) one forward and one reverse pass, then Σ over layers of ⟨S_r, Σₜ δₜ aₜᵀ⟩."""
    budget = model.max_memory if model.max_memory is not None else DEFAULT_COMPUTE_MEMORY
    blocks = []
    with model.evaluating():
        for index, start, inputs, targets in compute_batches(model, data, name="input_data", progress=progress):
            activations, deltas = _captured(structure, inputs, targets)
            layers = enumerate(zip(activations, deltas))
            block = sum(_layer_scores(factors, layer, a, delta, budget) for layer, (a, delta) in layers)
            blocks.append(check_finite(block.T, "low-rank influence scores", index, first_row=start).T)
    return torch.cat(blocks, dim=1)


def fused_is_cheaper(queries: int, positions: int, rank: int, out: int, columns: int, tokens: bool) -> bool:
    """Whether Σₜ Σ_k (u_kᵀ δₜ)(v_kᵀ aₜ) takes fewer multiply-adds than forming G = Σₜ δₜ aₜᵀ and ⟨S_r, G⟩, per
    example: M·T·k·(out + in') against out·in'·(M + T) (token inputs: v_kᵀ aₜ is a look-up, G a scatter)."""
    fused = queries * positions * rank * (out + (0 if tokens else columns))
    dense = out * columns * (queries + (1 if tokens else positions))
    return fused <= dense


def _layer_scores(factors: LowRankFactors, layer: int, a: Tensor, delta: Tensor, budget: int) -> Tensor:
    """Σₜ ⟨S_r, δₜ aₜᵀ⟩ of one layer for every query and example, [M, B], in the cheaper order; a [B, T, in']
    (token indices [B, T] for an embedding, −1 adding nothing), δ [B, T, out]."""
    left, right = factors.left[layer], factors.right[layer]
    queries, out, rank = left.shape
    columns = right.shape[1]
    count, positions = delta.shape[:2]
    tokens = not a.is_floating_point()
    if not fused_is_cheaper(queries, positions, rank, out, columns, tokens):
        gradient = token_sums(delta, a, columns).transpose(1, 2) if tokens else torch.einsum("bto,bti->boi", delta, a)
        return torch.einsum("moi,boi->mb", factors.block(layer), gradient)
    step = max(1, budget // (2 * count * positions * rank * delta.element_size()))  # [step, B, T, k] twice
    pieces = []
    for first in range(0, queries, step):
        along_out = torch.einsum("bto,mok->mbtk", delta, left[first : first + step])
        if tokens:
            along_in = right[first : first + step, a.clamp_min(0)] * (a >= 0).unsqueeze(-1)
        else:
            along_in = torch.einsum("bti,mik->mbtk", a, right[first : first + step])
        pieces.append(along_out.mul_(along_in).sum((2, 3)))
    return torch.cat(pieces)
