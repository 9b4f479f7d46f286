"""`write_reports`: an `InfluenceResult` as files beside the tensors and as summaries for each logger.

The tags, one kind of summary each (TensorBoard keeps one plugin per tag, so a tag shared by an image and a
histogram shows one of them only):

| tag | kind |
| --- | --- |
| `influence/text/summary`, `influence/text/query_000`, …, `influence/text/self_influence` | text (markdown) |
| `influence/text/convergence` (each stage's convergence, where the metadata has `stages`) | text (markdown) |
| `influence/images/query_000`, …, `influence/images/self_influence` | images (image inputs only) |
| `influence/histograms/scores`, `influence/histograms/self_influence` | histograms |
| `influence/num_train`, `influence/trustworthy` (1 or 0), … (see `summary.scalars`) | scalars, at `step` |
| `influence/self_influence_by_rank` | scalars, step = rank |

An untrustworthy result is marked above every markdown table (`summary.trust_banner`) and in the first line of
every CSV file (`# NOT TRUSTWORTHY: ...`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from lightning_influence.model.data import IndexedData
from lightning_influence.model.twice_differentiable import TwiceDifferentiable
from lightning_influence.reports.examples import Describe, save_examples
from lightning_influence.reports.figures import query_grid, self_influence_grid
from lightning_influence.reports.images import png
from lightning_influence.reports.loggers import Summaries, send
from lightning_influence.reports.summary import (
    CONVERGENCE_TAG,
    TAG,
    convergence_markdown,
    scalars,
    self_influence_by_rank,
    summary_markdown,
    tag,
    trust_banner,
    trust_comment,
)
from lightning_influence.reports.tables import (
    build_report,
    csv_text,
    describe_query,
    query_markdown,
    query_table,
    self_influence_markdown,
    self_table,
)
from lightning_influence.storage.files import atomic_write_bytes, atomic_write_text
from lightning_influence.storage.result import InfluenceResult

EXAMPLES_FOLDER = "examples"


def write_reports(
    result: InfluenceResult,
    *,
    train_data: IndexedData,
    query_data: IndexedData,
    top_k: int,
    folder: str | Path,
    loggers: Sequence[Any] = (),
    step: int = 0,
    model: TwiceDifferentiable | None = None,
    describe: Describe | None = None,
    batch_size: int = 256,
) -> Path:
    """Write the report into `folder` and to each logger (what it supports); returns the folder.

    With `model`, the model's prediction and loss of every example are shown and labels it disagrees with are
    marked as suspect; `describe(input) -> str` describes inputs in words (e.g. decoded text). Per-example facts
    and thumbnails go to `folder/examples`, where the TensorBoard dashboard reads them.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    store = save_examples(folder / EXAMPLES_FOLDER, result, train_data, query_data, model=model, describe=describe,
                          batch_size=batch_size)
    reports, self_rows = build_report(result, store, top_k)
    names = {r.position: f"query_{r.position:03d}" for r in reports}
    banner = trust_banner(result)
    texts = {tag("text", "summary"): banner + summary_markdown(result, store, self_rows, step)}
    texts.update({tag("text", names[r.position]): banner + query_markdown(r) for r in reports})
    images = {tag("images", names[r.position]): query_grid(r, store) for r in reports}
    captions = {tag("images", names[r.position]): f"Query {r.position}: {describe_query(r)}" for r in reports}
    tables = {tag("tables", "top_influence"): query_table(reports)}
    histograms = {tag("histograms", "scores"): torch.as_tensor(result.scores).flatten()}
    if self_rows:
        texts[tag("text", "self_influence")] = banner + self_influence_markdown(self_rows)
        images[tag("images", "self_influence")] = self_influence_grid(self_rows, store)
        tables[tag("tables", "self_influence")] = self_table(self_rows)
        histograms[tag("histograms", "self_influence")] = torch.as_tensor(result.self_influence)
    if result.metadata.get("stages"):
        texts[CONVERGENCE_TAG] = convergence_markdown(result)
    images = {key: image for key, image in images.items() if image is not None}

    atomic_write_text(folder / "influence.md", "\n\n".join(texts.values()) + "\n")
    for key, (columns, rows) in tables.items():
        atomic_write_text(folder / f"{key.rsplit('/', 1)[1]}.csv", csv_text(columns, rows, trust_comment(result)))
    for key, image in images.items():
        atomic_write_bytes(folder / f"{key.rsplit('/', 1)[1]}.png", png(image))

    series = {f"{TAG}/self_influence_by_rank": self_influence_by_rank(result)} if self_rows else {}
    summaries = Summaries(step=step, scalars=scalars(result), series=series, texts=texts, images=images,
                          captions=captions, histograms=histograms, tables=tables, folder=folder)
    for logger in loggers:
        send(logger, summaries)
    return folder
