"""Attention in influence passes: kernels with second derivatives, and nn.MultiheadAttention's projections in view.

torch runs `F.scaled_dot_product_attention` on fused kernels (flash, memory-efficient) whose backward has no
derivative of its own, and nn.MultiheadAttention and nn.TransformerEncoderLayer take a fused "fast path" in eval
mode. Influence needs second derivatives, so its passes run inside `second_order_attention()`: the math backend
only and no fast path, with the caller's settings restored on the way out.

nn.MultiheadAttention applies its input projections (``in_proj_weight`` or ``q/k/v_proj_weight``) and its
output projection (``out_proj.weight``) functionally, so forward hooks on ``out_proj`` never fire. Within
`explicit_attention(module, record)`, every such module instead runs `multi_head_attention`: the same
computation written out, which reports each input projection's input and output to ``record`` and calls
``out_proj`` as a module, so that the per-layer form (`LayerStructure`) sees all four linear maps.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

#: record(attention module, role, projection input, projection output) with role 0, 1, 2 for q, k, v.
Record = Callable[[nn.MultiheadAttention, int, Tensor, Tensor], None]


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


def projection(module: nn.MultiheadAttention, role: int) -> tuple[Tensor, Tensor | None]:
    """The weight [E, in] and bias [E] (or None) of the q (0), k (1) or v (2) input projection."""
    size = module.embed_dim
    if module._qkv_same_embed_dim:
        weight = module.in_proj_weight[role * size : (role + 1) * size]
    else:
        weight = (module.q_proj_weight, module.k_proj_weight, module.v_proj_weight)[role]
    bias = None if module.in_proj_bias is None else module.in_proj_bias[role * size : (role + 1) * size]
    return weight, bias


def _additive_mask(mask: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    """A boolean mask (True: may not attend) as 0/−∞ to add to the scores; a float mask as it is."""
    if mask is None or mask.is_floating_point():
        return mask
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask, float("-inf"))


def _extra_keys(module: nn.MultiheadAttention, k: Tensor, v: Tensor, mask: Tensor | None
                ) -> tuple[Tensor, Tensor, Tensor | None]:
    """`add_bias_kv` and `add_zero_attn`: one more key and value each (learned, or zero), which every query may
    attend to. k, v are [B, H, S, d]; the mask [B, H, L, S] gains a zero column per added key."""
    extras = []
    if module.bias_k is not None:
        heads, head_dim = k.shape[1], k.shape[3]
        extras.append((module.bias_k.view(1, heads, 1, head_dim), module.bias_v.view(1, heads, 1, head_dim)))
    if module.add_zero_attn:
        extras.append((k.new_zeros(1, k.shape[1], 1, k.shape[3]), v.new_zeros(1, v.shape[1], 1, v.shape[3])))
    for extra_k, extra_v in extras:
        k = torch.cat([k, extra_k.expand(k.shape[0], -1, -1, -1)], dim=2)
        v = torch.cat([v, extra_v.expand(v.shape[0], -1, -1, -1)], dim=2)
        mask = None if mask is None else F.pad(mask, (0, 1))
    return k, v, mask


def multi_head_attention(
    module: nn.MultiheadAttention,
    record: Callable[[int, Tensor, Tensor], None],
    query: Tensor,
    key: Tensor,
    value: Tensor,
    key_padding_mask: Tensor | None = None,
    need_weights: bool = True,
    attn_mask: Tensor | None = None,
    average_attn_weights: bool = True,
    is_causal: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """`nn.MultiheadAttention.forward` written out (same arguments, same result): softmax(q kᵀ/√d + mask) v per
    head, with each input projection reported to `record(role, input, output)` and ``out_proj`` called as a
    module. Inputs are taken batch-first inside; `is_causal` is only a hint that `attn_mask` is causal, as in
    torch, so the mask itself is used."""
    batched, batch_first = query.dim() == 3, module.batch_first
    inputs = [t if batched and batch_first else t.transpose(0, 1) if batched else t.unsqueeze(0)
              for t in (query, key, value)]
    projected = []
    for role, x in enumerate(inputs):
        output = F.linear(x, *projection(module, role))
        record(role, x, output)
        projected.append(output)
    batch, length, size = projected[0].shape
    heads, head_dim = module.num_heads, module.head_dim
    q, k, v = (t.reshape(batch, -1, heads, head_dim).transpose(1, 2) for t in projected)
    mask = _additive_mask(attn_mask, q.dtype)
    if mask is not None:
        mask = mask.view(batch, heads, length, -1) if mask.dim() == 3 else mask.view(1, 1, length, -1)
    padding = _additive_mask(key_padding_mask, q.dtype)
    if padding is not None:
        padding = padding.view(batch, 1, 1, -1)
        mask = padding if mask is None else mask + padding
    k, v, mask = _extra_keys(module, k, v, mask)
    scores = q @ k.transpose(-2, -1) / math.sqrt(head_dim)
    weights = torch.softmax(scores if mask is None else scores + mask, dim=-1)
    attended = F.dropout(weights, p=module.dropout, training=module.training) @ v
    output = module.out_proj(attended.transpose(1, 2).reshape(batch, length, size))
    output = output if batched and batch_first else output.transpose(0, 1) if batched else output.squeeze(0)
    if not need_weights:
        return output, None
    weights = weights.mean(dim=1) if average_attn_weights else weights
    return output, weights if batched else weights.squeeze(0)


@contextlib.contextmanager
def explicit_attention(module: nn.Module, record: Record) -> Iterator[None]:
    """Within: every nn.MultiheadAttention inside `module` runs `multi_head_attention`, reporting to `record`, on
    kernels with second derivatives and off the fast path (which would bypass it). Restored on exit."""
    attentions = [m for m in module.modules() if isinstance(m, nn.MultiheadAttention)]
    own = [m.__dict__.get("forward") for m in attentions]  # a forward set on the instance itself, kept
    for attention in attentions:
        attention.forward = functools.partial(multi_head_attention, attention, functools.partial(record, attention))
    try:
        with second_order_attention():
            yield
    finally:
        for attention, forward in zip(attentions, own):
            if forward is None:
                del attention.forward
            else:
                attention.forward = forward
