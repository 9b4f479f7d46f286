"""Benchmark problem (c): influence on a transformer text classifier, ours against kronfluence and dattri.

Data: synthetic token sequences with a planted rule. Tokens 0 … C·K−1 are keywords, K for each of C classes; the
label is the class whose keywords occur most often in the sequence (by construction strictly most: 2–4 of them,
and fewer of every other class's), the rest of the sequence is filler drawn from the other tokens. 5% of the
training labels are flipped to another class (recorded). The queries are M held-out sequences with clean labels,
and M more held-out sequences are the "new queries" that a gradient store rescores. No download; seeded.

Model: nn.Embedding → L × nn.TransformerEncoderLayer (d_model, 4 heads, feed-forward 4·d_model, dropout 0,
batch_first) → mean over the sequence → nn.Linear head (3.4 M parameters at the defaults), trained in this
process with Adam. The influence of our rows is over every parameter but the LayerNorms' (EK-FAC has no
Kronecker structure for them); kronfluence and dattri take the nn.Linear modules whose forward runs (the
feed-forward layers and the head: both leave the attention projections out, since nn.MultiheadAttention applies
them functionally).

Rows, in one process on the same model and loaders (`--rows` picks some by number):
  1 ours EK-FAC, unprojected, full rank: the reference A (with self-influence)
  2 ours CG on the Gauss-Newton matrix (only with --cg; costly)
  3 ours EK-FAC with projection_dim=k (with self-influence)
  4 ours EK-FAC with query_rank=r
  5 ours EK-FAC with both
  6 ours EK-FAC with projection_dim=k and a float16 GradientStore, then rescoring the new queries from the store
  7 kronfluence EK-FAC, 8 the same with query_gradient_low_rank=r
  9 dattri LoGra (projected empirical Fisher, stored preconditioned training gradients)
  10 ours EK-FAC with projection_dim=k and the curvature fitted on a random subset (curvature_samples)

For each row: seconds of the fit, of the scores (query gradients, factors and the [M, N] scores), of the
self-influence and of rescoring where the row has them; peak memory (run.py's PeakMemory); the Pearson
correlation of the [M, N] scores with row 1 (and row 2 when run; |Pearson| for peers, whose sign convention may
differ); the flipped labels among the top 5% by self-influence, against the top 5% by training loss. A row that
fails (an API not merged yet, a peer not installed) is reported with its error; the others still run.

    python benchmarks/transformer_text.py [--train 50000] [--queries 100] [--d-model 256] [--layers 4]
        [--seq-len 32] [--threads N] [--rows 1 3 6] [--cg] [--out results.md]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, os.path.dirname(__file__))
from problems import Problem, train  # noqa: E402
from run import kronfluence_ekfac, pearson, timed  # noqa: E402

from lightning_influence import (  # noqa: E402
    CurvatureOperator,
    InfluenceArguments,
    InfluenceEngine,
    TwiceDifferentiable,
    compute_influences_up,
)
from lightning_influence.model.data import subsample_loader  # noqa: E402
from lightning_influence.solvers.base import auto_regularization  # noqa: E402

FLIP_FRACTION = 0.05
HEADS = 4


# -- data ----------------------------------------------------------------------------------------------------
def keyword_sequences(n: int, seq_len: int, vocab: int, classes: int, keywords: int,
                      generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """`n` sequences [n, seq_len] whose label [n] is the class with strictly the most keyword occurrences.

    The label's class gets 2–4 keywords (drawn from its `keywords` tokens), each other class fewer; the other
    positions hold filler tokens (≥ classes·keywords), and the positions are shuffled."""
    most = min(4, seq_len // classes)
    if most < 2 or vocab <= classes * keywords:
        raise ValueError(f"seq_len ({seq_len}) must be ≥ 2·classes ({2 * classes}) and vocab ({vocab}) > "
                         f"classes·keywords ({classes * keywords}) for the planted rule.")
    labels = torch.randint(classes, (n,), generator=generator)
    top = torch.randint(2, most + 1, (n,), generator=generator)
    counts = (torch.rand(n, classes, generator=generator) * top[:, None]).long()  # 0 … top − 1
    counts[torch.arange(n), labels] = top
    slot = torch.arange(most)
    present = slot[None, None, :] < counts[:, :, None]  # [n, classes, most]
    drawn = torch.randint(keywords, present.shape, generator=generator)
    chosen = torch.arange(classes)[None, :, None] * keywords + drawn
    tokens = torch.randint(classes * keywords, vocab, (n, seq_len), generator=generator)
    placed = torch.where(present, chosen, tokens[:, : classes * most].view(n, classes, most)).reshape(n, -1)
    tokens[:, : classes * most] = placed
    order = torch.rand(n, seq_len, generator=generator).argsort(dim=1)
    return tokens.gather(1, order), labels


def planted_class(tokens: Tensor, classes: int, keywords: int) -> Tensor:
    """The rule: the class whose keyword tokens occur most often in each sequence, [n]."""
    is_keyword = tokens < classes * keywords
    owner = torch.where(is_keyword, tokens // keywords, classes)  # filler counts for a dummy class
    counts = F.one_hot(owner, classes + 1).sum(dim=1)[:, :classes]
    return counts.argmax(dim=1)


def flip_labels(labels: Tensor, fraction: float, classes: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """A copy of `labels` with round(fraction·n) of them moved to another class, and the sorted flipped indices."""
    flipped = torch.randperm(len(labels), generator=generator)[: round(fraction * len(labels))].sort().values
    noisy = labels.clone()
    noisy[flipped] = (labels[flipped] + torch.randint(1, classes, (len(flipped),), generator=generator)) % classes
    return noisy, flipped


# -- model ---------------------------------------------------------------------------------------------------
class TextClassifier(nn.Module):
    """Embedding → stock transformer encoder layers → mean over tokens → linear head."""

    def __init__(self, vocab: int, d_model: int, layers: int, classes: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d_model)
        self.layers = nn.ModuleList(
            nn.TransformerEncoderLayer(d_model, HEADS, dim_feedforward=4 * d_model, dropout=0.0, batch_first=True)
            for _ in range(layers)
        )
        self.head = nn.Linear(d_model, classes)

    def forward(self, tokens: Tensor) -> Tensor:
        """Logits [B, classes] of token sequences [B, T], or [classes] of one unbatched sequence [T] (as stock
        modules accept; dattri's setup runs the model on one)."""
        if tokens.dim() == 1:
            return self(tokens[None])[0]
        hidden = self.embed(tokens)
        for layer in self.layers:
            hidden = layer(hidden)
        return self.head(hidden.mean(dim=1))


@dataclass
class TextProblem:
    """The trained problem (c) with what the rows share: new queries, the flipped labels, λ, training losses."""

    problem: Problem
    x_new: Tensor
    y_new: Tensor
    flipped: Tensor
    accuracy: float
    train_seconds: float
    losses: Tensor  # per-example training loss, [N]

    def new_queries(self) -> Problem:
        """The same problem with the new queries in place of the queries."""
        p = self.problem
        return Problem(p.name, p.module, p.x_train, p.y_train, self.x_new, self.y_new, p.regularization,
                       p.batch_size, p.curvature_examples)


def text_problem(args: argparse.Namespace) -> TextProblem:
    """Data, a trained TextClassifier, λ and the per-example training losses, all seeded by `args.seed`."""
    generator = torch.Generator().manual_seed(args.seed)
    total = args.train + 3 * args.queries  # queries, new queries, and a held-out set for the accuracy
    tokens, clean = keyword_sequences(total, args.seq_len, args.vocab, args.classes, args.keywords, generator)
    n, m = args.train, args.queries
    y_train, flipped = flip_labels(clean[:n], FLIP_FRACTION, args.classes, generator)
    torch.manual_seed(args.seed)
    module = TextClassifier(args.vocab, args.d_model, args.layers, args.classes)
    start = time.perf_counter()
    train(module, tokens[:n], y_train, args.weight_decay, args.epochs, args.batch_size, args.lr, args.seed)
    train_seconds = time.perf_counter() - start
    module.eval()
    with torch.no_grad():
        accuracy = float((module(tokens[n + 2 * m:]).argmax(1) == clean[n + 2 * m:]).float().mean())
    problem = Problem("c", module, tokens[:n], y_train, tokens[n : n + m], clean[n : n + m], 0.0,
                      batch_size=args.batch_size, curvature_examples=n)
    problem.regularization = damping(problem, args.damping)
    return TextProblem(problem, tokens[n + m : n + 2 * m], clean[n + m : n + 2 * m], flipped, accuracy, train_seconds,
                       training_losses(problem))


def training_losses(problem: Problem) -> Tensor:
    with torch.no_grad():
        return torch.cat([F.cross_entropy(problem.module(x), y, reduction="none") for x, y in problem.train_loader()])


def influence_params(module: nn.Module) -> list[str]:
    """Every parameter but the LayerNorms' (EK-FAC refuses those; the same set for all our rows)."""
    norms = {name for name, child in module.named_modules() if isinstance(child, nn.LayerNorm)}
    return [name for name, _ in module.named_parameters() if name.rpartition(".")[0] not in norms]


def damping(problem: Problem, value: str) -> float:
    """λ: a number, or "auto": a tenth of the Gauss-Newton matrix's mean eigenvalue, estimated (untimed) by
    Hutchinson's method on the first 1,000 training examples, as our "auto" does."""
    if value != "auto":
        return float(value)
    model = TwiceDifferentiable(problem.module, F.cross_entropy, params=influence_params(problem.module),
                                max_memory="512MB")
    subset = DataLoader(TensorDataset(problem.x_train[:1000], problem.y_train[:1000]), batch_size=problem.batch_size)
    with model.evaluating():
        return auto_regularization(CurvatureOperator(model, subset, curvature="ggn"))[0]


# -- rows ----------------------------------------------------------------------------------------------------
RowRun = Callable[[dict[str, Any]], Tensor]  # fills its record (seconds, self-influence, …), returns [M, N] scores


@dataclass
class Row:
    number: int
    label: str
    record: dict[str, Any]
    scores: Tensor | None
    seconds: float
    peak: int
    error: str


def run_row(number: int, label: str, run: RowRun, record: dict[str, Any] | None = None) -> Row:
    """One row under run.py's `timed` (peak memory, wall time, the error of a row that fails)."""
    print(f"  running {number}: {label} ...", file=sys.stderr, flush=True)
    record = record if record is not None else {}
    scores, seconds, peak, error = timed("cpu", lambda: run(record))
    return Row(number, label, record, scores, seconds, peak, error)


def since(start: float) -> float:
    return time.perf_counter() - start


def folder_bytes(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())


def ours(text: TextProblem, method: str = "ekfac", *, max_memory: str | None, projection_dim: int | None = None,
         query_rank: int | None = None, store: bool = False, self_influence: bool = False,
         curvature_samples: int | None = None, **method_options: Any) -> RowRun:
    """Our engine on one process: fit, query factors, [M, N] scores (through a float16 `GradientStore` with
    `store`, then rescoring the new queries from it), and optionally self-influence; per-example gradients held
    at once within `max_memory`; the curvature fitted on `curvature_samples` training examples (None: all)."""
    def run(record: dict[str, Any]) -> Tensor:
        problem = text.problem
        projection = {} if projection_dim is None else {"projection_dim": projection_dim, "projection_seed": 0}
        model = TwiceDifferentiable(problem.module, F.cross_entropy, params=influence_params(problem.module),
                                    max_memory=max_memory, **projection)
        arguments = InfluenceArguments(method=method, method_kwargs=method_options, curvature="ggn",
                                       hessian_regularization=problem.regularization, batch_size=problem.batch_size)
        curvature_data = subsample_loader(problem.curvature_loader(), curvature_samples, 0)
        engine = InfluenceEngine(model, curvature_data, arguments)
        start = time.perf_counter()
        engine.fit()
        record["fit_seconds"], start = since(start), time.perf_counter()
        factors = engine.factors(engine.gradients(problem.test_loader(), name="queries")).x
        if store:
            scores = stored_scores(text, engine, factors, record)
        else:
            rank = {} if query_rank is None else {"query_rank": query_rank}
            scores = compute_influences_up(model, problem.train_loader(), factors, **rank)
            record["score_seconds"] = since(start)
        if self_influence:
            start = time.perf_counter()
            record["self_influence"] = engine.self_influences(problem.train_loader())
            record["self_seconds"] = since(start)
        return scores

    return run


def stored_scores(text: TextProblem, engine: InfluenceEngine, factors: Tensor, record: dict[str, Any]) -> Tensor:
    """Scores through a float16 gradient store built once, then the new queries rescored from it; the store's
    seconds count as scoring (the first run is fit + store + scores)."""
    from lightning_influence.storage.gradient_store import GradientStore

    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "store"
        store = GradientStore.build(engine.model, text.problem.train_loader(), path, dtype="float16",
                                    batch_size=text.problem.batch_size)
        record["store_bytes"] = folder_bytes(Path(folder))
        scores = store.scores(factors)
        record["score_seconds"], start = since(start), time.perf_counter()
        new = engine.factors(engine.gradients(text.new_queries().test_loader(), name="new queries")).x
        record["rescores"] = store.scores(new)
        record["rescore_seconds"] = since(start)
    return scores


def linear_modules(module: nn.Module) -> list[str]:
    """The nn.Linear modules whose forward runs: all but nn.MultiheadAttention's, which it applies functionally."""
    inside = {f"{name}.{child}" for name, attention in module.named_modules()
              if isinstance(attention, nn.MultiheadAttention) for child, _ in attention.named_children()}
    return [name for name, child in module.named_modules() if isinstance(child, nn.Linear) and name not in inside]


def kronfluence(text: TextProblem, query_rank: int | None, self_influence: bool) -> tuple[RowRun, dict[str, Any]]:
    """run.py's kronfluence EK-FAC on the Linear modules that run, with `query_gradient_low_rank`; its record."""
    record: dict[str, Any] = {"self_influence": self_influence}
    options = {} if query_rank is None else {"query_gradient_low_rank": query_rank}
    run = kronfluence_ekfac(text.problem, "cpu", score_options=options,
                            tracked_modules=linear_modules(text.problem.module), record=record)
    return (lambda _: run()), record


def dattri_logra(text: TextProblem, projection_dim: int, self_influence: bool) -> RowRun:
    """dattri's LoGra (Kronecker-factored Gaussian projections of each Linear layer's gradient, √k × √k, the
    projected empirical Fisher + λI inverted): scores, rescoring of the new queries and optionally self-influence."""
    def run(record: dict[str, Any]) -> Tensor:
        import copy

        from dattri.algorithm.logra import LoGraAttributor
        from dattri.task import AttributionTask

        def loss(model: nn.Module, batch: tuple[Tensor, Tensor], device: str) -> Tensor:
            x, y = batch
            return F.cross_entropy(model(x.to(device)), y.to(device), reduction="sum")

        problem = text.problem
        module = copy.deepcopy(problem.module)
        task = AttributionTask(loss_func=loss, model=module, checkpoints=module.state_dict())
        folder = tempfile.mkdtemp()  # dattri writes its batch metadata there (else into the working directory)
        attributor = LoGraAttributor(task, layer_names=linear_modules(module), damping=problem.regularization,
                                     device="cpu", proj_dim=projection_dim, offload="cpu", cache_dir=folder)
        start = time.perf_counter()
        attributor.cache(problem.train_loader())
        record["fit_seconds"], start = since(start), time.perf_counter()
        scores = attributor.attribute(problem.train_loader(), problem.test_loader()).T
        record["score_seconds"], start = since(start), time.perf_counter()
        record["rescores"] = attributor.attribute(problem.train_loader(), text.new_queries().test_loader()).T
        record["rescore_seconds"], start = since(start), time.perf_counter()
        if self_influence:
            record["self_influence"] = attributor.compute_self_attribution()
            record["self_seconds"] = since(start)
        shutil.rmtree(folder)
        return scores

    return run


def rows_to_run(text: TextProblem, args: argparse.Namespace) -> list[tuple[int, str, Callable[[], Row]]]:
    """(number, label, run) of every row asked for; row 1, the reference, first."""
    k, r, selfs = args.projection_dim, args.query_rank, set(args.self_influence)
    ekfac = {"refine": args.refine, "max_memory": args.max_memory, "samples": args.samples}
    kron, kron_record = kronfluence(text, None, 7 in selfs)
    kron_rank, kron_rank_record = kronfluence(text, r, False)
    table: list[tuple[int, str, RowRun, dict[str, Any] | None]] = [
        (1, "ours ekfac (A: unprojected, full rank)", ours(text, self_influence=1 in selfs, **ekfac), None),
        (2, f"ours cg on the GGN (rtol {args.cg_rtol:g})",
         ours(text, "cg", max_memory=args.max_memory, rtol=args.cg_rtol, maxiter=args.cg_maxiter), None),
        (3, f"ours ekfac, projection_dim={k}", ours(text, projection_dim=k, self_influence=3 in selfs, **ekfac), None),
        (4, f"ours ekfac, query_rank={r}", ours(text, query_rank=r, **ekfac), None),
        (5, f"ours ekfac, projection_dim={k}, query_rank={r}", ours(text, projection_dim=k, query_rank=r, **ekfac),
         None),
        (6, f"ours ekfac, projection_dim={k}, float16 GradientStore", ours(text, projection_dim=k, store=True,
                                                                           **ekfac), None),
        (7, "kronfluence ekfac", kron, kron_record),
        (8, f"kronfluence ekfac, query_gradient_low_rank={r}", kron_rank, kron_rank_record),
        (9, f"dattri LoGra, proj_dim={args.logra_dim}", dattri_logra(text, args.logra_dim, 9 in selfs), None),
        (10, f"ours ekfac, projection_dim={k}, curvature_samples={args.curvature_samples}",
         ours(text, projection_dim=k, curvature_samples=args.curvature_samples, **ekfac), None),
    ]
    chosen = set(args.rows) - (set() if args.cg else {2})
    return [(number, label, (lambda n=number, l=label, f=fn, rec=record: run_row(n, l, f, rec)))
            for number, label, fn, record in table if number in chosen]


def flipped_found(values: Tensor | None, flipped: Tensor) -> int | None:
    """How many of the flipped labels are among the top 5% of `values` (largest first)."""
    if values is None:
        return None
    top = values.detach().double().flatten().topk(round(FLIP_FRACTION * values.numel())).indices
    return int(torch.isin(top, flipped).sum())


def row_facts(row: Row, reference: Tensor | None, cg: Tensor | None, flipped: Tensor) -> dict[str, Any]:
    """The numbers of one row for the table and the JSON file; Pearson as |Pearson| for peers."""
    def correlation(other: Tensor | None) -> float | None:
        if row.scores is None or other is None:
            return None
        value = pearson(row.scores, other)
        return abs(value) if not row.label.startswith("ours") else value

    record = row.record
    fit, score = record.get("fit_seconds"), record.get("score_seconds")
    return {
        "row": row.number, "method": row.label, "fit_s": fit, "scores_s": score,
        "fit_plus_scores_s": fit + score if fit is not None and score is not None else None,
        "self_influence_s": record.get("self_seconds"), "rescoring_s": record.get("rescore_seconds"),
        "rescoring_ratio": (record["rescore_seconds"] / (fit + score) if "rescore_seconds" in record and fit is not None
                            and score is not None else None),
        "store_MB": record["store_bytes"] / 2**20 if "store_bytes" in record else None,
        "row_total_s": row.seconds, "peak_MB": row.peak / 2**20,
        "pearson_A": correlation(reference), "pearson_cg": correlation(cg),
        "flipped_found": flipped_found(record.get("self_influence") if torch.is_tensor(record.get("self_influence"))
                                       else None, flipped),
        "error": row.error,
    }


COLUMNS = [("row", "#"), ("method", "method"), ("fit_s", "fit (s)"), ("scores_s", "scores (s)"),
           ("fit_plus_scores_s", "fit + scores (s)"), ("self_influence_s", "self-influence (s)"),
           ("rescoring_s", "rescoring M new (s)"), ("rescoring_ratio", "rescoring / (fit + scores)"),
           ("store_MB", "store (MB)"), ("row_total_s", "row total (s)"),
           ("peak_MB", "peak memory (MB)"), ("pearson_A", "Pearson vs A"), ("pearson_cg", "Pearson vs CG"),
           ("flipped_found", "flipped in top 5% by self-influence"), ("error", "note")]


def cell(value: Any) -> str:
    if value is None or value == "":
        return "–"
    if isinstance(value, float):
        return f"{value:.3f}" if abs(value) < 10 else f"{value:.1f}"
    return str(value).replace("|", "/")


def markdown_table(facts: list[dict[str, Any]]) -> list[str]:
    lines = ["| " + " | ".join(title for _, title in COLUMNS) + " |",
             "| " + " | ".join("---" if key in ("method", "error") else "---:" for key, _ in COLUMNS) + " |"]
    return lines + ["| " + " | ".join(cell(fact[key]) for key, _ in COLUMNS) + " |" for fact in facts]


def header(text: TextProblem, args: argparse.Namespace) -> list[str]:
    problem, n = text.problem, len(text.problem.x_train)
    module = problem.module
    chosen = set(influence_params(module))
    influence_p = sum(p.numel() for name, p in module.named_parameters() if name in chosen)
    k = round(FLIP_FRACTION * n)
    return [
        f"# Problem (c): transformer text classifier, {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M}"
        " UTC",
        "",
        f"{platform.processor() or 'cpu'}, {os.cpu_count()} CPU cores, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.1f}.",
        f"N = {n:,}, M = {len(problem.x_test)} queries (+ {len(text.x_new)} new), sequence length {args.seq_len}, "
        f"vocabulary {args.vocab}, {args.classes} classes; d_model {args.d_model}, {args.layers} layers; "
        f"p = {sum(p.numel() for p in module.parameters()):,} ({influence_p:,} without the LayerNorms, our rows' "
        f"influence parameters); trained {args.epochs} epochs in {text.train_seconds:.1f} s to held-out accuracy "
        f"{text.accuracy:.3f}; λ = {problem.regularization:.4g} ({args.damping}); batch size {problem.batch_size}.",
        f"{len(text.flipped)} flipped labels; the top 5% ({k:,}) by training loss hold "
        f"{flipped_found(text.losses, text.flipped)} of them (at random ≈ {len(text.flipped) * FLIP_FRACTION:.0f}).",
        "",
    ]


def parse_arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    size = parser.add_argument_group("size (the issue's problem (c) by default)")
    size.add_argument("--train", type=int, default=50_000, help="training examples N")
    size.add_argument("--queries", type=int, default=100, help="queries M (and as many new queries)")
    size.add_argument("--d-model", type=int, default=256)
    size.add_argument("--layers", type=int, default=4)
    size.add_argument("--seq-len", type=int, default=32)
    size.add_argument("--vocab", type=int, default=1000)
    size.add_argument("--classes", type=int, default=4)
    size.add_argument("--keywords", type=int, default=5, help="keyword tokens per class")
    training = parser.add_argument_group("training")
    training.add_argument("--epochs", type=int, default=3)
    training.add_argument("--batch-size", type=int, default=256, help="for training and every influence pass")
    training.add_argument("--lr", type=float, default=1e-3)
    training.add_argument("--weight-decay", type=float, default=1e-4)
    training.add_argument("--seed", type=int, default=0)
    methods = parser.add_argument_group("methods")
    methods.add_argument("--rows", type=int, nargs="+", default=list(range(1, 11)), help="rows to run (1–10)")
    methods.add_argument("--curvature-samples", type=int, default=5000,
                         help="row 10: the curvature fitted on this many training examples, scored on all N")
    methods.add_argument("--cg", action="store_true", help="run row 2, our CG reference (costly)")
    methods.add_argument("--cg-rtol", type=float, default=1e-3)
    methods.add_argument("--cg-maxiter", type=int, default=100)
    methods.add_argument("--damping", default="auto", help='λ for every row: a number, or "auto"')
    methods.add_argument("--refine", type=int, default=0, help="our EK-FAC's refine (0: plain EK-FAC, as peers)")
    methods.add_argument("--samples", type=int, default=None,
                         help="our EK-FAC's pseudo-gradients per example (None: exact, one reverse pass per class; "
                              "1: one sampled, as kronfluence's true Fisher takes)")
    methods.add_argument("--projection-dim", type=int, default=4096, help="our projection_dim k (per layer)")
    methods.add_argument("--query-rank", type=int, default=32, help="our query_rank and kronfluence's")
    methods.add_argument("--logra-dim", type=int, default=4096, help="dattri LoGra's proj_dim (a square)")
    methods.add_argument("--self-influence", type=int, nargs="*", default=[1, 3, 9],
                         help="rows that also compute self-influence (of 1, 3, 7, 9)")
    methods.add_argument("--max-memory", default="512MB", help="our per-example gradients held at once")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default=None, help="also write the results: .json for JSON, else markdown")
    return parser.parse_args()


def main() -> None:
    args = parse_arguments()
    if args.threads:
        torch.set_num_threads(args.threads)
    text = text_problem(args)
    rows, reference, cg = [], None, None
    for number, _, run in rows_to_run(text, args):
        row = run()
        rows.append(row)
        reference = row.scores if number == 1 else reference
        cg = row.scores if number == 2 else cg
    facts = [row_facts(row, reference, cg, text.flipped) for row in rows]
    lines = header(text, args) + markdown_table(facts)
    print("\n".join(lines), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            if args.out.endswith(".json"):
                json.dump({"header": header(text, args), "rows": facts}, f, indent=2)
            else:
                f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
