"""Validators for user-facing options, one per kind of value, each naming the option and what it accepts.

Every option is checked once, where it enters: `InfluenceArguments` for a run, the solver's constructor for a
method's options, `TwiceDifferentiable` for the model wrapper. The layers below trust what they are handed.
"""

from __future__ import annotations

import importlib
from typing import Any, Literal

#: The curvature matrices every method can invert.
Curvature = Literal["hessian", "ggn"]
CURVATURES: tuple[str, ...] = ("hessian", "ggn")
#: A curvature, or "auto": chosen when the curvature is fitted (`lightning_influence.engine.defaults`).
CurvatureChoice = Literal["hessian", "ggn", "auto"]
#: The element types a gradient store keeps its training gradients in (`storage.gradient_store`).
StoreDtype = Literal["float32", "float16", "bfloat16", "float64"]
STORE_DTYPES: tuple[str, ...] = ("float32", "float16", "bfloat16", "float64")


def positive_int(name: str, value: Any, allow_none: bool = False) -> Any:
    """An integer option that must be ≥ 1 (or None where `allow_none`)."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}.")
    return value


def non_negative_float(name: str, value: Any) -> float:
    """A float option that must be finite and ≥ 0."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < float("inf"):
        raise ValueError(f"{name} must be a finite number ≥ 0, got {value!r}.")
    return float(value)


def flag(name: str, value: Any) -> bool:
    """A boolean option; truthy values such as 1 or "yes" are refused, so a typo never flips a default."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r}.")
    return value


def optional_flag(name: str, value: Any, meaning_of_none: str) -> bool | None:
    """True, False or None (whose meaning the message names)."""
    if value is not None and not isinstance(value, bool):
        raise TypeError(f"{name} must be True, False or None ({meaning_of_none}), got {value!r}.")
    return value


def one_of(name: str, value: Any, choices: tuple[str, ...]) -> str:
    """One of a few accepted strings."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}.")
    return value


def parameter_patterns(params: Any) -> list[str] | None:
    """Parameter names or glob patterns as a non-empty list (one string becomes a list of one); None for all."""
    if params is None:
        return None
    patterns = [params] if isinstance(params, str) else list(params) if isinstance(params, (list, tuple)) else None
    if not patterns or not all(isinstance(p, str) for p in patterns):
        raise TypeError(f"params must be a name, a glob pattern or a list of them, got {params!r}.")
    return patterns


def check_regularization(value: Any) -> float | str:
    """λ as a float ≥ 0, or the string "auto"; anything else is refused with what to pass instead."""
    if value == "auto":
        return "auto"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"hessian_regularization must be a number ≥ 0 or 'auto', got {value!r}.")
    if not value >= 0 or value == float("inf"):
        raise ValueError(f"hessian_regularization must be finite and ≥ 0, got {value!r}.")
    return float(value)


def check_curvature(curvature: Any) -> CurvatureChoice:
    """An accepted curvature name, or "auto"."""
    return one_of("curvature", curvature, (*CURVATURES, "auto"))  # type: ignore[return-value]


def non_negative_int(name: str, value: Any) -> int:
    """An integer option that must be ≥ 0 (a seed, a count that may be zero)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be an integer ≥ 0, got {value!r}.")
    return value


_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_memory(value: int | str | None, name: str = "max_memory") -> int | None:
    """A memory size in bytes from an integer or a string such as "512MB" or "2GiB" (None stays None)."""
    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        number, unit = value, ""
    elif isinstance(value, str):
        text = value.strip().upper().replace(" ", "")
        digits = text.rstrip("KMGTIB")
        number, unit = digits, text[len(digits):]
    else:
        raise TypeError(f"{name} must be a number of bytes or a string such as '2GB', got {value!r}.")
    try:
        size = int(float(number) * _UNITS[unit])
    except (KeyError, ValueError):
        raise ValueError(
            f"{name}={value!r} is not a memory size; use bytes or a number with a unit such as '512MB' or '2GiB'."
        ) from None
    if size <= 0:
        raise ValueError(f"{name} must be positive, got {value!r}.")
    return size


def import_object(path: str, what: str) -> Any:
    """The object that a dotted path 'package.module.name' names; ValueError naming `what` when it cannot be
    imported."""
    module_name, _, attribute = path.rpartition(".")
    try:
        return getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError, ValueError) as error:
        raise ValueError(f"{what}={path!r} cannot be imported: {error}.") from error
