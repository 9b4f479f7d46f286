"""`InfluenceCallback`: influence functions when fitting ends, reported to the loggers and saved for reuse.

A thin adapter: it finds the loss, the data (with dataset indices), the processes and the folder, then hands
them with its `InfluenceArguments` to `storage.runs.compute_influence`, and the result to
`reports.write_reports`. No mathematics here.
"""

from __future__ import annotations

import datetime
import inspect
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_warn
from torch import nn
from torch.utils.data import DataLoader, Dataset
from typing_extensions import override

from lightning_influence.checks import (
    CurvatureChoice,
    StoreDtype,
    flag,
    import_object,
    one_of,
    optional_flag,
    parameter_patterns,
    positive_int,
)
from lightning_influence.engine.arguments import InfluenceArguments, OnUnconverged
from lightning_influence.engine.distribution import Distribution
from lightning_influence.engine.dry_run import dry_run
from lightning_influence.enums import InversionMethod
from lightning_influence.errors import ResultMismatchError
from lightning_influence.lightning.save_dir import default_save_dir, fresh_sibling
from lightning_influence.lightning.strategy import distribution_for, refuse_unsupported_strategy
from lightning_influence.lightning.validation import (
    check_validate_option,
    refuse_multiprocess_validation,
    validate_after_fit,
)
from lightning_influence.lightning.trainer_data import trainer_loader
from lightning_influence.model.data import BatchTransform, IndexedData, IndexFn
from lightning_influence.model.outputs import OutputTransform
from lightning_influence.model.projection import check_projection_options
from lightning_influence.model.twice_differentiable import LossFn, TwiceDifferentiable
from lightning_influence.reports import write_reports
from lightning_influence.storage.result import InfluenceResult
from lightning_influence.storage.runs import compute_influence

OnError = Literal["raise", "warn"]


def _resolve_callable(value: str | Callable[..., Any] | None, what: str) -> Callable[..., Any] | None:
    """A callable, or one named by a string (a `torch.nn.functional` name or a dotted import path; a class
    such as ``torch.nn.CrossEntropyLoss`` is instantiated without arguments)."""
    if value is None or callable(value):
        return value
    if not isinstance(value, str):
        raise TypeError(f"{what} must be callable or the name of one, got {value!r}.")
    if value.startswith("Unable to serialize instance"):  # what LightningCLI saves for a lambda or local function
        raise ValueError(
            f"{what}={value!r}: the config was saved from a function that cannot be imported by name (a lambda, a "
            "local function or a partial). Define it at module level and pass its dotted path, e.g. "
            "my_package.losses.my_loss, or a torch.nn.functional name such as cross_entropy."
        )
    if "." not in value:
        found = getattr(torch.nn.functional, value, None)
        if callable(found):
            return found
        raise ValueError(f"{what}={value!r} is not a function of torch.nn.functional; use a dotted path 'pkg.mod.fn'.")
    found = import_object(value, what)
    if inspect.isclass(found):
        found = found()
    if not callable(found):
        raise TypeError(f"{what}={value!r} names {type(found).__name__}, which is not callable.")
    return found


def _check_indices(value: Sequence[int] | None, what: str) -> list[int] | None:
    if value is None:
        return None
    values = list(value)
    if not values or any(isinstance(v, bool) or not isinstance(v, int) or v < 0 for v in values):
        raise ValueError(f"{what} must be a non-empty list of dataset indices (integers ≥ 0), got {value!r}.")
    return values


