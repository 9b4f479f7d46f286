"""The package's layout keeps its promises (docs/ARCHITECTURE.md): layers import only downwards, only the
Lightning layer imports Lightning, the engine runs without Lightning installed, and functions stay short."""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from pathlib import Path


PACKAGE = Path(__file__).resolve().parents[1] / "lightning_influence"
#: Top to bottom; a module may import its own layer and those below it, and the shared vocabulary.
LAYERS = ["lightning", "reports", "storage", "engine", "solvers", "curvature", "model"]
SHARED = {"enums", "errors", "checks"}
MAX_FUNCTION_LINES = 80


def _layer(module: str) -> str | None:
    """The layer of `lightning_influence.<part>...`, or None for the package root and the shared vocabulary."""
    parts = module.split(".")
    if parts[0] != "lightning_influence" or len(parts) < 2 or parts[1] in SHARED:
        return None
    return parts[1]


def _modules() -> list[tuple[str, ast.Module]]:
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        name = ".".join(("lightning_influence", *path.relative_to(PACKAGE).with_suffix("").parts))
        found.append((name.removesuffix(".__init__"), ast.parse(path.read_text(), str(path))))
    return found


def _imports(tree: ast.Module) -> list[str]:
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.append(node.module)
        elif isinstance(node, ast.Import):
            names.extend(alias.name for alias in node.names)
    return names


def test_layers_import_only_downwards():
    upward = []
    for module, tree in _modules():
        own = _layer(module)
        if own is None:
            continue
        for imported in _imports(tree):
            target = _layer(imported)
            if target is not None and LAYERS.index(target) < LAYERS.index(own):
                upward.append(f"{module} imports {imported}")
    assert not upward, upward


def test_only_the_lightning_layer_imports_lightning():
    offenders = [module for module, tree in _modules() if _layer(module) != "lightning"
                 and any(name.split(".")[0] in ("pytorch_lightning", "lightning") for name in _imports(tree))]
    assert not offenders


def test_the_engine_runs_without_lightning_installed(tmp_path):
    script = textwrap.dedent("""
        import sys
        sys.modules["pytorch_lightning"] = None  # any import of it now fails
        import torch, torch.nn.functional as F
        from torch.utils.data import TensorDataset
        import lightning_influence as li
        x, y = torch.randn(20, 4, dtype=torch.float64), torch.arange(20) % 3
        model = li.TwiceDifferentiable(torch.nn.Linear(4, 3).double(), F.cross_entropy)
        data = li.IndexedData(TensorDataset(x, y))
        arguments = li.InfluenceArguments(method="direct", hessian_regularization=0.1)
        result = li.compute_influence(model, data, data, arguments, save_dir=sys.argv[1], query_indices=[0, 1])
        assert result.scores.shape == (2, 20)
        try:
            li.InfluenceCallback
        except ImportError:
            print("ok")
    """)
    completed = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True,
                               timeout=120)
    assert completed.returncode == 0, completed.stderr[-2000:]
    assert completed.stdout.strip() == "ok"


def test_no_function_is_longer_than_the_limit():
    long = []
    for module, tree in _modules():
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    long.append(f"{module}.{node.name}: {length} lines")
    assert not long, long
