"""The report's image grids: a query beside its most helpful and harmful training images, and the training images
of highest self-influence, each captioned with index, label, prediction and score, with a legend."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from lightning_influence.reports.examples import Example, ExampleStore
from lightning_influence.reports.images import Section, Tile, grid
from lightning_influence.reports.tables import QueryReport, Row, describe_query

GRID_LIMIT = 10  # tiles per section at most

_SUSPECT = ("suspect", "label differs from prediction")


def _lines(example: Example, score: float, signed: bool) -> list[str]:
    lines = [f"#{example.index}", f"label {example.label if example.label is not None else '?'}"]
    if example.prediction is not None:
        lines.append(f"pred {example.prediction}")
    lines.append(f"{score:+.2e}" if signed else f"{score:.2e}")
    return lines


def _tiles(rows: Sequence[Row], store: ExampleStore, kind: str) -> list[Tile] | None:
    """Tiles of the rows of `kind` ("self" for all rows), or None when a training example has no thumbnail."""
    tiles = []
    for row in [r for r in rows if kind in ("self", r.kind)][:GRID_LIMIT]:
        image = store.train.thumbnail(row.example.position)
        if image is None:
            return None
        tiles.append(Tile(image, _lines(row.example, row.score, kind != "self"), kind, bool(row.example.suspect)))
    return tiles


def query_grid(report: QueryReport, store: ExampleStore) -> np.ndarray | None:
    """The query (large, with its label, prediction and loss) over its helpful and harmful training images; None
    when the inputs are not images."""
    image = store.query.thumbnail(report.position)
    helpful, harmful = _tiles(report.rows, store, "helpful"), _tiles(report.rows, store, "harmful")
    if image is None or helpful is None or harmful is None:
        return None
    query = report.query
    title = [f"Query {report.position}", *describe_query(report).split(", ", 1)]
    legend = [("helpful", "helpful (score > 0)"), ("harmful", "harmful (score < 0)")]
    legend += [_SUSPECT] if store.train.suspects is not None else []
    sections = [Section("Most helpful (removing raises the query's loss)", helpful, "none with a positive score"),
                Section("Most harmful (removing lowers the query's loss)", harmful, "none with a negative score")]
    return grid(Tile(image, [], "query", bool(query.suspect)), title, legend, sections)


def self_influence_grid(rows: Sequence[Row], store: ExampleStore) -> np.ndarray | None:
    """The training images of highest self-influence, framed in a neutral grey; None if not images or no rows."""
    tiles = _tiles(rows, store, "self")
    if not tiles:
        return None
    legend = [("self", "self-influence, largest first")]
    legend += [_SUSPECT] if store.train.suspects is not None else []
    title = ["Highest self-influence", "outliers and likely mislabelled examples"]
    return grid(None, title, legend, [Section(f"Top {len(tiles)} training examples", tiles)])
