"""EK-FAC (George et al., 2018; Grosse et al., 2023): eigenvalue-corrected Kronecker-factored curvature.

For each supported layer (nn.Linear, nn.Conv2d, nn.Embedding, nn.MultiheadAttention's projections; bias as a
homogeneous coordinate; see `LayerStructure`) the curvature block is approximated from per-example
pseudo-gradients G = Σₜ δₜ aₜᵀ ([out, in']):

    A = E[Σₜ aₜ aₜᵀ] = Q_A diag(·) Q_Aᵀ,   S = E[Σₜ δₜ δₜᵀ] = Q_S diag(·) Q_Sᵀ,
    Λ[o, i] = E[(Q_Sᵀ G Q_A)[o, i]²]                 (eigenvalue correction, a second pass),
    C_layer = (Q_S ⊗ Q_A) diag(vec Λ) (Q_S ⊗ Q_A)ᵀ,   (C_layer + λI)⁻¹ V = Q_S [(Q_Sᵀ V Q_A) / (Λ + λ)] Q_Aᵀ.

For nn.Embedding, A is diagonal (token counts over one-hot inputs), so Q_A = I is kept implicit (None) and the
vocabulary-sized A is never formed. Blocks of different layers are independent (block-diagonal curvature; the
q, k and v projections of an attention layer are three blocks), and the curvature is the GGN's
whatever the operator's `curvature` and `block_diagonal` options say. The pseudo-gradients are those of the
Gauss-Newton (GGN, for cross-entropy the true Fisher) matrix, taken exactly rather than sampled: with
Rᵢ Rᵢᵀ = ∇²ₒ ℓ(oᵢ, yᵢ) (the per-example Hessian of the loss in the network outputs, K × K), each column of Rᵢ is
back-propagated as an output cotangent, so GGN = (1/N) Σᵢ Σ_c gᵢc gᵢcᵀ with no sampling noise (K reverse passes
per batch). `samples=k` instead back-propagates k random combinations Rᵢ ξ (ξ Rademacher), an unbiased
estimate with k passes. All sums over examples are reduced across processes; E[·] divides by the global N.
The network outputs are the logits f that the model's ``output_transform`` picks.

With the model's `projection_dim`, everything above runs on the projected a and δ (`LayerStructure` in the
projected layout): the factors become P_in A P_inᵀ and P_out S P_outᵀ, the Kronecker factors of the projected
curvature, and an embedding's projected inputs are dense rows, no longer one-hot.

A selected parameter outside these layers (nn.LayerNorm, say) is refused with its name and the ``params=`` that
leaves it out, rather than silently left out of the influence.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, cast

import torch
from torch import Tensor

from lightning_influence.checks import positive_int
from lightning_influence.curvature.operator import CurvatureOperator
from lightning_influence.model.data import batch_size
from lightning_influence.model.layers import LayerStructure, token_sums
from lightning_influence.model.twice_differentiable import check_finite
from .base import ApproximateSolver, fit_required, work_dtype

FACTOR_DTYPES = {"float64": torch.float64, "float32": torch.float32}


class EkfacSolver(ApproximateSolver, method="ekfac"):
    """(C + λI)⁻¹ with C the per-layer eigenvalue-corrected Kronecker approximation of the Gauss-Newton matrix.

    Options: `samples` (None: exact GGN pseudo-gradients from the output-Hessian factor; k: k Rademacher
    combinations per example), `factor_dtype` ("float64" default: factors and eigen-decompositions are
    accumulated in double precision; "float32" halves their memory), `seed` for the sampled variant, `refine`
    for conjugate-gradient steps on the operator's exact curvature preconditioned by EK-FAC (`ApproximateSolver`).
    """

    fitted_state = ("_basis", "_eigenvalues", "_dtype")

    def __init__(
        self, samples: int | None = None, factor_dtype: str = "float64", seed: int = 0, refine: int = 2
    ) -> None:
        super().__init__(refine)
        self.samples = positive_int("samples", samples, allow_none=True)
        if factor_dtype not in FACTOR_DTYPES:
            raise ValueError(f"factor_dtype must be one of {sorted(FACTOR_DTYPES)}, got {factor_dtype!r}.")
        self.factor_dtype = factor_dtype
        self.seed = seed
        self.structure: LayerStructure | None = None
        self._dtype = FACTOR_DTYPES[factor_dtype]  # of the factors; float32 on devices without float64 (`_fit`)
        self._basis: list[tuple[Tensor, Tensor | None]] = []  # (Q_S, Q_A) per layer; Q_A None: identity
        self._eigenvalues: list[Tensor] = []  # Λ per layer, [out, in']

    def _pseudo_gradients(
        self, structure: LayerStructure, inputs: Any, targets: Tensor, generator: torch.Generator
    ) -> Iterator[tuple[list[Tensor], list[Tensor]]]:
        """Yield, per output cotangent, (activations [B,T,in'] per layer, deltas [B,T,out] per layer)."""
        outputs, activations, layer_outputs = structure.forward(inputs)
        logits, path = structure.model.logits(outputs, "EK-FAC")
        roots = structure.output_hessian_roots(logits, structure.model.logit_loss(outputs, path), targets)  # [B,K,K]
        if self.samples is None:
            cotangents = [roots[:, :, c] for c in range(roots.shape[2])]
        else:
            cotangents = []
            for _ in range(self.samples):
                signs = torch.randint(0, 2, roots.shape[:2], generator=generator).to(roots) * 2 - 1
                cotangents.append(torch.einsum("bkc,bc->bk", roots, signs) / self.samples**0.5)
        for index, cotangent in enumerate(cotangents):
            retain = index + 1 < len(cotangents)
            deltas = structure.backward(logits, layer_outputs, cotangent.view_as(logits), retain=retain)
            yield activations, deltas

    def _fit(self, operator: CurvatureOperator) -> dict[str, Any]:
        structure = LayerStructure(operator.model)
        wanted = FACTOR_DTYPES[self.factor_dtype]
        self._dtype = wanted if work_dtype(operator.device) == torch.float64 else torch.float32
        self._basis, n = self._kronecker_bases(operator, structure)
        self._eigenvalues = self._corrected_eigenvalues(operator, structure, self._basis, n)
        operator.count_pass(2)
        self.structure = structure
        return {
            "layers": [b.name for b in structure.blocks],
            "num_examples": n,
            "pseudo_gradients": "ggn-exact" if self.samples is None else f"ggn-sampled-{self.samples}",
            "top_eigenvalue": max(float(e.max()) for e in self._eigenvalues),
            "min_eigenvalue": min(float(e.min()) for e in self._eigenvalues),
        }

    def _kronecker_bases(
        self, operator: CurvatureOperator, structure: LayerStructure
    ) -> tuple[list[tuple[Tensor, Tensor | None]], int]:
        """Pass 1: the eigenvectors (Q_S, Q_A) per layer of the Kronecker factors A = E[Σ aaᵀ] and S = E[Σ δδᵀ]
        (Q_A None for an embedding's diagonal A), and the global number of examples N."""
        dtype, device = self._dtype, operator.device
        generator = torch.Generator(device="cpu").manual_seed(self.seed)
        shapes = structure.shapes
        a_sums = [None if structure.one_hot(layer) else torch.zeros(columns, columns, dtype=dtype, device=device)
                  for layer, (_, columns) in enumerate(shapes)]
        s_sums = [torch.zeros(rows, rows, dtype=dtype, device=device) for rows, _ in shapes]
        count = 0
        for index, inputs, targets in operator.batches("EK-FAC factors"):
            count += batch_size(inputs)
            first = True
            for activations, deltas in self._pseudo_gradients(structure, inputs, targets, generator):
                for layer, (a, delta) in enumerate(zip(activations, deltas)):
                    a_sum = a_sums[layer]
                    if first and a_sum is not None:
                        a2 = a.reshape(-1, a.shape[-1]).to(dtype)
                        a_sum += check_finite(a2.T @ a2, "EK-FAC activation factors", index)
                    d2 = delta.reshape(-1, delta.shape[-1]).to(dtype)
                    s_sums[layer] += check_finite(d2.T @ d2, "EK-FAC gradient factors", index)
                first = False
        n = operator.count_examples(count)
        bases = []
        for a_sum, s_sum in zip(a_sums, s_sums):
            s_full = operator.sum_over_processes(s_sum) / n
            q_s = torch.linalg.eigh((s_full + s_full.T) / 2).eigenvectors
            q_a = None
            if a_sum is not None:
                a_full = operator.sum_over_processes(a_sum) / n
                q_a = torch.linalg.eigh((a_full + a_full.T) / 2).eigenvectors
            bases.append((q_s, q_a))
        return bases, n

    def _corrected_eigenvalues(
        self, operator: CurvatureOperator, structure: LayerStructure, bases: list[tuple[Tensor, Tensor | None]],
        n: int,
    ) -> list[Tensor]:
        """Pass 2: the eigenvalue correction Λ = E[(Q_Sᵀ G Q_A)²] per layer in the `bases` (Q_S, Q_A) of pass 1,
        with G = Σₜ δₜ aₜᵀ per example and cotangent."""
        generator = torch.Generator(device="cpu").manual_seed(self.seed)
        sums = [torch.zeros(rows, columns, dtype=self._dtype, device=operator.device)
                for rows, columns in structure.shapes]
        for index, inputs, targets in operator.batches("EK-FAC eigenvalue correction"):
            rotated_a: list[Tensor] | None = None
            for activations, deltas in self._pseudo_gradients(structure, inputs, targets, generator):
                if rotated_a is None:
                    rotated_a = [a if q_a is None else a.to(self._dtype) @ q_a
                                 for a, (_, q_a) in zip(activations, bases)]
                for layer, (a_rot, delta) in enumerate(zip(rotated_a, deltas)):
                    d_rot = delta.to(self._dtype) @ bases[layer][0]  # [B, T, out]
                    if structure.one_hot(layer):  # ã = a: the token indices
                        contribution = (token_sums(d_rot, a_rot, sums[layer].shape[1]) ** 2).sum(0).T
                    elif a_rot.shape[1] == 1:  # (δ̃ ã ᵀ)² summed over examples = (δ̃²)ᵀ (ã²)
                        contribution = (d_rot[:, 0] ** 2).T @ (a_rot[:, 0] ** 2)
                    else:
                        contribution = (torch.einsum("bto,bti->boi", d_rot, a_rot) ** 2).sum(0)
                    sums[layer] += check_finite(contribution, "EK-FAC eigenvalue correction", index)
        return [operator.sum_over_processes(s) / n for s in sums]

    def _restore(self, operator: CurvatureOperator) -> None:
        self.structure = LayerStructure(operator.model)

    @fit_required
    def _approximate(self, rhs: Tensor) -> Tensor:
        structure = cast(LayerStructure, self.structure)  # set by `_fit`
        solved = []
        for matrix, (q_s, q_a), eigenvalues in zip(
            structure.to_matrices(rhs.to(self._dtype)), self._basis, self._eigenvalues
        ):
            rotated = _rotate(matrix, q_s, q_a)  # [M, out, in']
            solved.append(_rotate_back(rotated / (eigenvalues + self.regularization), q_s, q_a))
        return structure.from_matrices(solved).to(rhs.dtype)

    @fit_required
    def curvature_matrix(self) -> Tensor:
        """The approximate curvature C (block-diagonal over layers) as a dense [d, d] matrix (d = p, or the
        projection's k); for tests."""
        structure = cast(LayerStructure, self.structure)  # set by `_fit`
        identity = torch.eye(self.operator.gradient_dim, dtype=self._dtype, device=self.operator.device)
        columns = []
        for matrix, (q_s, q_a), eigenvalues in zip(structure.to_matrices(identity), self._basis, self._eigenvalues):
            columns.append(_rotate_back(_rotate(matrix, q_s, q_a) * eigenvalues, q_s, q_a))
        return structure.from_matrices(columns)


def _rotate(matrix: Tensor, q_s: Tensor, q_a: Tensor | None) -> Tensor:
    """Q_Sᵀ M Q_A, into the Kronecker eigenbasis (Q_A None: the identity)."""
    rotated = q_s.T @ matrix
    return rotated if q_a is None else rotated @ q_a


def _rotate_back(matrix: Tensor, q_s: Tensor, q_a: Tensor | None) -> Tensor:
    """Q_S M Q_Aᵀ, out of the Kronecker eigenbasis (Q_A None: the identity)."""
    rotated = q_s @ matrix
    return rotated if q_a is None else rotated @ q_a.T
