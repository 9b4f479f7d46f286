"""The run at a glance: the numbers worth plotting as scalars, a summary table that says what they mean, each
stage's convergence, and the mark above every table of an untrustworthy result (`InfluenceResult.trustworthy`).

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
from lightning_influence.reports.tables import Row, markdown_table
from lightning_influence.storage.result import InfluenceResult

TAG = "influence"
RANKS_PLOTTED = 1000  # points of the self-influence-by-rank series


def tag(kind: str, name: str) -> str:
    """`influence/<kind>/<name>`, e.g. `influence/images/query_000`."""
    return f"{TAG}/{kind}/{name}"


CONVERGENCE_TAG = tag("text", "convergence")


def _regularization(result: InfluenceResult) -> float | None:
    value = result.metadata.get("hessian_regularization")
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def scalars(result: InfluenceResult) -> dict[str, float]:
    """Time taken, sizes, solver convergence, the largest self-influence and whether the result is trustworthy (1 or
    0), as `influence/<name>`.

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
    values["trustworthy"] = float(result.trustworthy)
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
    choices = meta.get("choices") or {}  # what ran where an option was "auto", and why

    def chosen(key: str, given: str, reason_key: str) -> str:
        return f"{choices[key]} ({choices.get(reason_key, 'given')})" if key in choices else given

    regularization = choices.get("hessian_regularization", meta.get("hessian_regularization", "?"))
    facts = [
        ("method", chosen("method", f"{meta.get('method', '?')} {meta.get('method_kwargs', '')}".strip(),
                          "method_reason")),
        ("λ (hessian_regularization)", f"{regularization:.4g}" if isinstance(regularization, float) else
         str(regularization)) if "regularization_reason" not in choices else
        ("λ (hessian_regularization)", f"{regularization:.4g} ({choices['regularization_reason']})"),
        ("curvature", chosen("curvature", str(meta.get("curvature", "?")), "curvature_reason")
         + (", block-diagonal" if meta.get("block_diagonal") else "")),
        ("training examples N, queries M", f"{result.num_train}, {result.num_queries}"),
        ("parameters p", f"{meta.get('num_params', '?')}" + (f" ({', '.join(names)})" if names else "")),
    ]
    projection = meta.get("projection")
    if projection:
        facts.append(("gradient projection", f"{projection['kind']}, projection_dim={projection['dim_per_layer']}, "
                                             f"seed {projection['seed']}: k = {projection['dim']} projected values"))
    if meta.get("query_rank") is not None:
        facts.append(("query rank", f"{meta['query_rank']} per layer block of every factor"))
    kept = meta.get("gradient_store")
    if kept:
        facts.append(("gradient store", f"{kept['dtype']} [{kept['shape'][0]}, {kept['shape'][1]}]: new queries "
                                        "with InfluenceResult.score_queries"))
    facts += [(name.removeprefix(f"{TAG}/").replace("_", " "), f"{value:.4g}")
              for name, value in scalars(result).items() if not name.endswith(("num_train", "num_queries"))]
    facts += _suspect_counts(store, self_rows)
    lines = ["**Influence run**", "", "| | |", "| --- | --- |"] + [f"| {k} | {v} |" for k, v in facts]
    lines += ["", f"Scalars `{TAG}/*` are logged at step {step}, the trainer's global step when influence was "
              f"computed; `{TAG}/self_influence_by_rank` has step = rank."]
    return "\n".join(lines)


def trust_banner(result: InfluenceResult) -> str:
    """The mark above every table of an untrustworthy result, with why; "" for a trustworthy one."""
    if result.trustworthy:
        return ""
    return f"**⚠ NOT TRUSTWORTHY:** {' '.join(result.warnings)} (see `{CONVERGENCE_TAG}`)\n\n"


def trust_comment(result: InfluenceResult) -> str | None:
    """The first line of an untrustworthy result's CSV tables (without the ``#``); None for a trustworthy one."""
    return None if result.trustworthy else "NOT TRUSTWORTHY: " + " ".join(result.warnings)


def convergence_markdown(result: InfluenceResult) -> str:
    """A table of each stage's convergence, from the metadata's ``stages`` ("" without them), and the verdict."""
    stages = result.metadata.get("stages", {})
    if not stages:
        return ""
    rows = []
    for name, record in stages.items():
        residual = record.get("max_relative_residual", record.get("max_relative_change"))
        cells = [name, record.get("solves"), record.get("iterations", record.get("refine_iterations")),
                 f"{residual:.2e}" if isinstance(residual, (int, float)) else None,
                 {True: "yes", False: "**no**"}.get(record.get("converged")),
                 record.get("negative"), record.get("beyond_bound")]
        rows.append(["–" if c is None else c for c in cells])
    header = ["stage", "solves", "iterations", "largest relative residual", "converged", "negative", "beyond ‖g‖/μ"]
    verdict = "Trustworthy." if result.trustworthy else "Not trustworthy: " + " ".join(result.warnings)
    return "\n".join(["**Convergence** (per stage; every chunk's record is in metadata.json)", "",
                      *markdown_table(header, rows), "", verdict])
