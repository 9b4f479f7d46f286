"""String enums for the choices a user makes: how to invert the curvature, which influence to compute."""

from __future__ import annotations

from enum import Enum


class _ChoiceEnum(str, Enum):
    """A string enum that accepts plain strings and names the valid choices when given a wrong one."""

    @classmethod
    def parse(cls, value: str | _ChoiceEnum) -> _ChoiceEnum:
        if isinstance(value, cls):
            return value
        if isinstance(value, str):
            try:
                return cls(value.lower())
            except ValueError:
                pass
        valid = ", ".join(repr(member.value) for member in cls)
        raise ValueError(f"Unknown {cls._label()} {value!r}; choose one of {valid}.")

    @classmethod
    def _label(cls) -> str:
        return cls.__name__

    def __str__(self) -> str:
        return self.value


class InversionMethod(_ChoiceEnum):
    """How s = (H + λI)⁻¹ g is computed. Each member has one solver in `lightning_influence.solvers`."""

    direct = "direct"
    cg = "cg"
    lissa = "lissa"
    arnoldi = "arnoldi"
    ekfac = "ekfac"
    nystroem = "nystroem"

    @classmethod
    def _label(cls) -> str:
        return "inversion method"


class InfluenceType(_ChoiceEnum):
    """`up`: effect of up-weighting a training example on a query's loss, shape [M, N].
    `perturbation`: gradient of that effect with respect to the training input, shape [M, N, *x_shape]."""

    up = "up"
    perturbation = "perturbation"

    @classmethod
    def _label(cls) -> str:
        return "influence type"