class InfluenceCallback(pl.Callback):
    """Compute influence functions (Koh & Liang, 2017) of the training data on query examples when fit ends.

    Args:
        loss_fn: ``loss_fn(outputs, targets)`` returning the batch mean loss, or the name of a
            ``torch.nn.functional`` function or a dotted path. Default: the module's ``loss_fn`` or
            ``criterion`` attribute. ``outputs`` is exactly what the module returns (tensor, tuple, dict, dataclass).
        output_transform: picks the logits from a module output that is not one tensor, for ``curvature="ggn"``,
            EK-FAC and the fast per-layer gradients: a key or attribute name (``"logits"``), an index (``"0"``), a
            dotted path to a function, or a callable (see `TwiceDifferentiable`).
        query_data: a map-style Dataset or a DataLoader over one. Default: the trainer's validation data.
        num_queries: use the first ``num_queries`` query examples (None: all). Ignored with ``query_indices``.
        query_indices: dataset indices of the query examples.
        training_data: a Dataset or DataLoader. Default: the dataset behind the trainer's train dataloader,
            read in dataset order (never the shuffled order).
        batch_transform: maps a collated batch to ``(inputs, targets)`` when it is not a tuple, list or dict
            with known keys (a callable or a dotted path).
        method: the inversion method (``direct``, ``cg``, ``lissa``, ``arnoldi``, ...), or ``auto`` (default):
            ``direct`` where its p × p matrices fit the memory budget, else ``ekfac`` where every selected layer
            is an nn.Linear or nn.Conv2d, else ``cg`` with a Nyström preconditioner (`engine.defaults`).
        method_kwargs: the method's options, e.g. ``{"rank": 50}`` for arnoldi or ``{"rtol": 1e-4}`` for cg
            (with an explicit method).
        hessian_regularization: λ ≥ 0 in (H + λI), at least the weight decay the loss leaves out; or ``"auto"``
            (default: a tenth of the curvature's mean eigenvalue).
        curvature: ``hessian`` (the mean-loss Hessian H), ``ggn`` (its Gauss–Newton part, positive
            semi-definite; cheaper to make well-conditioned), or ``auto`` (default: the Hessian where H + λI is
            found positive definite by a Lanczos estimate, else the GGN). The choices made for "auto", and why,
            are saved in the result's metadata under ``choices``.
        block_diagonal: keep only the per-layer blocks of the curvature (cross-layer terms dropped).
        influence_type: ``up`` ([M, N] scores) or ``perturbation`` (also ∇ₓ of them, [M, N, *x_shape]).
        params: names or glob patterns of the parameters to use (e.g. ``"head.*"``); None for all trainable.
        self_influence: also compute self-influence of every training example (finds mislabelled data).
        top_k: helpful/harmful examples reported per query.
        batch_size: examples per batch in every pass over the data.
        max_memory: bytes, or a string such as ``"2GB"``, for the per-example gradients and score chunks held
            at once (see `TwiceDifferentiable`); None: bounded by ``batch_size`` alone.
        save_dir: where the tensors and report files go. Default: ``<log_dir>/influence`` under a TensorBoard or
            CSV logger, else ``<default_root_dir>/influence/version_N``. A folder that holds another run's result
            is left alone: this run goes to a fresh sibling folder, with a warning.
        progress: show progress bars. Default: follow the trainer's progress bar.
        on_error: ``raise`` to propagate a failure of the influence computation, ``warn`` to warn and let the
            run finish; either way training's checkpoints and logs are left intact.
        compute_on_fit_end: run in ``on_fit_end``; set False to call ``compute(trainer, module)`` yourself.
        timeout: seconds every collective of the influence computation may wait under DDP (default: 30 minutes).
        validate: after the result is saved, judge it by retraining (`lightning_influence.validate`): True for the
            defaults, or a dict of its options (e.g. ``{"module": MyModule, "num_subsets": 50}``); the report goes
            to the loggers and to ``result.metadata["validation"]``. One-process trainers only.
        describe: ``describe(input) -> str`` for one example's input (e.g. a tokenizer's decode), or its dotted
            path; the report and TensorBoard's INFLUENCE tab show the text. Default: thumbnails for images, the
            first feature values otherwise.
        on_unconverged: a stage that did not converge or gave values beyond what its inputs allow: ``raise`` a
            `ConvergenceError` (nothing saved as a result), ``warn`` and save the result marked untrustworthy
            (``result.trustworthy``, ``result.warnings``, and a mark above every table of the report), or
            ``ignore`` (still marked).
        index_fn: maps a position in the training dataset to your own ID of the example (a file name, a row id),
            shown beside the index in the report's tables (a callable or a dotted path). Without it, a dataset's
            ``influence_id(position)`` method gives the IDs, found through ``Subset`` and ``ConcatDataset``.
        on_negative_curvature: ``warn`` (default) or ``raise`` where H + λI is found not positive definite.
        curvature_samples: fit the curvature on this many training examples drawn at random (the standard way
            to scale to a large N); all N are scored. None: every training example.
        curvature_seed: the seed of that draw (saved in the metadata).
        query_rank: score with each layer's block of every influence factor cut to its best rank-r approximation,
            without forming per-example gradients (faster where r is well below the layers' sizes; kronfluence's
            query_gradient_rank). Needs every selected parameter in an nn.Linear, nn.Conv2d, nn.Embedding or
            attention projection (else choose them with ``params=``). None (default): the full factors.
        store_gradients: after the scores, write the per-example training gradients to a gradient store in
            ``<save_dir>/gradients`` (one more streamed pass; one shard per process under DDP) and keep the fitted
            solver with the result, so that ``InfluenceResult.load(save_dir).score_queries(model, new_queries)``
            scores new queries without a pass over the training data.
        store_dtype: the element type of the stored gradients: ``float32`` (default), ``float16`` or ``bfloat16``
            (half the size; about 3 and 2 significant digits), or ``float64``.
        projection_dim: compress every layer's gradient to about this many numbers with seeded Kronecker-structured
            random projections; curvature, every method and the scores then work in the projected space (see
            `TwiceDifferentiable`). None (default): no projection. Saved in the metadata with every layer's sizes.
        projection_seed: the seed of those projections.
        projection: their entries, ``"gaussian"`` (default) or ``"sparse"``.

    Every index (in the result, the tables and the CSVs) is a position in the dataset the callback reads: with a
    ``Subset`` a position in the subset, with a ``ConcatDataset`` one in the concatenation; a ``batch_transform``
    does not change it. The options that decide the numbers are checked at construction and kept in
    ``self.arguments`` (`InfluenceArguments`), which is saved with the result. When fitting starts, before the
    first training step, a dry run (`dry_run`) tries the loss, one batch of per-example gradients and one of
    query gradients, and checks ``top_k``, ``num_queries`` and ``query_indices`` against the data, so a
    configuration that would fail after training fails before it (with ``on_error="warn"``: a warning, and no
    computation when fitting ends).
    """

    # `str` comes first in the unions below: LightningCLI (jsonargparse) tries union members in order, and a name
    # such as "cross_entropy" must stay a string in the saved config.yaml so that the file re-runs as it is.
    def __init__(
        self,
        *,
        loss_fn: str | Callable[..., Any] | None = None,
        output_transform: str | Callable[..., Any] | None = None,
        query_data: Dataset | DataLoader | None = None,
        num_queries: int | None = 8,
        query_indices: Sequence[int] | None = None,
        training_data: Dataset | DataLoader | None = None,
        batch_transform: str | BatchTransform | None = None,
        method: str | InversionMethod = "auto",
        method_kwargs: dict[str, Any] | None = None,
        hessian_regularization: float | Literal["auto"] = "auto",
        curvature: CurvatureChoice = "auto",
        block_diagonal: bool = False,
        influence_type: Literal["up", "perturbation"] = "up",
        params: str | Sequence[str] | None = None,
        self_influence: bool = False,
        top_k: int = 5,
        batch_size: int = 64,
        max_memory: int | str | None = None,
        save_dir: str | os.PathLike[str] | None = None,
        progress: bool | None = None,
        on_error: OnError = "raise",
        compute_on_fit_end: bool = True,
        timeout: float | None = None,
        validate: bool | dict[str, Any] | None = None,
        describe: str | Callable[[Any], str] | None = None,
        on_unconverged: OnUnconverged = "warn",
        index_fn: str | IndexFn | None = None,
        on_negative_curvature: Literal["warn", "raise"] = "warn",
        curvature_samples: int | None = None,
        curvature_seed: int = 0,
        query_rank: int | None = None,
        store_gradients: bool = False,
        store_dtype: StoreDtype = "float32",
        projection_dim: int | None = None,
        projection_seed: int = 0,
        projection: Literal["gaussian", "sparse"] = "gaussian",
    ) -> None:
        super().__init__()
        self.arguments = InfluenceArguments(
            method=method, method_kwargs=method_kwargs if method_kwargs is not None else {},
            hessian_regularization=hessian_regularization, curvature=curvature, block_diagonal=block_diagonal,
            influence_type=influence_type, self_influence=self_influence, batch_size=batch_size,
            max_memory=max_memory, on_unconverged=on_unconverged, on_negative_curvature=on_negative_curvature,
            curvature_samples=curvature_samples, curvature_seed=curvature_seed, query_rank=query_rank,
            store_gradients=store_gradients, store_dtype=store_dtype,
        )
        check_projection_options(projection_dim, projection_seed, projection)
        self.projection_options = {"projection_dim": projection_dim, "projection_seed": projection_seed,
                                   "projection": projection}
        self.index_fn = _resolve_callable(index_fn, "index_fn")
        self.loss_fn = _resolve_callable(loss_fn, "loss_fn")
        self.output_transform = OutputTransform(output_transform)
        self.batch_transform = _resolve_callable(batch_transform, "batch_transform")
        self.describe = _resolve_callable(describe, "describe")
        self.params = parameter_patterns(params)
        self.num_queries = positive_int("num_queries", num_queries, allow_none=True)
        self.query_indices = _check_indices(query_indices, "query_indices")
        self.top_k = positive_int("top_k", top_k)
        self.compute_on_fit_end = flag("compute_on_fit_end", compute_on_fit_end)
        self.progress = optional_flag("progress", progress, "follow the trainer")
        self.on_error = one_of("on_error", on_error, ("raise", "warn"))
        self.save_dir = _check_save_dir(save_dir)
        if timeout is not None and not (isinstance(timeout, (int, float)) and timeout > 0):
            raise ValueError(f"timeout must be a positive number of seconds or None, got {timeout!r}.")
        self.timeout = None if timeout is None else datetime.timedelta(seconds=timeout)
        self.query_data = None if query_data is None else self._indexed(query_data, "query_data")
        self.training_data = None if training_data is None else self._indexed(training_data, "training_data",
                                                                                 self.index_fn)
        self.result: InfluenceResult | None = None
        self.validation = check_validate_option(validate)
        self._dry_run_failed = False

    def _indexed(self, data: Any, name: str, index_fn: IndexFn | None = None) -> IndexedData:
        return IndexedData(data, batch_transform=self.batch_transform, name=name, index_fn=index_fn)

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(method=str(self.arguments.method), save_dir=self.save_dir)

    # -- hooks --------------------------------------------------------------------------------------------
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        refuse_unsupported_strategy(trainer.strategy)  # before training, not after it
        if self.validation is not None:
            refuse_multiprocess_validation(trainer)

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """The dry run, before the first training step: what would fail when fitting ends fails now."""
        self._dry_run_failed = False
        try:
            with torch.random.fork_rng(devices=[]), torch.inference_mode(False), torch.enable_grad():
                model, training, query, query_indices = self._inputs(trainer, pl_module, announce=True)
                dry_run(model, training, query, self.arguments, query_indices=query_indices)
        except Exception as error:
            if self.on_error == "raise":
                raise
            self._dry_run_failed = True
            rank_zero_warn(
                f"The influence computation failed its dry run before training ({type(error).__name__}: {error}), "
                "so it will not run when fitting ends. Training, its checkpoints and logs are unaffected; "
                "on_error='warn' lets the run go on.",
                category=RuntimeWarning,
            )

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.compute_on_fit_end and not self._dry_run_failed:
            self.compute(trainer, pl_module)

    def compute(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> InfluenceResult | None:
        """Compute, save and report influence for `pl_module` as trained by `trainer`; the result (also kept in
        `self.result`), or None when it failed and `on_error='warn'`."""
        try:
            with torch.random.fork_rng(devices=[]):  # leave the user's random stream as it was
                self.result = self._compute(trainer, pl_module)
        except Exception as error:
            if self.on_error == "raise":
                raise
            rank_zero_warn(
                f"The influence computation failed ({type(error).__name__}: {error}). Training, its checkpoints and "
                "logs are unaffected; on_error='warn' let the run finish.",
                category=RuntimeWarning,
            )
            return None
        return self.result

    # -- steps --------------------------------------------------------------------------------------------
    def _inputs(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *, announce: bool = False
                ) -> tuple[TwiceDifferentiable, IndexedData, IndexedData, list[int] | None]:
        """The model, the training and query data, and the query indices of a run; `top_k` is checked against N.
        With `announce`, a `num_queries` beyond the query data is warned about (it is clamped to all of them)."""
        model = TwiceDifferentiable(pl_module, self._loss(pl_module), params=self.params,
                                    max_memory=self.arguments.max_memory, output_transform=self.output_transform,
                                    **self.projection_options)
        training = self.training_data
        if training is None:
            training = self._indexed(trainer_loader(trainer, "train"), "training_data (the trainer's training data)",
                                     self.index_fn)
        query = self.query_data
        if query is None:
            query = self._indexed(trainer_loader(trainer, "val"), "query_data (the trainer's validation data)")
        if self.top_k > len(training):
            raise ValueError(f"top_k={self.top_k} is larger than the number of training examples N={len(training)} "
                             f"of {training.name}; pass top_k ≤ {len(training)}.")
        if self.query_indices is not None or self.num_queries is None:
            return model, training, query, self.query_indices
        if announce and self.num_queries > len(query):
            rank_zero_warn(f"num_queries={self.num_queries} is more than the {len(query)} examples of {query.name}; "
                           f"the influence computation uses all {len(query)} of them.", category=UserWarning)
        return model, training, query, list(range(min(self.num_queries, len(query))))

    def _compute(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> InfluenceResult:
        model, training, query, query_indices = self._inputs(trainer, pl_module)
        folder = Path(self.save_dir) if self.save_dir is not None else default_save_dir(trainer)
        progress = self.progress if self.progress is not None else trainer.progress_bar_callback is not None
        with distribution_for(trainer, timeout=self.timeout) as distribution:
            run = lambda where: compute_influence(  # noqa: E731
                model, training, query, self.arguments, save_dir=where, query_indices=query_indices,
                progress=progress, distribution=distribution)
            with torch.inference_mode(False), torch.enable_grad():
                try:
                    result = run(folder)
                except ResultMismatchError as mismatch:
                    folder = fresh_sibling(trainer, folder)
                    rank_zero_warn(f"{mismatch} This run's influence result goes to {str(folder)!r} instead.",
                                   category=RuntimeWarning)
                    result = run(folder)
            self._report(result, trainer, distribution, training, query, folder, model)
        if self.validation is not None:
            validate_after_fit(self.validation, trainer, pl_module, result, training, query, self.loss_fn, folder)
        return result

    def _report(self, result: InfluenceResult, trainer: pl.Trainer, distribution: Distribution,
                training: IndexedData, query: IndexedData, folder: Path, model: TwiceDifferentiable) -> None:
        """Write the report once, by global rank zero, to the loggers and to `folder/report`."""
        with distribution.stage("reports"):
            if distribution.is_global_zero:
                write_reports(result, train_data=training, query_data=query, top_k=self.top_k,
                              folder=folder / "report", loggers=trainer.loggers, step=trainer.global_step,
                              model=model, describe=self.describe, batch_size=self.arguments.batch_size)

    def _loss(self, pl_module: nn.Module) -> LossFn:
        forward = getattr(type(pl_module), "forward", None)
        if forward in (nn.Module.forward, pl.LightningModule.forward):
            raise TypeError(
                f"{type(pl_module).__name__} does not define forward(inputs); influence calls the module as "
                "module(inputs) and passes the outputs to loss_fn(outputs, targets). Define forward."
            )
        if self.loss_fn is not None:
            return self.loss_fn
        for name in ("loss_fn", "criterion"):
            found = getattr(pl_module, name, None)
            if callable(found):
                return found
        raise AttributeError(
            f"{type(pl_module).__name__} has no callable `loss_fn` or `criterion` attribute; pass "
            "InfluenceCallback(loss_fn=...) returning the batch mean loss, e.g. loss_fn='cross_entropy'."
        )


def _check_save_dir(save_dir: Any) -> str | os.PathLike[str] | None:
    """A folder path (existing or not) or None; a path to an existing file is refused."""
    if save_dir is None:
        return None
    if not isinstance(save_dir, (str, os.PathLike)):
        raise TypeError(f"save_dir must be a path, got {save_dir!r}.")
    if Path(save_dir).exists() and not Path(save_dir).is_dir():
        raise NotADirectoryError(f"save_dir {str(save_dir)!r} is a file, not a folder; pass a folder path.")
    return save_dir
