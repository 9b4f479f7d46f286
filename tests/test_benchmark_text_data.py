"""Problem (c)'s synthetic text data: every clean label follows the planted keyword rule, with a strict maximum,
and the flipped labels are exactly the recorded 5%, each moved to another class."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from transformer_text import TextClassifier, flip_labels, keyword_sequences, planted_class  # noqa: E402

CLASSES, KEYWORDS = 4, 5


def test_every_clean_label_is_the_class_with_strictly_the_most_keywords():
    tokens, labels = keyword_sequences(3000, 16, 200, CLASSES, KEYWORDS, torch.Generator().manual_seed(0))
    assert tokens.shape == (3000, 16) and tokens.min() >= 0 and tokens.max() < 200
    assert torch.equal(planted_class(tokens, CLASSES, KEYWORDS), labels)
    counts = torch.stack([((tokens >= c * KEYWORDS) & (tokens < (c + 1) * KEYWORDS)).sum(1) for c in range(CLASSES)], 1)
    top2 = counts.topk(2, dim=1).values
    assert (top2[:, 0] > top2[:, 1]).all() and (top2[:, 0] >= 2).all()
    assert torch.bincount(labels, minlength=CLASSES).min() > 600  # every class is drawn


def test_the_flipped_labels_are_the_recorded_five_percent_each_moved_to_another_class():
    labels = torch.randint(CLASSES, (2000,), generator=torch.Generator().manual_seed(1))
    noisy, flipped = flip_labels(labels, 0.05, CLASSES, torch.Generator().manual_seed(2))
    assert len(flipped) == 100 and len(set(flipped.tolist())) == 100
    changed = (noisy != labels).nonzero().flatten()
    assert torch.equal(changed, flipped)
    again, flipped_again = flip_labels(labels, 0.05, CLASSES, torch.Generator().manual_seed(2))
    assert torch.equal(again, noisy) and torch.equal(flipped_again, flipped)


def test_the_classifier_takes_a_batch_or_one_unbatched_sequence():
    torch.manual_seed(0)
    module = TextClassifier(50, 16, 1, CLASSES).eval()
    tokens = torch.randint(50, (3, 8))
    batched = module(tokens)
    assert batched.shape == (3, CLASSES)
    torch.testing.assert_close(module(tokens[1]), batched[1])
