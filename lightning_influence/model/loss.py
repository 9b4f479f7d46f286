"""What a loss function is, for the record, and whether it averages over the batch as influence assumes.

A result records its loss so that scoring new data with another loss is refused: factors of one loss give
wrong scores for another. A loss is named by its import path where importing that path gives the very same
object (``torch.nn.functional.cross_entropy``); anything else (a lambda, a local function, a configured loss
module, a partial) by its qualified name and a hash of what decides its values: its code, defaults and closure,
or its configuration and tensors.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import re
import types
from typing import Any

import torch

#: Relative agreement within which a batch's loss counts as the sum of its halves' losses.
SUM_TOLERANCE = 1e-4


def _qualified_name(loss_fn: Any) -> str:
    """module.qualname of a function or class, or of the class of any other callable object."""
    named = loss_fn if isinstance(loss_fn, (types.FunctionType, types.BuiltinFunctionType, type)) else None
    if isinstance(loss_fn, types.MethodType):
        named = loss_fn.__func__
    if isinstance(loss_fn, functools.partial):
        return f"partial({_qualified_name(loss_fn.func)})"
    named = named if named is not None else type(loss_fn)
    return f"{getattr(named, '__module__', '?')}.{getattr(named, '__qualname__', type(named).__name__)}"


def _imports_as(name: str, loss_fn: Any) -> bool:
    """Whether importing `name` (module path, then attributes) gives `loss_fn` itself."""
    module_name, found = name, None
    attributes: list[str] = []
    while module_name and found is None:
        try:
            found = importlib.import_module(module_name)
        except (ImportError, ValueError, TypeError):
            module_name, _, last = module_name.rpartition(".")
            attributes.insert(0, last)
    for attribute in attributes:
        found = getattr(found, attribute, None)
    return found is loss_fn


def _stable_text(value: Any) -> str:
    """A description of `value` that is the same in every process and session: code objects by their
    instructions and constants, tensors by their values, functions by their identity, no memory addresses."""
    if isinstance(value, types.CodeType):
        parts = [value.co_code.hex(), repr(value.co_names)] + [_stable_text(c) for c in value.co_consts]
        return "code(" + ",".join(parts) + ")"
    if isinstance(value, torch.Tensor):
        return f"tensor({value.dtype},{tuple(value.shape)},{value.detach().cpu().numpy().tobytes().hex()})"
    if callable(value):
        return _qualified_name(value)
    if isinstance(value, (list, tuple)):
        return type(value).__name__ + "(" + ",".join(_stable_text(v) for v in value) + ")"
    if isinstance(value, dict):
        return "{" + ",".join(f"{k!r}:{_stable_text(v)}" for k, v in sorted(value.items(), key=repr)) + "}"
    return re.sub(r" at 0x[0-9a-fA-F]+", "", repr(value))


def _defining_parts(loss_fn: Any) -> list[Any]:
    """What decides the values of a loss that cannot be named by import alone."""
    if isinstance(loss_fn, functools.partial):
        return [loss_fn.func, loss_fn.args, dict(loss_fn.keywords)]
    function = loss_fn.__func__ if isinstance(loss_fn, types.MethodType) else loss_fn
    if isinstance(function, types.FunctionType):
        cells = [cell.cell_contents for cell in function.__closure__ or ()]
        return [function.__code__, function.__defaults__, function.__kwdefaults__, cells]
    attributes = getattr(loss_fn, "__dict__", {})
    settings = {k: v for k, v in attributes.items() if not k.startswith("_") and k != "training"}
    tensors = dict(loss_fn.state_dict()) if isinstance(loss_fn, torch.nn.Module) else {}
    return [settings, tensors]


def loss_identity(loss_fn: Any) -> str:
    """The loss's import path where that path imports to this very object, else its qualified name and a hash
    of its code (functions) or configuration (loss objects), e.g. ``__main__.<lambda>#3f2a9c1e0b7d``."""
    name = _qualified_name(loss_fn)
    if _imports_as(name, loss_fn):
        return name
    digest = hashlib.sha256("|".join(_stable_text(p) for p in _defining_parts(loss_fn)).encode()).hexdigest()
    return f"{name}#{digest[:12]}"


def summed_over_batch(whole: float, first: float, second: float, first_size: int, second_size: int) -> bool:
    """Whether a batch's loss `whole` is the sum of its halves' losses rather than their size-weighted mean.

    A mean loss gives whole = (n₁·first + n₂·second) / (n₁ + n₂); a summed one gives whole = first + second. The
    two differ unless both halves have zero loss, so only a clear sum is reported: `whole` within
    `SUM_TOLERANCE` of the sum and ten times farther from the mean. Other reductions (a mean over tokens, a
    constant added) are left alone.
    """
    scale = max(abs(first), abs(second), torch.finfo(torch.float64).tiny)
    mean = (first_size * first + second_size * second) / (first_size + second_size)
    off_sum, off_mean = abs(whole - (first + second)), abs(whole - mean)
    return off_sum <= SUM_TOLERANCE * scale and off_mean > 10 * SUM_TOLERANCE * scale
