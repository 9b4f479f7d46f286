"""What a model returns, and the one tensor of it that some computations need: the logits f.

`loss_fn(outputs, targets)` always receives the model's output as it is: a tensor, a tuple, a dict or a
dataclass (such as a Hugging Face ``ModelOutput``). Three computations need the loss as a function of one
tensor f: the Gauss–Newton curvature G = Jᵀ ∇²_f ℓ J, EK-FAC's pseudo-gradients (back-propagated from f) and
the per-layer gradient path (δ from ∇_f ℓ). There f = ``output_transform(outputs)``, and the loss of f is
``loss_fn(outputs with f put back in its place, targets)``: the loss must depend on the output only through f.

``output_transform`` is None (the output must itself be a tensor), a callable returning a tensor that the
output holds (in a tuple, list, dict or dataclass field, at any depth), or a string:

- a key or attribute name, such as ``"logits"`` (a dict key if the output is a mapping holding it, else an
  attribute; a named tuple's field by name);
- an integer index, such as ``"0"`` or ``"-1"`` (an item of a tuple or list);
- a dotted path to such a callable, such as ``"my_package.outputs.pick_logits"``.
"""

from __future__ import annotations

import copy
import dataclasses
import re
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Union

from torch import Tensor

from lightning_influence.checks import import_object

#: One step into an output: ("item", key or index) or ("attr", name).
Step = tuple[str, Any]
Path = tuple[Step, ...]
OutputTransformLike = Union[str, Callable[[Any], Tensor], "OutputTransform", None]

GRAMMAR = (
    "a key or attribute name such as 'logits', an index such as '0', a dotted path 'package.module.function', "
    "or a callable returning a tensor held by the model's output"
)


def _children(tree: Any) -> Iterator[tuple[Step, Any]]:
    """The direct children of a container in an output: tuple and list items, mapping values, dataclass fields."""
    if isinstance(tree, (tuple, list)):
        yield from ((("item", index), child) for index, child in enumerate(tree))
    elif isinstance(tree, Mapping):
        yield from ((("item", key), child) for key, child in tree.items())
    elif dataclasses.is_dataclass(tree) and not isinstance(tree, type):
        yield from ((("attr", field.name), getattr(tree, field.name)) for field in dataclasses.fields(tree))


def locate(tree: Any, target: Tensor) -> Path | None:
    """The path to `target` (by identity) inside `tree`, or None when `tree` does not hold it."""
    if tree is target:
        return ()
    if isinstance(tree, Tensor):
        return None
    for step, child in _children(tree):
        found = locate(child, target)
        if found is not None:
            return (step, *found)
    return None


def get_at(tree: Any, path: Path) -> Any:
    """The value at `path` inside `tree`."""
    for kind, key in path:
        tree = tree[key] if kind == "item" else getattr(tree, key)
    return tree


def replace_at(tree: Any, path: Path, value: Any) -> Any:
    """A copy of `tree` with `value` at `path`; containers on the path are copied (shallowly), never mutated."""
    if not path:
        return value
    (kind, key), rest = path[0], path[1:]
    new_child = replace_at(get_at(tree, ((kind, key),)), rest, value)
    if isinstance(tree, tuple):
        items = list(tree)
        items[key] = new_child
        return type(tree)(*items) if hasattr(tree, "_fields") else tuple(items)
    copied = copy.copy(tree)
    if kind == "item":
        copied[key] = new_child
    else:
        object.__setattr__(copied, key, new_child)  # also for frozen dataclasses
    return copied


def _describe(outputs: Any) -> str:
    """The type of an output and what it holds, for error messages."""
    if isinstance(outputs, Mapping):
        return f"a {type(outputs).__name__} with keys {list(outputs)}"
    if isinstance(outputs, (tuple, list)):
        return f"a {type(outputs).__name__} of {len(outputs)} items"
    if dataclasses.is_dataclass(outputs):
        return f"a {type(outputs).__name__} with fields {[f.name for f in dataclasses.fields(outputs)]}"
    return f"a {type(outputs).__name__}"


class OutputTransform:
    """Which tensor of a model's output is the logits f (see the module docstring for the accepted values).

    Built once where the option enters (`TwiceDifferentiable`, the callback); `spec` is the value as given.
    """

    def __init__(self, spec: OutputTransformLike) -> None:
        if isinstance(spec, OutputTransform):
            spec = spec.spec
        self.spec = spec
        self._step: Step | None = None  # a key/attribute ("name", ...) or an index ("item", int)
        self._pick: Callable[[Any], Any] | None = None
        if spec is None or callable(spec):
            self._pick = spec
        elif not isinstance(spec, str):
            raise TypeError(f"output_transform must be None, a string or a callable, got {spec!r}; use {GRAMMAR}.")
        elif re.fullmatch(r"-?\d+", spec):
            self._step = ("item", int(spec))
        elif spec.isidentifier():
            self._step = ("name", spec)
        elif all(part.isidentifier() for part in spec.split(".")):
            self._pick = _import_callable(spec)
        else:
            raise ValueError(f"output_transform={spec!r} is not {GRAMMAR}.")

    def __repr__(self) -> str:
        return f"OutputTransform({self.spec!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, OutputTransform) and other.spec == self.spec

    def __hash__(self) -> int:
        return hash(self.spec)

    def path(self, outputs: Any) -> Path | None:
        """Where f sits in `outputs`: () when the output is f itself; None when there is no f (no transform and
        an output that is not a tensor). A transform that picks nothing, or no tensor, raises with the reason."""
        if self._step is not None:
            path = (self._resolve_step(outputs),)
        elif self._pick is None:
            return () if isinstance(outputs, Tensor) else None
        else:
            picked = self._pick(outputs)
            path = locate(outputs, picked) if isinstance(picked, Tensor) else None
            if path is None:
                raise TypeError(
                    f"output_transform={self.spec!r} must return a tensor that the model's output holds (in a tuple, "
                    f"list, dict or dataclass field), got {type(picked).__name__} from {_describe(outputs)}; return "
                    "the logits themselves, e.g. lambda out: out['logits'], and compute anything else in loss_fn."
                )
        if not isinstance(get_at(outputs, path), Tensor):
            raise TypeError(
                f"output_transform={self.spec!r} picks a {type(get_at(outputs, path)).__name__} from "
                f"{_describe(outputs)}, not a tensor of logits."
            )
        return path

    def _resolve_step(self, outputs: Any) -> Step:
        """The step of a key/attribute name or an index, checked against this output."""
        kind, key = self._step  # type: ignore[misc]  # set when called
        if kind == "item":
            if isinstance(outputs, (tuple, list)) and -len(outputs) <= key < len(outputs):
                return ("item", key % len(outputs))
        elif isinstance(outputs, Mapping) and key in outputs:
            return ("item", key)
        elif isinstance(outputs, tuple) and key in getattr(outputs, "_fields", ()):
            return ("item", outputs._fields.index(key))
        elif not isinstance(outputs, (Mapping, Tensor)) and hasattr(outputs, key):
            return ("attr", key)
        raise ValueError(f"output_transform={self.spec!r} finds nothing in the model's output, {_describe(outputs)}.")


def _import_callable(path: str) -> Callable[[Any], Any]:
    """The callable that a dotted path names."""
    found = import_object(path, "output_transform")
    if not callable(found):
        raise TypeError(f"output_transform={path!r} names a {type(found).__name__}, which is not callable.")
    return found
