"""Atomic, memory-mappable files: every write goes to a temporary file in the same folder, then `os.replace`.

A crash at any moment leaves either the old file or the new one, never half of one, so a folder that looks
complete is complete. Arrays are plain `.npy` files, readable without this package and memory-mappable.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import uuid
from collections.abc import Iterable, Mapping
from enum import Enum
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor


def _temporary(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def _fsync_dir(folder: Path) -> None:
    """Make a rename durable where the platform allows opening a directory."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write `data` to `path` so readers see the old content or all of the new, nothing in between."""
    path = Path(path)
    tmp = _temporary(path)
    try:
        with open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(path.parent)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike[str], value: Any) -> None:
    atomic_write_text(path, json.dumps(to_jsonable(value), indent=2, sort_keys=True) + "\n")


def read_json(path: str | os.PathLike[str]) -> Any:
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def atomic_save_array(path: str | os.PathLike[str], array: Tensor | np.ndarray) -> None:
    """Save a tensor or array as `.npy` (bit-exact, any shape), through a temporary file."""
    path = Path(path)
    values = to_numpy(array)
    tmp = _temporary(path)
    try:
        # open_memmap streams the values to disk; it cannot make an empty memmap, so those go through np.save.
        if values.size:
            target = np.lib.format.open_memmap(tmp, mode="w+", dtype=values.dtype, shape=values.shape)
            target[...] = values
            target.flush()
            del target
        else:
            with open(tmp, "wb") as handle:
                np.save(handle, values)
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(path.parent)


def load_array(path: str | os.PathLike[str], mmap: bool = True) -> Tensor:
    """A `.npy` file as a tensor; memory-mapped copy-on-write when `mmap` (the file is never modified)."""
    values = np.load(path, mmap_mode="c" if mmap else None)
    if values.size == 0 or values.ndim == 0:
        values = np.array(values)
    return torch.from_numpy(values)


TREE_FILE = "tree.json"


def save_tree(folder: str | os.PathLike[str], tree: Any) -> None:
    """Write nested dicts, lists and tuples of tensors, dtypes and JSON values to `folder`: each tensor as a
    `.npy` file, the rest as `tree.json`, written last (so its presence means the whole tree is there)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    arrays: list[Tensor] = []

    def encode(value: Any) -> Any:
        if isinstance(value, Tensor):
            arrays.append(value)
            return {"__array__": f"array-{len(arrays) - 1:04d}.npy"}
        if isinstance(value, torch.dtype):
            return {"__dtype__": str(value).removeprefix("torch.")}
        if isinstance(value, tuple):
            return {"__tuple__": [encode(item) for item in value]}
        if isinstance(value, list):
            return [encode(item) for item in value]
        if isinstance(value, Mapping):
            return {str(key): encode(item) for key, item in value.items()}
        return to_jsonable(value)

    encoded = encode(tree)
    for number, array in enumerate(arrays):
        atomic_save_array(folder / f"array-{number:04d}.npy", array)
    atomic_write_json(folder / TREE_FILE, encoded)


def load_tree(folder: str | os.PathLike[str]) -> Any:
    """What `save_tree` wrote to `folder`, its tensors read into memory."""
    folder = Path(folder)

    def decode(value: Any) -> Any:
        if isinstance(value, list):
            return [decode(item) for item in value]
        if not isinstance(value, dict):
            return value
        if "__array__" in value:
            return load_array(folder / value["__array__"], mmap=False)
        if "__dtype__" in value:
            return getattr(torch, value["__dtype__"])
        if "__tuple__" in value:
            return tuple(decode(item) for item in value["__tuple__"])
        return {key: decode(item) for key, item in value.items()}

    return decode(read_json(folder / TREE_FILE))


def to_numpy(array: Tensor | np.ndarray) -> np.ndarray:
    if isinstance(array, Tensor):
        tensor = array.detach().cpu()
        if tensor.dtype == torch.bfloat16:
            tensor = tensor.float()
        return tensor.contiguous().numpy()
    return np.ascontiguousarray(array)


def replace_folder(staging: Path, target: Path) -> None:
    """Put a fully written folder `staging` at `target`, keeping the old `target` until the new one is in place."""
    old = target.with_name(f".{target.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    if target.exists():
        os.replace(target, old)
    os.replace(staging, target)
    _fsync_dir(target.parent)
    if old.exists():
        shutil.rmtree(old, ignore_errors=True)


def staging_folder(target: Path) -> Path:
    """A fresh sibling folder to write into before `replace_folder`."""
    folder = target.with_name(f".{target.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    folder.mkdir(parents=True)
    return folder


def tensor_digest(tensors: Iterable[tuple[str, Tensor]]) -> str:
    """A sha256 over names, dtypes, shapes and exact bytes of tensors: equal iff the values are bit-identical."""
    digest = hashlib.sha256()
    for name, tensor in tensors:
        values = to_numpy(tensor)
        digest.update(f"{name}|{values.dtype}|{values.shape}|".encode())
        digest.update(values.tobytes())
    return digest.hexdigest()


def to_jsonable(value: Any) -> Any:
    """Metadata as JSON values: tensors and arrays become lists (scalars become numbers), enums their value."""
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, Mapping):
        return {str(key): to_jsonable(item) for key, item in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [to_jsonable(item) for item in value]
    if isinstance(value, (Tensor, np.ndarray)):
        array = to_numpy(value)
        return to_jsonable(array.item() if array.ndim == 0 else array.tolist())
    if isinstance(value, np.generic):
        return to_jsonable(value.item())
    if isinstance(value, float) and not math.isfinite(value):
        return repr(value)
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (Path, torch.dtype, torch.device)):
        return str(value)
    return repr(value)


def check_writable_folder(path: str | os.PathLike[str], what: str = "save_dir") -> Path:
    """Create `path` if needed and prove it can be written; otherwise say why not and what to do."""
    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        raise NotADirectoryError(f"{what} {str(folder)!r} is a file, not a folder; pass a folder path.")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-probe-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as error:
        raise PermissionError(
            f"{what} {str(folder)!r} cannot be written ({error.strerror or error}); pass a writable folder."
        ) from error
    return folder
