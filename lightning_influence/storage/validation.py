"""The statistics of validating attributions against retraining: subsets, seeds, ranks, Spearman, LDS.

Pure numpy, no Lightning: `lightning/validation.py` retrains models and hands the outcomes here.

The linear datamodeling score (LDS; Park et al., 2023, TRAK) of attribution scores τ [M, N]: draw K subsets
S_k of the training examples (each of size round(α N)), retrain on each, and for every query z take the
Spearman correlation over k between Σ_{i∈S_k} τ(z, i) and the retrained model's output f(z; θ_k); the LDS is
its mean over queries. Outputs are handed in "higher is better for the query" (−loss, or the margin), so with
positive I_up = helpful a good attribution has a positive LDS.
"""

from __future__ import annotations

import numpy as np

#: Tags that keep the seed streams of subset draws, subset retrainings and leave-one-out retrainings apart.
SUBSET_STREAM, TRAINING_STREAM, LEAVE_ONE_OUT_STREAM = 0, 1, 2


def derived_seed(seed: int, *path: int) -> int:
    """A 32-bit seed for one retraining, a function of the user's seed and the retraining's place only (so a
    resumed or parallel run draws exactly what a serial one does)."""
    return int(np.random.SeedSequence([seed, *path]).generate_state(1)[0])


def subset_size(num_train: int, fraction: float) -> int:
    """round(α N), which must leave at least one example in and one out."""
    size = round(fraction * num_train)
    if not 1 <= size < num_train:
        raise ValueError(
            f"fraction={fraction} of N={num_train} training examples gives subsets of {size}; each subset must keep "
            "at least one example and leave at least one out. Use more training examples or another fraction."
        )
    return size


def subset_positions(num_train: int, fraction: float, seed: int, subset: int) -> np.ndarray:
    """Sorted positions (columns of the scores) of subset number `subset`: uniform without replacement."""
    generator = np.random.default_rng(np.random.SeedSequence([seed, SUBSET_STREAM, subset]))
    return np.sort(generator.choice(num_train, size=subset_size(num_train, fraction), replace=False))


def ranks(values: np.ndarray) -> np.ndarray:
    """Ranks 1..n along the first axis, tied values sharing the mean of their ranks (as Spearman needs)."""
    values = np.asarray(values, dtype=np.float64)
    columns = values.reshape(len(values), -1)
    ranked = np.empty_like(columns)
    for column in range(columns.shape[1]):
        order = np.argsort(columns[:, column], kind="stable")
        ordered = columns[order, column]
        starts = np.flatnonzero(np.r_[True, ordered[1:] != ordered[:-1]])
        ends = np.r_[starts[1:], len(ordered)]
        # A run of ties at sorted positions start..end-1 takes the mean of the 1-based ranks start+1..end.
        ranked[order, column] = np.repeat((starts + ends + 1) / 2, ends - starts)
    return ranked.reshape(values.shape)


def pearson(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pearson correlation of the columns of `a` and `b` (along the first axis); NaN where one is constant."""
    a = np.asarray(a, dtype=np.float64) - np.mean(a, axis=0)
    b = np.asarray(b, dtype=np.float64) - np.mean(b, axis=0)
    norms = np.sqrt((a * a).sum(axis=0) * (b * b).sum(axis=0))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(norms > 0, (a * b).sum(axis=0) / np.where(norms > 0, norms, 1.0), np.nan)


def spearman(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Spearman rank correlation of the columns of `a` and `b`: Pearson of their average-tie ranks."""
    return pearson(ranks(a), ranks(b))


def subset_sums(scores: np.ndarray, subsets: list[np.ndarray]) -> np.ndarray:
    """Σ_{i∈S_k} τ(z, i) for every subset k and query z: [K, M] from scores [M, N]."""
    masks = np.zeros((len(subsets), scores.shape[1]))
    for k, positions in enumerate(subsets):
        masks[k, positions] = 1.0
    return masks @ np.asarray(scores, dtype=np.float64).T


def lds_per_query(scores: np.ndarray, subsets: list[np.ndarray], targets: list[np.ndarray]) -> np.ndarray:
    """Per-query LDS [M] of scores [M, N] against the retrained outputs: one [K, M] array (higher = better for
    the query) per training seed; with several seeds, the mean of their LDS (each seed a target in its own
    right, as the two-seed ceiling compares one seed with another)."""
    sums = subset_sums(scores, subsets)
    return np.mean([spearman(sums, target) for target in targets], axis=0)


def ceiling_per_query(first: np.ndarray, second: np.ndarray) -> np.ndarray:
    """Per-query Spearman [M] between the outputs [K, M] of the same subsets retrained with two seeds: the LDS
    that one training run's own outcomes reach in predicting another's (the noise ceiling of TRAK, §5)."""
    return spearman(first, second)


def mean_defined(values: np.ndarray) -> float | None:
    """Mean over the defined (finite) entries, None when there are none (every query's outcome constant)."""
    finite = np.asarray(values, dtype=np.float64)
    finite = finite[np.isfinite(finite)]
    return float(finite.mean()) if finite.size else None


def sign_agreement(predicted: np.ndarray, actual: np.ndarray) -> float:
    """Fraction of pairs where predicted and actual changes have the same sign."""
    return float(np.mean(np.sign(predicted) == np.sign(actual)))
