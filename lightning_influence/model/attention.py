"""Attention in influence passes: kernels with second derivatives.

torch runs `F.scaled_dot_product_attention` on fused kernels (flash, memory-efficient) whose backward has no
derivative of its own, and nn.MultiheadAttention and nn.TransformerEncoderLayer take a fused "fast path" in eval
mode. Influence needs second derivatives, so its passes run inside `second_order_attention()`: the math backend
only and no fast path, with the caller's settings restored on the way out.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel


@contextlib.contextmanager
def second_order_attention() -> Iterator[None]:
    """Run attention on kernels that can be differentiated twice: `scaled_dot_product_attention` on its math
    backend, nn.MultiheadAttention and nn.Transformer*Layer off their fast path. Restores both on exit."""
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with sdpa_kernel(SDPBackend.MATH):
            yield
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
