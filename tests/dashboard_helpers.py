"""Saved influence runs for the dashboard tests (built without Lightning, in about a second), TensorBoard as a
subprocess with the INFLUENCE plugin, and headless Chromium from the system packages."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import TensorDataset
from torch.utils.tensorboard import SummaryWriter

from lightning_influence import IndexedData, InfluenceArguments, InfluenceResult, TwiceDifferentiable
from lightning_influence import compute_influence
from lightning_influence.reports import write_reports

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
FLIPPED = 6  # flipped training labels in `image_run`


def striped_images(n: int, seed: int) -> tuple[Tensor, Tensor]:
    """n 1×8×8 images of three classes (a bright row band, column band or diagonal) with noise."""
    generator = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 3
    x = 0.2 * torch.rand(n, 1, 8, 8, generator=generator)
    x[y == 0, :, 3:5, :] += 1.0
    x[y == 1, :, :, 3:5] += 1.0
    x[y == 2] += torch.eye(8)
    return x, y


def _fit(module: nn.Module, x: Tensor, y: Tensor, steps: int = 60) -> nn.Module:
    optimizer = torch.optim.Adam(module.parameters(), lr=0.05, weight_decay=1e-2)
    for _ in range(steps):
        optimizer.zero_grad()
        F.cross_entropy(module(x), y).backward()
        optimizer.step()
    return module


def save_run(folder: Path, train: TensorDataset, queries: TensorDataset, module: nn.Module, *,
             self_influence: bool = True, describe=None, top_k: int = 5) -> InfluenceResult:
    """Compute, save and report a run in `folder` (result/, report/) with an event file beside it, as the callback
    does under a TensorBoardLogger; returns the result."""
    model = TwiceDifferentiable(module, F.cross_entropy)
    arguments = InfluenceArguments(method="direct", hessian_regularization=0.01, self_influence=self_influence)
    result = compute_influence(model, IndexedData(train), IndexedData(queries), arguments,
                               save_dir=folder / "influence")
    with SummaryWriter(str(folder)) as writer:
        logger = type("Logger", (), {"experiment": writer})()
        write_reports(result, train_data=IndexedData(train), query_data=IndexedData(queries), top_k=top_k,
                      folder=folder / "influence" / "report", loggers=[logger], step=100, model=model,
                      describe=describe)
    return result


def image_run(folder: Path, n_train: int = 60, n_query: int = 6) -> tuple[InfluenceResult, Tensor]:
    """Images with FLIPPED training labels flipped to another class; returns the result and the flipped indices."""
    x, y = striped_images(n_train, seed=0)
    flipped = torch.arange(0, 6 * FLIPPED, 6)
    y[flipped] = (y[flipped] + 1) % 3
    x_query, y_query = striped_images(n_query, seed=1)
    module = _fit(nn.Sequential(nn.Flatten(), nn.Linear(64, 3)), x, y)
    return save_run(folder, TensorDataset(x, y), TensorDataset(x_query, y_query), module), flipped


def feature_run(folder: Path, n_train: int = 40, n_query: int = 3) -> InfluenceResult:
    """Feature vectors without self-influence, described by a `describe` callable."""
    generator = torch.Generator().manual_seed(3)
    x, y = torch.randn(n_train, 4, generator=generator), torch.arange(n_train) % 2
    module = _fit(nn.Linear(4, 2), x, y)
    queries = TensorDataset(torch.randn(n_query, 4, generator=generator), torch.arange(n_query) % 2)
    return save_run(folder, TensorDataset(x, y), queries, module, self_influence=False,
                    describe=lambda v: f"features {v[0]:.2f} {v[1]:.2f}")


_SERVE = """
import sys
from tensorboard import default, program
from lightning_influence.reports.dashboard import InfluencePlugin
plugins = default.get_plugins()  # TensorBoard's own and those registered by entry points
tensorboard = program.TensorBoard(plugins=plugins + [InfluencePlugin] * (InfluencePlugin not in plugins))
tensorboard.configure(argv=[None, "--logdir", sys.argv[1], "--port", "0", *sys.argv[2:]])
sys.exit(tensorboard.main())
"""


@contextlib.contextmanager
def tensorboard(logdir: Path, *flags: str, timeout: float = 60.0) -> Iterator[str]:
    """TensorBoard serving `logdir` with the INFLUENCE plugin (also when the package is not installed from this
    tree, so its entry point is not registered), in a subprocess; yields its URL."""
    path = os.pathsep.join([str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "PYTHONPATH": path}
    process = subprocess.Popen([sys.executable, "-c", _SERVE, str(logdir), *flags], stderr=subprocess.PIPE,
                               text=True, env=env, start_new_session=True)
    try:
        deadline, url, seen = time.monotonic() + timeout, None, []
        while url is None and time.monotonic() < deadline:
            line = process.stderr.readline()
            if not line and process.poll() is not None:
                break
            seen.append(line)
            match = re.search(r"(http://\S+?)/? \(Press CTRL\+C", line)
            url = match and match[1]
        if url is None:
            raise RuntimeError("TensorBoard did not start:\n" + "".join(seen[-30:]))
        yield url
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=10)
