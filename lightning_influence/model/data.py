"""Reading (inputs, targets) batches from DataLoaders onto the model's device and dtype."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any, TypeVar

import torch
from torch.utils._pytree import tree_map

T = TypeVar("T")

#: Key pairs tried, in order, when a batch is a dict.
DICT_KEY_PAIRS: tuple[tuple[str, str], ...] = (
    ("x", "y"),
    ("input", "target"),
    ("inputs", "targets"),
    ("image", "label"),
    ("images", "labels"),
    ("features", "labels"),
    ("data", "target"),
)


def split_batch(batch: Any) -> tuple[Any, torch.Tensor]:
    """Split a batch into (inputs, targets).

    Tuples and lists give their first two items; dicts the first matching key pair of `DICT_KEY_PAIRS`.
    """
    if isinstance(batch, Sequence) and not isinstance(batch, (str, bytes)) and len(batch) >= 2:
        return batch[0], batch[1]
    if isinstance(batch, Mapping):
        for input_key, target_key in DICT_KEY_PAIRS:
            if input_key in batch and target_key in batch:
                return batch[input_key], batch[target_key]
        raise ValueError(
            f"Cannot find inputs and targets in a dict batch with keys {sorted(batch)}; expected one of the "
            f"key pairs {[list(pair) for pair in DICT_KEY_PAIRS]}, or pass a function that maps the batch to "
            "(inputs, targets)."
        )
    raise ValueError(
        f"Cannot split a batch of type {type(batch).__name__} into (inputs, targets): yield (inputs, targets) "
        "tuples, or dicts with keys such as 'x'/'y', or pass a function that maps the batch to (inputs, targets)."
    )


def batch_size(inputs: Any) -> int:
    """Number of examples in a batch of inputs (a tensor or a pytree of tensors sharing dim 0)."""
    leaves = [leaf for leaf in _leaves(inputs) if isinstance(leaf, torch.Tensor)]
    if not leaves:
        raise TypeError(f"Batch inputs hold no tensor (got {type(inputs).__name__}).")
    if leaves[0].ndim == 0:
        raise ValueError("Batch inputs are 0-dimensional; the first dimension must index the examples.")
    return leaves[0].shape[0]


def _leaves(tree: Any) -> list[Any]:
    found: list[Any] = []
    tree_map(found.append, tree)
    return found


def to_model(inputs: Any, device: torch.device, dtype: torch.dtype) -> Any:
    """Move a pytree of tensors to `device`, casting floating-point tensors to `dtype`."""

    def move(leaf: Any) -> Any:
        if not isinstance(leaf, torch.Tensor):
            return leaf
        if leaf.is_floating_point():
            return leaf.to(device=device, dtype=dtype)
        return leaf.to(device=device)

    return tree_map(move, inputs)


def progress_bar(iterable: Iterable[T], enabled: bool, desc: str, total: int | None = None) -> Iterable[T]:
    """Wrap `iterable` in a tqdm bar when `enabled`; otherwise return it unchanged."""
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, total=total, leave=False)


def loader_length(loader: Iterable[Any]) -> int | None:
    """Number of batches of a loader, or None when it has no length (e.g. an IterableDataset)."""
    try:
        return len(loader)  # type: ignore[arg-type]
    except TypeError:
        return None


def iterate_batches(
    loader: Iterable[Any],
    device: torch.device,
    dtype: torch.dtype,
    *,
    name: str,
    progress: bool = False,
    desc: str | None = None,
    allow_empty: bool = False,
) -> Iterator[tuple[int, Any, torch.Tensor]]:
    """Yield (batch index, inputs, targets) on the model's device; refuse an empty loader by `name`.

    `desc` labels the progress bar (default: `name`). `allow_empty` accepts a loader without batches: one
    process's shard may be empty when the data is split across processes.
    """
    if isinstance(loader, (torch.Tensor, str, bytes)) or not isinstance(loader, Iterable):
        raise TypeError(
            f"{name} must be an iterable of (inputs, targets) batches such as a torch DataLoader, "
            f"got {type(loader).__name__}."
        )
    empty = True
    for index, batch in enumerate(progress_bar(loader, progress, desc or name, loader_length(loader))):
        inputs, targets = split_batch(batch)
        empty = False
        yield index, to_model(inputs, device, dtype), to_model(targets, device, dtype)
    if empty and not allow_empty:
        raise ValueError(f"{name} yielded no batches; pass a DataLoader over a non-empty dataset.")


def slice_batch(inputs: Any, targets: torch.Tensor, start: int, stop: int) -> tuple[Any, torch.Tensor]:
    """Examples start:stop of a batch (every tensor leaf of the inputs sliced along its first dimension)."""
    cut = lambda t: t[start:stop] if isinstance(t, torch.Tensor) else t  # noqa: E731
    return tree_map(cut, inputs), targets[start:stop]


def row_slices(total: int, rows: int | None) -> Iterator[tuple[int, int]]:
    """(start, stop) of consecutive pieces of at most `rows` of `total` rows (one piece when rows is None)."""
    step = max(1, total if rows is None else rows)
    for start in range(0, total, step):
        yield start, min(start + step, total)
