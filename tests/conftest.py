import os
import sys
import warnings

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
# The test models are tiny: one intra-op thread is as fast, and it avoids the collapse (measured: a 100x
# slower forward/backward) when OpenMP threads of several processes (DDP workers) compete for 2 cores.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    with warnings.catch_warnings():
        yield
