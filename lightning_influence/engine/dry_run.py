"""A dry run: one batch of each kind of work an influence run does, so that what would fail late fails early.

The Lightning callback runs it when fitting starts, before the first training step; `compute_influence` users
can call it before a long run. It makes no curvature fit and no solve, so it costs a few batches' gradients.
"""

from __future__ import annotations

from collections.abc import Sequence

from lightning_influence.engine.arguments import InfluenceArguments
from lightning_influence.engine.low_rank import low_rank_factors, low_rank_scores, rank_structure
from lightning_influence.engine.scoring import perturbation_scores, stacked_gradients
from lightning_influence.enums import InfluenceType
from lightning_influence.model.data import IndexedData, iterate_batches
from lightning_influence.model.twice_differentiable import TwiceDifferentiable


def dry_run(
    model: TwiceDifferentiable,
    training_data: IndexedData,
    query_data: IndexedData,
    arguments: InfluenceArguments,
    *,
    train_indices: Sequence[int] | None = None,
    query_indices: Sequence[int] | None = None,
) -> None:
    """Raise now what `compute_influence` with these inputs would raise after its expensive stages.

    Checks the indices against the data, then runs, on the first batch of each: the loss on the training batch
    (a scalar batch mean, not a sum, twice differentiable: `TwiceDifferentiable.check_second_order`), its
    per-example gradients, the query batch's loss and per-example gradients (wrong input sizes, labels the loss
    cannot take), the input derivative of one training example with ``influence_type="perturbation"``, the
    low-rank scores of the training batch with ``query_rank`` (every selected parameter in a covered layer, the
    logits known), and the IDs of one example of each (`IndexedData.ids`, for the report).
    """
    train_indices = training_data.check_indices(train_indices, "train_indices")
    query_indices = query_data.check_indices(query_indices, "query_indices")
    size = arguments.batch_size
    first_batch = training_data.loader(train_indices[:size], size)
    with model.evaluating():
        for _, inputs, targets in iterate_batches(first_batch, model.device, model.dtype, name="training_data"):
            model.check_second_order(inputs, targets)
        stacked_gradients(model, first_batch, name="training_data")
        queries = stacked_gradients(model, query_data.loader(query_indices[:size], size), name="query_data")
        if arguments.influence_type is InfluenceType.perturbation:
            perturbation_scores(model, training_data.loader(train_indices[:1], 1), queries[:1])
        if arguments.query_rank is not None:
            structure = rank_structure(model)
            cut = low_rank_factors(structure, queries[:1], arguments.query_rank)
            low_rank_scores(model, structure, first_batch, cut)
    training_data.ids(train_indices[:1])
    query_data.ids(query_indices[:1])
