"""The run at a glance: the numbers worth plotting as scalars, and a summary table that says what they mean.

Scalars are logged once, at `step` = the trainer's global step when influence was computed, so that they sit at
the end of the training curves of the weights they describe and runs can be compared at a glance. The one series,
`influence/self_influence_by_rank`, uses step = rank (1, 2, …): its elbow shows how many examples stand out.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from lightning_influence.reports.examples import ExampleStore
from lightning_influence.reports.tables import Row
from lightning_influence.storage.result import InfluenceResult

TAG = "influence"
RANKS_PLOTTED = 1000  # points of the self-influence-by-rank series


def _regularization(result: InfluenceResult) -> float | None:
    value = result.metadata.get("hessian_regularization")
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def scalars(result: InfluenceResult) -> dict[str, float]:
    """Time taken, sizes, solver convergence and the largest self-influence, as `influence/<name>`.

    The smallest eigenvalue is reported for H + λI, the matrix actually inverted (positive: invertible), rather
    than for H, whose near-zero eigenvalues of either sign are rounding, not trouble.
    """
    meta = result.metadata
    convergence = meta.get("convergence", {})
    values: dict[str, Any] = {
        "num_train": result.num_train,
        "num_queries": result.num_queries,
        "total_seconds": meta.get("timings", {}).get("total_seconds"),
    }
    for key in ("max_relative_residual", "iterations", "condition_number"):
        values[key] = convergence.get(key)
    smallest, damping = convergence.get("min_eigenvalue"), _regularization(result)
    if isinstance(smallest, (int, float)) and damping is not None:
        values["min_damped_eigenvalue"] = smallest + damping
    if result.self_influence is not None:
        values["self_influence_max"] = float(np.max(np.asarray(result.self_influence)))
    return {f"{TAG}/{k}": float(v) for k, v in values.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


def self_influence_by_rank(result: InfluenceResult) -> list[float]:
    """The RANKS_PLOTTED largest self-influences, largest first (empty without self-influence)."""
    if result.self_influence is None:
        return []
    values = np.asarray(result.self_influence)
    count = min(RANKS_PLOTTED, len(values))
    top = np.argpartition(-values, count - 1)[:count]
    return sorted(values[top].tolist(), reverse=True)


def _suspect_counts(store: ExampleStore, self_rows: Sequence[Row]) -> list[tuple[str, str]]:
    suspects = store.train.suspects
    if suspects is None:
        return []
    total, count = int(np.count_nonzero(suspects)), len(suspects)
    facts = [("training labels the model disagrees with (⚠ suspect)", f"{total} of {count} ({total / count:.1%})")]
    if self_rows:
        marked = sum(bool(r.example.suspect) for r in self_rows)
        facts.append((f"suspect labels among the top {len(self_rows)} self-influence", f"{marked} of {len(self_rows)}"))
    return facts


def summary_markdown(result: InfluenceResult, store: ExampleStore, self_rows: Sequence[Row], step: int) -> str:
    """A markdown table of the run: method, sizes, time, convergence, suspect labels, and where the scalars sit."""
    meta = result.metadata
    names = meta.get("parameter_names")
    facts = [
        ("method", f"{meta.get('method', '?')} {meta.get('method_kwargs', '')}".strip()),
        ("λ (hessian_regularization)", str(meta.get("hessian_regularization", "?"))),
        ("curvature", f"{meta.get('curvature', '?')}" + (", block-diagonal" if meta.get("block_diagonal") else "")),
        ("training examples N, queries M", f"{result.num_train}, {result.num_queries}"),
        ("parameters p", f"{meta.get('num_params', '?')}" + (f" ({', '.join(names)})" if names else "")),
    ]
    facts += [(name.removeprefix(f"{TAG}/").replace("_", " "), f"{value:.4g}")
              for name, value in scalars(result).items() if not name.endswith(("num_train", "num_queries"))]
    facts += _suspect_counts(store, self_rows)
    lines = ["**Influence run**", "", "| | |", "| --- | --- |"] + [f"| {k} | {v} |" for k, v in facts]
    lines += ["", f"Scalars `{TAG}/*` are logged at step {step}, the trainer's global step when influence was "
              f"computed; `{TAG}/self_influence_by_rank` has step = rank."]
    return "\n".join(lines)
