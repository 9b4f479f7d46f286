"""A two-process `strategy="ddp"` run with the influence callbacks (Lightning re-launches this script for rank 1).

Usage: python ddp_script.py ROOT — writes the callbacks' results under ROOT and rank zero's weights to
ROOT/weights.pt, for `test_distributed_trainer.py` to compare with one process.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from lit_helpers import Classifier, make_trainer
from test_distributed_trainer import BATCH, callbacks, problem
from torch.utils.data import DataLoader


def main(root: Path) -> None:
    torch.set_num_threads(1)
    train, val = problem()
    module = Classifier(hidden=4).double()
    trainer = make_trainer(root, callbacks=callbacks(root), epochs=2, devices=2, strategy="ddp", logger=False)
    trainer.fit(module, DataLoader(train, batch_size=BATCH, shuffle=True), DataLoader(val, batch_size=BATCH))
    if trainer.is_global_zero:
        torch.save(module.state_dict(), root / "weights.pt")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
