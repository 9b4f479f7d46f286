"""Training and query data: datasets read by dataset index (`IndexedData`), and (inputs, targets) batches
moved onto the model's device and dtype."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, TypeVar

import torch
from torch import Tensor
from torch.utils._pytree import tree_map
from torch.utils.data import DataLoader, Dataset, IterableDataset, Subset, default_collate

T = TypeVar("T")
#: Maps a collated batch to (inputs, targets) when tuples, lists and dicts with known keys do not suffice.
BatchTransform = Callable[[Any], Any]

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


def sample_positions(n: int, k: int | None, seed: int) -> list[int]:
    """Positions of `k` of `n` items drawn without replacement by `seed`, in increasing order; all `n` (in order)
    when k is None or at least n, so that a sample of everything is exactly everything."""
    if k is None or k >= n:
        return list(range(n))
    return sorted(torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:k].tolist())


def subsample_loader(loader: Iterable[Any], k: int | None, seed: int) -> Iterable[Any]:
    """Batches of `k` examples of `loader`'s dataset drawn by `seed` (`sample_positions`), batched and collated
    as `loader` does; `loader` itself when k is None or covers its dataset. Needs a DataLoader over a
    map-style dataset with a batch size."""
    if k is None:
        return loader
    dataset = getattr(loader, "dataset", None)
    if not isinstance(loader, DataLoader) or isinstance(dataset, IterableDataset) or loader.batch_size is None:
        raise TypeError(
            f"curvature_samples needs training_data to be a DataLoader with a batch_size over a map-style dataset "
            f"(to draw examples from), got {type(loader).__name__}."
        )
    if k >= len(dataset):
        return loader
    subset = Subset(dataset, sample_positions(len(dataset), k, seed))
    return DataLoader(subset, batch_size=loader.batch_size, collate_fn=loader.collate_fn)


class _TransformedLoader:
    """A loader whose batches pass through the user's `batch_transform`; iterable many times, with a length."""

    def __init__(self, loader: DataLoader, transform: BatchTransform, name: str) -> None:
        self.loader, self.transform, self.name = loader, transform, name

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[Any]:
        for batch in self.loader:
            yield _apply_transform(self.transform, batch, self.name)


def _apply_transform(transform: BatchTransform, batch: Any, name: str) -> Any:
    try:
        return transform(batch)
    except Exception as error:
        raise ValueError(
            f"batch_transform failed on a batch of {name} ({type(error).__name__}: {error}); it must map a "
            "collated batch to (inputs, targets)."
        ) from error


class IndexedData:
    """A map-style dataset read by dataset index in a fixed order, batched with its own collate function.

    Args:
        data: a map-style `Dataset`, or a `DataLoader` whose dataset and collate function are used (its
            sampler and shuffling are ignored, so indices stay those of the dataset).
        batch_transform: maps a collated batch to `(inputs, targets)` when tuples/lists/dicts do not suffice.
        name: how errors refer to this data.
    """

    def __init__(self, data: Dataset | DataLoader, *, batch_transform: BatchTransform | None = None,
                 name: str = "data") -> None:
        collate: Callable[[list[Any]], Any] = default_collate
        dataset: Any = data
        if isinstance(data, DataLoader):
            dataset = data.dataset
            if data.batch_sampler is not None:  # automatic batching: its collate_fn makes batches from items
                collate = data.collate_fn
        if isinstance(dataset, IterableDataset):
            raise TypeError(
                f"{name} is an IterableDataset; influence ties every score to a dataset index, so it needs a "
                "map-style Dataset (with __getitem__ and __len__). Materialise the data as such a Dataset."
            )
        if not hasattr(dataset, "__getitem__") or not hasattr(dataset, "__len__"):
            raise TypeError(
                f"{name} must be a map-style torch Dataset or a DataLoader over one, got {type(data).__name__}."
            )
        if len(dataset) == 0:
            raise ValueError(f"{name} is empty; pass a dataset with at least one example.")
        if batch_transform is not None and not callable(batch_transform):
            raise TypeError(f"batch_transform must be callable as batch_transform(batch), got {batch_transform!r}.")
        self.dataset = dataset
        self.collate_fn = collate
        self.batch_transform = batch_transform
        self.name = name

    def __len__(self) -> int:
        return len(self.dataset)

    def check_indices(self, indices: Sequence[int] | None, what: str) -> list[int]:
        """All indices (None) or the given ones, checked to be distinct integers within the dataset."""
        if indices is None:
            return list(range(len(self)))
        values = indices.tolist() if isinstance(indices, Tensor) else list(indices)
        if not values:
            raise ValueError(f"{what} is empty; pass at least one dataset index.")
        bad = [v for v in values if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < len(self)]
        if bad:
            raise ValueError(f"{what} must be integers in [0, {len(self)}) for {self.name}, got {bad[:5]}.")
        if len(set(values)) != len(values):
            raise ValueError(f"{what} repeats dataset indices; each example may appear once.")
        return values

    def loader(self, indices: Sequence[int], batch_size: int) -> Iterable[Any]:
        """Batches of the examples at `indices`, in that order."""
        loader = DataLoader(Subset(self.dataset, list(indices)), batch_size=batch_size, shuffle=False,
                            collate_fn=self.collate_fn)
        return loader if self.batch_transform is None else _TransformedLoader(loader, self.batch_transform, self.name)

    def examples(self, indices: Sequence[int]) -> tuple[Any, Tensor]:
        """`(inputs, targets)` of the examples at `indices`, collated as one batch (for reports)."""
        batch = self.collate_fn([self.dataset[int(i)] for i in indices])
        if self.batch_transform is not None:
            batch = _apply_transform(self.batch_transform, batch, self.name)
        return split_batch(batch)
