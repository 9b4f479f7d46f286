"""Exceptions raised by the engine, each one saying what went wrong and how to fix it."""

from __future__ import annotations


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


class InfluenceComputationError(RuntimeError):
    """A late stage failed; `partial` holds what was already computed (e.g. the influence factors)."""

    def __init__(self, message: str, partial: dict) -> None:
        super().__init__(message)
        self.partial = partial
