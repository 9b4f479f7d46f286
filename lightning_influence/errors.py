"""Exceptions raised by the engine, each one saying what went wrong and how to fix it, and its warnings."""

from __future__ import annotations

import sys
import warnings

import torch


class NonFiniteError(FloatingPointError):
    """A gradient, Hessian product or solver iterate contained NaN or Inf.

    `stage` names the computation (e.g. "training gradients") and `batch` the index of the first batch in
    which it appeared (None where the value was not tied to a batch).
    """

    def __init__(self, stage: str, batch: int | None = None, hint: str = "") -> None:
        where = f" in batch {batch}" if batch is not None else ""
        message = f"Non-finite values (NaN or Inf) appeared in {stage}{where}."
        if hint:
            message += " " + hint
        super().__init__(message)
        self.stage = stage
        self.batch = batch
        self.hint = hint

    def during(self, step: str) -> NonFiniteError:
        """The same error with the step of the run it happened in named (e.g. "the influence factors")."""
        return NonFiniteError(f"{self.stage}, while computing {step}", self.batch, self.hint)


class ConvergenceError(RuntimeError):
    """A stage of an influence run did not converge, or gave values its inputs cannot give, under
    ``on_unconverged="raise"``; `warnings` names each problem."""

    def __init__(self, message: str, warnings: list[str]) -> None:
        super().__init__(message)
        self.warnings = warnings


class InfluenceComputationError(RuntimeError):
    """A late stage failed; `partial` holds what was already computed (e.g. the influence factors)."""

    def __init__(self, message: str, partial: dict) -> None:
        super().__init__(message)
        self.partial = partial


class IndefiniteCurvatureError(RuntimeError):
    """H + λI was found not positive definite and `on_negative_curvature="raise"` asked for an error; the message
    names the smallest eigenvalue found and the remedies (a larger hessian_regularization, or curvature="ggn")."""


class NotFittedError(RuntimeError):
    """A fitted object (a solver) was used before `fit`; the message names the call to make first."""


class ResultMismatchError(ValueError):
    """A save dir holds results of another run (other weights, method, λ, data or queries)."""


class LayerFormError(RuntimeError):
    """The per-layer outer-product form of gradients does not hold for this model (a layer used more than once
    per forward pass, or a layer output outside the autograd graph): use the generic per-example path."""


#: Message fragments of allocation failures that torch raises as a plain RuntimeError: the CPU allocator on Linux
#: ("DefaultCPUAllocator: can't allocate memory") and Windows ("not enough memory"), and other backends (MPS).
_OUT_OF_MEMORY_MESSAGES = ("DefaultCPUAllocator: can't allocate memory", "not enough memory", "out of memory")


def is_out_of_memory(error: BaseException) -> bool:
    """Whether `error` is an allocation failure, which must always propagate: a fall-back that caught it would
    hide the one fix that works (smaller chunks or batches) and could switch to a slower path for good.

    `torch.cuda.OutOfMemoryError` is `torch.OutOfMemoryError` (every accelerator) in recent torch versions.
    """
    if isinstance(error, torch.cuda.OutOfMemoryError):
        return True
    return isinstance(error, RuntimeError) and any(fragment in str(error) for fragment in _OUT_OF_MEMORY_MESSAGES)


#: Packages whose frames a warning skips, so that it points at the user's own line.
_INTERNAL_PACKAGES = (
    "lightning_influence", "pytorch_lightning", "lightning", "lightning_fabric", "torch", "contextlib", "functools"
)


def _user_stacklevel() -> int:
    """The `stacklevel` of the first frame outside this library, Lightning and torch (the user's call)."""
    frame, level = sys._getframe(2), 2  # 1 is warn_user itself, 2 its caller
    while frame is not None:
        package = (frame.f_globals.get("__name__") or "").partition(".")[0]
        if package not in _INTERNAL_PACKAGES:
            return level
        frame, level = frame.f_back, level + 1
    return level - 1


def warn_user(message: str, category: type[Warning] = RuntimeWarning) -> None:
    """Warn with the location of the user's call that led here, not of the library line that noticed."""
    warnings.warn(message, category, stacklevel=_user_stacklevel())
