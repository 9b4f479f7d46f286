"""Compressed gradients: seeded Kronecker-structured random projections of each layer's gradient.

A layer's per-example gradient in its matrix form (`LayerStructure`) is G = Σₜ δₜ aₜᵀ, [out, in'] (bias as a
homogeneous column). With a pair P_out [k_o, out] and P_in [k_i, in'] per layer, the projected gradient is

    P_out G P_inᵀ = Σₜ (P_out δₜ)(P_in aₜ)ᵀ,   k_o · k_i ≈ k numbers per layer,

formed from the projected a and δ alone: the p-dimensional gradient is never formed (the idea of LoGra). The
vector of a layer is vec(P_out G P_inᵀ) = (P_out ⊗ P_in) vec G, so the whole map θ ↦ P θ is block-diagonal over
layers with Kronecker blocks; `project` applies it to any [m, p] vectors and `lift` its transpose. Curvature in
the projected space is P H Pᵀ, and the K-FAC factors of the projected pseudo-gradients are P_in A P_inᵀ and
P_out S P_outᵀ: EK-FAC runs unchanged on the projected a and δ.

Entries are Gaussian N(0, 1/k_side), or sparse (Achlioptas: ±√(3/k_side) with probability 1/6 each, 0 with 2/3),
so that E[PᵀP] = I on each side and inner products are preserved in expectation. A side whose k equals its
dimension is the identity, so a layer with out · in' ≤ k is kept exactly, and a k at least every layer's size
reproduces the unprojected results. Each side's matrix is drawn on the CPU in float64 from a seed derived from
`projection_seed`, the layer's name and the side, so results do not depend on the device or on which other
layers are selected.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from lightning_influence.checks import positive_int
from lightning_influence.model.layers import LayerBlock, LayerStructure, covered_blocks

if TYPE_CHECKING:  # the model builds its projection from this module
    from lightning_influence.model.twice_differentiable import TwiceDifferentiable

PROJECTION_KINDS = ("gaussian", "sparse")


def check_projection_options(dim: int | None, seed: int, kind: str) -> None:
    """Refuse a `projection_dim` that is not a positive integer (or None), a non-integer `projection_seed`, or an
    unknown `projection` kind, saying what is accepted."""
    positive_int("projection_dim", dim, allow_none=True)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"projection_seed must be an integer, got {seed!r}.")
    if kind not in PROJECTION_KINDS:
        raise ValueError(f"projection must be one of {list(PROJECTION_KINDS)}, got {kind!r}.")


def kronecker_sizes(rows: int, columns: int, dim: int) -> tuple[int, int]:
    """(k_o, k_i) with k_o · k_i ≤ `dim` numbers for an [rows, columns] layer: the layer itself when it fits,
    else about √dim on each side, a side that is smaller than that kept whole and the other given the rest."""
    if rows * columns <= dim:
        return rows, columns
    k_out = min(rows, max(1, math.isqrt(dim)))
    k_in = min(columns, max(1, dim // k_out))
    return min(rows, max(1, dim // k_in)), k_in


def _side_seed(seed: int, layer: str, side: str) -> int:
    """A 63-bit seed for one side of one layer, stable across runs, platforms and the selection of other layers."""
    digest = hashlib.sha256(f"{seed}/{layer}/{side}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def random_matrix(rows: int, columns: int, kind: str, seed: int) -> Tensor:
    """A [rows, columns] float64 CPU matrix with E[MᵀM] = I: Gaussian entries of variance 1/rows, or sparse
    ±√(3/rows) entries with probability 1/6 each and 0 with probability 2/3."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    if kind == "gaussian":
        return torch.randn(rows, columns, generator=generator, dtype=torch.float64) / math.sqrt(rows)
    draws = torch.randint(0, 6, (rows, columns), generator=generator)
    signs = (draws == 0).to(torch.float64) - (draws == 1).to(torch.float64)
    return signs * math.sqrt(3 / rows)


@dataclass
class LayerProjection:
    """The pair (P_out, P_in) of one layer block; None on a side kept whole (the identity)."""

    name: str
    owner: str  # the module that owns the layer's parameters (block-diagonal curvature groups by it)
    rows: int  # out
    columns: int  # in'
    out_matrix: Tensor | None  # P_out [k_o, out]
    in_matrix: Tensor | None  # P_in [k_i, in']

    @property
    def out_dim(self) -> int:
        return self.rows if self.out_matrix is None else self.out_matrix.shape[0]

    @property
    def in_dim(self) -> int:
        return self.columns if self.in_matrix is None else self.in_matrix.shape[0]

    @property
    def dim(self) -> int:
        return self.out_dim * self.in_dim

    def activations(self, a: Tensor, tokens: bool) -> Tensor:
        """P_in aₜ for every position: a [B, T, in'] → [B, T, k_i]. With `tokens` (an embedding's indices [B, T],
        −1 for padding), P_in e_token is a column of P_in, gathered (zero for padding); kept as indices when P_in
        is the identity."""
        if self.in_matrix is None:
            return a
        if not tokens:
            return a @ self.in_matrix.T
        gathered = self.in_matrix.T[a.clamp_min(0)]  # [B, T, k_i]
        return gathered * (a >= 0).unsqueeze(-1).to(gathered.dtype)

    def deltas(self, delta: Tensor) -> Tensor:
        """P_out δₜ for every position: [B, T, out] → [B, T, k_o]."""
        return delta if self.out_matrix is None else delta @ self.out_matrix.T

    def project(self, matrices: Tensor) -> Tensor:
        """P_out M P_inᵀ: [m, out, in'] → [m, k_o, k_i]."""
        if self.out_matrix is not None:
            matrices = self.out_matrix @ matrices
        return matrices if self.in_matrix is None else matrices @ self.in_matrix.T

    def lift(self, matrices: Tensor) -> Tensor:
        """P_outᵀ X P_in, the adjoint of `project`: [m, k_o, k_i] → [m, out, in']."""
        if self.out_matrix is not None:
            matrices = self.out_matrix.T @ matrices
        return matrices if self.in_matrix is None else matrices @ self.in_matrix

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "out": self.rows, "in": self.columns, "k_out": self.out_dim, "k_in": self.in_dim}


