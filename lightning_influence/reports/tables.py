"""The report's tables: per query, the top helpful and harmful training examples; the highest self-influence;
a summary of the run. As markdown (TensorBoard's TEXT tab, `influence.md`) and as CSV rows.

Every row names the training example by dataset index with its label, the model's prediction and a suspect-label
mark (the label differs from the prediction), so that a flipped label is visible in the table itself. Where the
data gives the user's own IDs (`IndexedData.ids`), an ID column follows the index: "id" in markdown, `query_id` and
`train_id` in CSV.
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


def with_id(cells: Sequence[Any], after: int, value: Any, present: bool) -> list[Any]:
    """`cells` with `value` inserted after position `after` where the table has an ID column (`present`)."""
    return [*cells[: after + 1], value, *cells[after + 1:]] if present else list(cells)


def _has_ids(rows: Iterable[Row]) -> bool:
    return any(row.example.id is not None for row in rows)


def markdown_table(header: Sequence[Any], rows: Iterable[Sequence[Any]]) -> list[str]:
    """The lines of a markdown table."""
    def line(cells: Sequence[Any]) -> str:
        return "|" + "|".join(f" {c} " if c != "" else " " for c in cells) + "|"

    return [line(header), line(["---"] * len(header)), *(line(cells) for cells in rows)]


def suspect_mark(example: Example) -> str:
    return {True: "⚠ yes", False: "", None: "–"}[example.suspect]


def describe_query(report: QueryReport) -> str:
    """'dataset index 12, label 3, predicted 5, loss 2.31' with the facts that were saved."""
    query = report.query
    parts = [f"dataset index {query.index}", *([f"id {query.id}"] if query.id is not None else []),
             f"label {_text(query.label)}"]
    if query.prediction is not None:
        parts.append(f"predicted {query.prediction}")
    if query.loss is not None:
        parts.append(f"loss {query.loss:.4g}")
    return ", ".join(parts)


def query_markdown(report: QueryReport) -> str:
    """A markdown table of one query's top helpful and harmful training examples."""
    ids = _has_ids(report.rows)
    rows = [with_id([r.kind, r.rank, r.example.index, _text(r.example.label), _text(r.example.prediction),
                     suspect_mark(r.example), f"{r.score:.4e}"], 2, r.example.id, ids) for r in report.rows]
    rows += [with_id([kind, "–", f"none with a {sign} score", "", "", "", ""], 2, "", ids)
             for kind, sign in (("helpful", "positive"), ("harmful", "negative"))
             if not any(r.kind == kind for r in report.rows)]
    header = with_id(["", "rank", "train index", "label", "predicted", "suspect label", "score"], 2, "id", ids)
    return "\n".join([f"**Query {report.position}** ({describe_query(report)}). {SIGN_NOTE}", "",
                      *markdown_table(header, rows)])


def self_influence_markdown(rows: Sequence[Row]) -> str:
    """A markdown table of the training examples with the highest self-influence."""
    ids = _has_ids(rows)
    header = with_id(["rank", "train index", "label", "predicted", "suspect label", "self-influence"], 1, "id", ids)
    cells = [with_id([r.rank, r.example.index, _text(r.example.label), _text(r.example.prediction),
                      suspect_mark(r.example), f"{r.score:.4e}"], 1, r.example.id, ids) for r in rows]
    return "\n".join(["**Highest self-influence** (outliers and likely mislabelled examples; ⚠: the label differs "
                      "from the model's prediction)", "", *markdown_table(header, cells)])


def csv_value(value: Any) -> Any:
    """A CSV cell: empty for None, true/false for booleans, floats in full (repr)."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    return repr(value) if isinstance(value, float) else value


Table = tuple[list[str], list[list[Any]]]  # (columns, rows)


def query_table(reports: Sequence[QueryReport]) -> Table:
    """QUERY_COLUMNS and their rows, with `query_id` and `train_id` after the indices where the data gives IDs."""
    query_ids = any(r.query.id is not None for r in reports)
    train_ids = _has_ids(row for r in reports for row in r.rows)

    def ids(cells: Sequence[Any], query_id: Any, train_id: Any) -> list[Any]:
        return with_id(with_id(cells, 5, train_id, train_ids), 1, query_id, query_ids)

    rows = [ids([csv_value(v) for v in (
        r.position, r.query.index, r.query.label, row.kind, row.rank, row.example.index, row.example.label, row.score,
        row.example.prediction, row.example.suspect, row.example.loss, r.query.prediction, r.query.loss)],
        csv_value(r.query.id), csv_value(row.example.id)) for r in reports for row in r.rows]
    return ids(QUERY_COLUMNS, "query_id", "train_id"), rows


def self_table(rows: Sequence[Row]) -> Table:
    """SELF_COLUMNS and their rows, with `train_id` after `train_index` where the data gives IDs."""
    ids = _has_ids(rows)
    cells = [with_id([csv_value(v) for v in (row.rank, row.example.index, row.example.label, row.score,
                                              row.example.prediction, row.example.suspect, row.example.loss)],
                     1, csv_value(row.example.id), ids) for row in rows]
    return with_id(SELF_COLUMNS, 1, "train_id", ids), cells


def csv_text(header: Sequence[str], rows: Iterable[Sequence[Any]], comment: str | None = None) -> str:
    """A CSV table; `comment`, where given, is its first line, as ``# comment``."""
    buffer = io.StringIO()
    if comment is not None:
        buffer.write("# " + comment.replace("\n", " ") + "\n")
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buffer.getvalue()
