"""The report's tables: per query, the top helpful and harmful training examples; the highest self-influence;
a summary of the run. As markdown (TensorBoard's TEXT tab, `influence.md`) and as CSV rows.

Every row names the training example by dataset index with its label, the model's prediction and a suspect-label
mark (the label differs from the prediction), so that a flipped label is visible in the table itself.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from lightning_influence.reports.examples import Example, ExampleStore, top_positions
from lightning_influence.storage.result import InfluenceResult

SIGN_NOTE = ("Positive score: the training example helped (removing it would raise the query's loss); negative: "
             "it hurt. ⚠ marks a suspect label: the training label differs from the model's prediction.")
QUERY_COLUMNS = ["query", "query_index", "query_label", "kind", "rank", "train_index", "train_label", "score",
                 "train_prediction", "suspect_label", "train_loss", "query_prediction", "query_loss"]
SELF_COLUMNS = ["rank", "train_index", "train_label", "self_influence", "train_prediction", "suspect_label",
                "train_loss"]


@dataclass
class Row:
    """One line of a report table: a training example with its rank and score."""

    kind: str  # "helpful", "harmful" or "self"
    rank: int
    example: Example
    score: float


@dataclass
class QueryReport:
    """The top helpful and harmful training examples of one query."""

    position: int
    query: Example
    rows: list[Row]


def build_report(result: InfluenceResult, store: ExampleStore, top_k: int) -> tuple[list[QueryReport], list[Row]]:
    """Per-query tables and the self-influence table. Only positive scores are listed as helpful and only negative
    ones as harmful."""
    k = min(top_k, result.num_train)
    reports = []
    for query in range(result.num_queries):
        rows = []
        for kind, largest in (("helpful", True), ("harmful", False)):
            positions, scores = top_positions(result.scores[query], k, largest)
            kept = [(p, s) for p, s in zip(positions, scores) if (s > 0 if largest else s < 0)]
            rows += [Row(kind, rank + 1, store.train.example(p), s) for rank, (p, s) in enumerate(kept)]
        reports.append(QueryReport(query, store.query.example(query), rows))
    self_rows = []
    if result.self_influence is not None:
        positions, scores = top_positions(result.self_influence, k, True)
        self_rows = [Row("self", rank + 1, store.train.example(p), s) for rank, (p, s) in enumerate(zip(positions,
                                                                                                        scores))]
    return reports, self_rows


def _text(value: Any) -> str:
    return "–" if value is None else str(value)


def suspect_mark(example: Example) -> str:
    return {True: "⚠ yes", False: "", None: "–"}[example.suspect]


def describe_query(report: QueryReport) -> str:
    """'dataset index 12, label 3, predicted 5, loss 2.31' with the facts that were saved."""
    query = report.query
    parts = [f"dataset index {query.index}", f"label {_text(query.label)}"]
    if query.prediction is not None:
        parts.append(f"predicted {query.prediction}")
    if query.loss is not None:
        parts.append(f"loss {query.loss:.4g}")
    return ", ".join(parts)


def query_markdown(report: QueryReport) -> str:
    """A markdown table of one query's top helpful and harmful training examples."""
    lines = [
        f"**Query {report.position}** ({describe_query(report)}). {SIGN_NOTE}",
        "",
        "| | rank | train index | label | predicted | suspect label | score |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    lines += [f"| {r.kind} | {r.rank} | {r.example.index} | {_text(r.example.label)} | {_text(r.example.prediction)} "
              f"| {suspect_mark(r.example)} | {r.score:.4e} |" for r in report.rows]
    for kind, sign in (("helpful", "positive"), ("harmful", "negative")):
        if not any(r.kind == kind for r in report.rows):
            lines.append(f"| {kind} | – | none with a {sign} score | | | | |")
    return "\n".join(lines)


def self_influence_markdown(rows: Sequence[Row]) -> str:
    """A markdown table of the training examples with the highest self-influence."""
    lines = [
        "**Highest self-influence** (outliers and likely mislabelled examples; ⚠: the label differs from the "
        "model's prediction)",
        "",
        "| rank | train index | label | predicted | suspect label | self-influence |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    lines += [f"| {r.rank} | {r.example.index} | {_text(r.example.label)} | {_text(r.example.prediction)} | "
              f"{suspect_mark(r.example)} | {r.score:.4e} |" for r in rows]
    return "\n".join(lines)


def csv_value(value: Any) -> Any:
    """A CSV cell: empty for None, true/false for booleans, floats in full (repr)."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    return repr(value) if isinstance(value, float) else value


def query_csv_rows(reports: Iterable[QueryReport]) -> list[list[Any]]:
    """Rows under QUERY_COLUMNS."""
    return [[csv_value(v) for v in (
        r.position, r.query.index, r.query.label, row.kind, row.rank, row.example.index, row.example.label, row.score,
        row.example.prediction, row.example.suspect, row.example.loss, r.query.prediction, r.query.loss)]
        for r in reports for row in r.rows]


def self_csv_rows(rows: Iterable[Row]) -> list[list[Any]]:
    """Rows under SELF_COLUMNS."""
    return [[csv_value(v) for v in (row.rank, row.example.index, row.example.label, row.score, row.example.prediction,
                                     row.example.suspect, row.example.loss)] for row in rows]


def csv_text(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buffer.getvalue()
