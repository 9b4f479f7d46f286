"""Training and query data: datasets read by dataset index (`IndexedData`), and (inputs, targets) batches
moved onto the model's device and dtype."""

from __future__ import annotations

import bisect
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, TypeVar

import torch
from torch import Tensor
from torch.utils._pytree import tree_map
from torch.utils.data import ConcatDataset, DataLoader, Dataset, IterableDataset, Subset, default_collate

T = TypeVar("T")
#: Maps a collated batch to (inputs, targets) when tuples, lists and dicts with known keys do not suffice.
BatchTransform = Callable[[Any], Any]

#: Maps a position in a dataset to the user's own ID of that example (a file name, a row id).
IndexFn = Callable[[int], Any]

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


class BatchSpan(int):
    """The label of a compute batch: the index of the first loader batch it joins (its value, so it prints and
    compares as that index) and the sizes of all of them, so that a failure can name the loader batch it came
    from."""

    sizes: tuple[int, ...]

    def __new__(cls, first: int, sizes: Sequence[int]) -> BatchSpan:
        span = super().__new__(cls, first)
        span.sizes = tuple(sizes)
        return span

    def loader_batch(self, row: int) -> int:
        """The index of the loader batch that holds example `row` of the compute batch."""
        end = 0
        for offset, size in enumerate(self.sizes):
            end += size
            if row < end:
                return int(self) + offset
        return int(self) + len(self.sizes) - 1

    def blame(self, values: torch.Tensor, first_row: int | None, inputs: Any) -> int:
        """The loader batch a non-finite `values` came from: the first non-finite row when `values` holds one
        row per example from `first_row` on, else the first loader batch with non-finite inputs, else the first
        loader batch."""
        if first_row is not None and values.ndim:
            bad = (~torch.isfinite(values.reshape(values.shape[0], -1))).any(1).nonzero()
            if len(bad):
                return self.loader_batch(first_row + int(bad[0]))
        leaves = [leaf for leaf in _leaves(inputs) if isinstance(leaf, torch.Tensor) and leaf.is_floating_point()]
        if leaves:
            bad_rows = ~torch.stack([torch.isfinite(leaf.reshape(leaf.shape[0], -1)).all(1) for leaf in leaves]).all(0)
            if bool(bad_rows.any()):
                return self.loader_batch(int(bad_rows.nonzero()[0]))
        return int(self)


def rebatched(
    batches: Iterator[tuple[int, Any, torch.Tensor]], rows_for: Callable[[Any, torch.Tensor], int]
) -> Iterator[tuple[BatchSpan, Any, torch.Tensor]]:
    """Consecutive batches of `iterate_batches` joined into compute batches of up to `rows_for(inputs, targets)`
    examples (asked of the first batch), in order; each is labelled with a `BatchSpan` of its loader batches.

    The cost of a vectorised call has a fixed part, so the loader's batch size (64 in a training loop) should
    not decide how many calls a pass makes. A loader batch larger than the limit passes whole (the caller
    slices it), batches whose examples differ in shape (sequences padded to each batch's longest) are not
    joined, and examples are never reordered.
    """
    first = next(batches, None)
    if first is None:
        return
    rows = max(1, rows_for(first[1], first[2]))
    pending = [first]
    size = batch_size(first[1])
    for batch in batches:
        added = batch_size(batch[1])
        if size + added > rows or _example_shapes(batch) != _example_shapes(pending[-1]):
            yield _joined(pending)
            pending, size = [], 0
        pending.append(batch)
        size += added
    yield _joined(pending)


def _example_shapes(batch: tuple[int, Any, torch.Tensor]) -> list[tuple[int, ...]]:
    """The shape of one example of every tensor in a batch: batches padded to other lengths cannot be joined."""
    return [tuple(leaf.shape[1:]) for leaf in _leaves((batch[1], batch[2])) if isinstance(leaf, torch.Tensor)]


def _joined(batches: list[tuple[int, Any, torch.Tensor]]) -> tuple[BatchSpan, Any, torch.Tensor]:
    """One batch from several: every tensor leaf of the inputs, and the targets, concatenated along dim 0."""
    span = BatchSpan(batches[0][0], [batch_size(inputs) for _, inputs, _ in batches])
    if len(batches) == 1:
        return span, batches[0][1], batches[0][2]
    inputs = tree_map(lambda *leaves: torch.cat(leaves) if isinstance(leaves[0], torch.Tensor) else leaves[0],
                      *[inputs for _, inputs, _ in batches])
    return span, inputs, torch.cat([targets for _, _, targets in batches])


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


def _hooked_id(dataset: Any, position: int) -> Any:
    """The `influence_id(position)` of the dataset holding example `position`, looked up through `Subset` and
    `ConcatDataset` wrappers; None when no dataset on the way defines it."""
    while not callable(getattr(dataset, "influence_id", None)):
        if isinstance(dataset, Subset):
            dataset, position = dataset.dataset, int(dataset.indices[position])
        elif isinstance(dataset, ConcatDataset):
            which = bisect.bisect_right(dataset.cumulative_sizes, position)
            position -= dataset.cumulative_sizes[which - 1] if which else 0
            dataset = dataset.datasets[which]
        else:
            return None
    return dataset.influence_id(position)


class IndexedData:
    """A map-style dataset read by dataset index in a fixed order, batched with its own collate function.

    An index is a position in the dataset given here (`dataset[index]`): with a `Subset` a position in the subset,
    with a `ConcatDataset` a position in the concatenation; a `batch_transform` does not change it. The user's own
    IDs come from `index_fn(position)` or, without it, from an ``influence_id(position)`` method of the dataset
    (found through `Subset` and `ConcatDataset`); see `ids`.

    Args:
        data: a map-style `Dataset`, or a `DataLoader` whose dataset and collate function are used (its
            sampler and shuffling are ignored, so indices stay those of the dataset).
        batch_transform: maps a collated batch to `(inputs, targets)` when tuples/lists/dicts do not suffice.
        name: how errors refer to this data.
        index_fn: maps a position in this dataset to the user's own ID of the example, for reports.
    """

    def __init__(self, data: Dataset | DataLoader, *, batch_transform: BatchTransform | None = None,
                 name: str = "data", index_fn: IndexFn | None = None) -> None:
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
        for option, value in (("batch_transform", batch_transform), ("index_fn", index_fn)):
            if value is not None and not callable(value):
                raise TypeError(f"{option} must be callable, got {value!r}.")
        self.dataset = dataset
        self.collate_fn = collate
        self.batch_transform = batch_transform
        self.name = name
        self.index_fn = index_fn

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
            raise ValueError(
                f"{what} must be integers in [0, {len(self)}): they are positions in {self.name}, a "
                f"{type(self.dataset).__name__} of {len(self)} examples; got {bad[:5]}."
            )
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

    def ids(self, indices: Sequence[int]) -> list[str] | None:
        """The user's own IDs of the examples at `indices`, as text: from `index_fn`, else from the datasets'
        ``influence_id`` (empty where a wrapped dataset lacks it); None when there is neither."""
        if self.index_fn is not None:
            try:
                return [str(self.index_fn(int(i))) for i in indices]
            except Exception as error:
                raise ValueError(
                    f"index_fn failed on a position of {self.name} ({type(error).__name__}: {error}); it must map a "
                    f"position in [0, {len(self)}) to the example's ID."
                ) from error
        found = [_hooked_id(self.dataset, int(i)) for i in indices]
        return None if all(f is None for f in found) else ["" if f is None else str(f) for f in found]