class Projection:
    """θ ↦ P θ from ℝᵖ to ℝᵏ, block-diagonal over the model's layer blocks with a Kronecker pair in each.

    The projected vector is every layer's [k_o, k_i] matrix flattened row by row, layer after layer, so its length
    k (`dim`) is the sum of k_o · k_i; `to_matrices` and `from_matrices` convert. Raises ValueError naming the
    selected parameters outside the covered layers, and the ``params=`` that selects only the covered ones.

    Args:
        model: the functional model (its selected parameters, dtype and device).
        dim: about this many numbers per layer (`kronecker_sizes`).
        seed: the seed every layer's matrices derive from.
        kind: "gaussian" or "sparse".
    """

    def __init__(self, model: TwiceDifferentiable, dim: int, seed: int = 0, kind: str = "gaussian") -> None:
        check_projection_options(dim, seed, kind)
        blocks = covered_blocks(model, "projection_dim", "leave projection_dim=None")
        self.per_layer, self.seed, self.kind = dim, seed, kind
        self.structure = LayerStructure(model, projected=False)
        self.layers = [self._layer(block, model) for block in blocks]
        self._offsets = [0]
        for layer in self.layers:
            self._offsets.append(self._offsets[-1] + layer.dim)

    def _layer(self, block: LayerBlock, model: TwiceDifferentiable) -> LayerProjection:
        k_out, k_in = kronecker_sizes(block.out_features, block.columns, self.per_layer)

        def side(k: int, full: int, name: str) -> Tensor | None:
            if k == full:
                return None
            matrix = random_matrix(k, full, self.kind, _side_seed(self.seed, block.name, name))
            return matrix.to(device=model.device, dtype=model.dtype)

        owner = block.name.rpartition(".")[0] if block.role is not None else block.name
        return LayerProjection(block.name, owner, block.out_features, block.columns,
                               side(k_out, block.out_features, "out"), side(k_in, block.columns, "in"))

    @property
    def dim(self) -> int:
        """k, the length of a projected vector (the sum over layers of k_o · k_i)."""
        return self._offsets[-1]

    @property
    def shapes(self) -> list[tuple[int, int]]:
        """(k_o, k_i) of every layer, in order."""
        return [(layer.out_dim, layer.in_dim) for layer in self.layers]

    def blocks(self) -> list[tuple[str, slice]]:
        """The projected coordinates grouped by the module that owns them, as (module name, slice), in order."""
        grouped: list[tuple[str, slice]] = []
        for layer, start, stop in zip(self.layers, self._offsets, self._offsets[1:]):
            if grouped and grouped[-1][0] == layer.owner:
                grouped[-1] = (layer.owner, slice(grouped[-1][1].start, stop))
            else:
                grouped.append((layer.owner, slice(start, stop)))
        return grouped

    def to_matrices(self, vectors: Tensor) -> list[Tensor]:
        """[m, k] → one [m, k_o, k_i] per layer (views)."""
        return [vectors[:, start:stop].reshape(vectors.shape[0], layer.out_dim, layer.in_dim)
                for layer, start, stop in zip(self.layers, self._offsets, self._offsets[1:])]

    def from_matrices(self, matrices: Sequence[Tensor]) -> Tensor:
        """Inverse of `to_matrices`: per-layer [m, k_o, k_i] → [m, k]."""
        return torch.cat([matrix.reshape(matrix.shape[0], -1) for matrix in matrices], dim=1)

    def project(self, vectors: Tensor) -> Tensor:
        """P V: [m, p] in θ's order → [m, k], each layer's block P_out M P_inᵀ."""
        matrices = self.structure.to_matrices(vectors)
        return self.from_matrices([layer.project(m) for layer, m in zip(self.layers, matrices)])

    def lift(self, vectors: Tensor) -> Tensor:
        """Pᵀ X: [m, k] → [m, p] in θ's order, each layer's block P_outᵀ X P_in (the adjoint of `project`)."""
        matrices = self.to_matrices(vectors)
        return self.structure.from_matrices([layer.lift(m) for layer, m in zip(self.layers, matrices)])

    def describe(self) -> dict[str, Any]:
        """Everything that reproduces the projection, for the metadata: kind, seed, k per layer, the total
        dimension, and each layer's (name, out, in', k_o, k_i)."""
        return {"kind": self.kind, "seed": self.seed, "dim_per_layer": self.per_layer, "dim": self.dim,
                "layers": [layer.describe() for layer in self.layers]}
