"""The examples a newcomer runs first: the mislabelled-digits run saves the weights its result belongs to, so
the README's reuse snippet works on its output; the functional example converges in a few cg iterations."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader, Subset

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))


def test_the_readme_reuse_snippet_works_on_the_examples_output(tmp_path, monkeypatch, capsys):
    import mislabeled_digits
    from mislabeled_digits import DigitNet, noisy_digits

    from lightning_influence import InfluenceResult, TwiceDifferentiable

    monkeypatch.setattr(sys, "argv", ["mislabeled_digits.py", "--epochs", "2", "--root", str(tmp_path)])
    mislabeled_digits.main()
    printed = capsys.readouterr().out
    assert "reuse: scored 16 training examples from the saved factors, relative difference 0.0e+00" in printed
    assert "then open the INFLUENCE tab" in printed and "training labels as suspect" in printed

    # the README's snippet, as written there
    module = DigitNet.load_from_checkpoint(tmp_path / "version_0" / "checkpoints" / "final.ckpt", weights_only=True)
    later = InfluenceResult.load(tmp_path / "version_0" / "influence")
    model = TwiceDifferentiable(module, module.loss_fn, params=later.metadata["parameter_names"])
    new_loader = DataLoader(Subset(noisy_digits(0)[0], range(10)), batch_size=10)
    new_scores = later.score(model, new_loader)
    torch.testing.assert_close(new_scores, later.scores[:, :10], rtol=1e-4, atol=1e-4)  # float32, other batches
    with pytest.raises(ValueError, match="parameter selection"):
        later.score(TwiceDifferentiable(module, module.loss_fn), new_loader)  # params= is needed


def test_the_functional_example_converges_quickly_and_shows_progress(capsys):
    import functional_api

    functional_api.main()
    printed = capsys.readouterr().out
    iterations = int(printed.split("parameters, ")[1].split(" iterations")[0])
    assert iterations <= 30
    assert printed.count("query ") == 5 and printed.count(" s)") >= 3  # every step says how long it took
