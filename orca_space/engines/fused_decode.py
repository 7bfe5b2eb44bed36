"""The decode step with fewer kernels: one token per row, the same math as `mistral.decode`.

`mistral.decode` runs the general forward (any number of new tokens per row, prefill and decode
alike). One new token per row over a run of slots allows less: the rope's tables, the mask and
the rows' cache entries are built once per step, q and k are rotated together, and the norms run
as one kernel each. Which parts run is a `StepOptions` (see `step_options.py`); with none of
them this is `mistral.decode` computed another way, and `bench/device_check.py` weighs each on
the GPU. Shapes as in `mistral.py`: B rows, H query heads, KVH key/value heads, G = H // KVH,
D head dim, L attended ring entries.

Kernels per layer at batch B on CUDA (today's step -> all parts fused): norms 8 -> 2, rope 8 -> 3,
SDPA's own bool-to-float mask conversion 1 -> 0; counted per step on the CPU by
`bench/op_count.py` (aten ops, the calls a GPU launches kernels for).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from .hf_weights import LayerWeights, MistralWeights, ModelShape
from .kv_cache import KVCache
from .mistral import attention_mask, rms_norm, rope_cos_sin
from .step_options import StepOptions


class DecodeContext(NamedTuple):
    """What every layer of one decode step shares, built once per step."""

    cos: torch.Tensor  # [B, 1, 1, D] (broadcast over heads in a [B, 1, heads, D] layout)
    signed_sin: torch.Tensor  # [B, 1, 1, D], see `mistral.rope_cos_sin`
    mask: torch.Tensor  # [B, 1, 1, L]: bool (True = visible), or additive (0 / -inf)
    rows: torch.Tensor  # long [B, 1]
    entries: torch.Tensor  # long [B, 1]: the ring entry each row's new key goes to
    options: StepOptions


def decode_context(
    weights: MistralWeights, positions: torch.Tensor, kv_len: int, cache_len: int, options: StepOptions
) -> DecodeContext:
    """positions: [B]. A row at position -1 rides along (see `mistral.step_context`)."""
    positions = positions[:, None]  # [B, 1]
    cos, signed_sin = rope_cos_sin(positions, weights.inv_freq, weights.rope_scale, weights.dtype)
    visible = attention_mask(positions, kv_len, cache_len, weights.shape.sliding_window)  # [B, 1, 1, L]
    if options.mask == "additive" or uses_split_kv(options, positions.shape[0]):
        # One float mask for every layer; fp32 for the split-KV softmax, else the model dtype.
        dtype = torch.float32 if uses_split_kv(options, positions.shape[0]) else weights.dtype
        mask = torch.zeros(visible.shape, dtype=dtype, device=visible.device)
        mask = mask.masked_fill_(~visible, float("-inf"))
    else:
        mask = visible
    return DecodeContext(
        cos=cos.transpose(1, 2),  # [B, T=1, 1, D]
        signed_sin=signed_sin.transpose(1, 2),
        mask=mask,
        rows=torch.arange(positions.shape[0], device=positions.device)[:, None],
        entries=torch.where(positions < 0, cache_len, torch.remainder(positions, cache_len)),
        options=options,
    )


def uses_split_kv(options: StepOptions, batch: int) -> bool:
    return batch <= options.split_kv_up_to


def norm(x: torch.Tensor, weight: torch.Tensor, eps: float, options: StepOptions) -> torch.Tensor:
    """RMSNorm with fp32 statistics: one fused kernel with its weight, or as transformers spells it.

    Fused, the scale is applied before the downcast (one rounding to fp16 instead of two):
    within a unit in the last place of transformers' result, far inside the self-check's
    tolerance; in fp32 the same to rounding.
    """
    if options.norm == "fused":
        return F.rms_norm(x, (x.shape[-1],), weight, eps)
    return rms_norm(x, weight, eps)


def rotate_qk(
    qk: torch.Tensor, context: DecodeContext, shape: ModelShape
) -> tuple[torch.Tensor, torch.Tensor]:
    """qk: [B, 1, H + KVH, D] (a view of the stacked projection) -> q [B, H, 1, D], k [B, KVH, 1, D].

    Fused: q and k in one rotation, x * cos + swap(x) * sin with the product and sum as one
    `addcmul` (its sum rounds once where the spelled-out formula rounds twice).
    """
    if context.options.rope == "fused":
        half = qk.shape[-1] // 2
        swapped = qk.unflatten(-1, (2, half)).flip(-2).flatten(-2)  # cat(x2, x1)
        rotated = torch.addcmul(qk * context.cos, swapped, context.signed_sin)
        return rotated[:, :, : shape.heads].transpose(1, 2), rotated[:, :, shape.heads :].transpose(1, 2)
    from .mistral import apply_rope

    q, k = qk[:, :, : shape.heads].transpose(1, 2), qk[:, :, shape.heads :].transpose(1, 2)
    cos, sin = context.cos.transpose(1, 2), context.signed_sin.transpose(1, 2)
    return apply_rope(q, cos, sin), apply_rope(k, cos, sin)


def split_kv_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """q: [B, KVH, G, D]; k, v: [B, KVH, L, D]; mask: fp32 additive [B, 1, 1, L] -> [B, KVH, G, D].

    Attention for one new token as two batched matrix products around an fp32 softmax. The
    products split the L keys into tiles across the whole GPU, where SDPA's memory-efficient
    kernel gives each (row, key/value head) one block (8 blocks at batch 1 on a 132-SM card).
    q is scaled first, so the fp16 scores cannot overflow where SDPA's would not.
    """
    scores = torch.matmul(q * q.shape[-1] ** -0.5, k.transpose(-1, -2))  # [B, KVH, G, L]
    probs = torch.softmax(mask + scores, dim=-1)  # fp32: the mask promotes the sum
    return torch.matmul(probs.to(v.dtype), v)


def attend_one(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, context: DecodeContext, shape: ModelShape
) -> torch.Tensor:
    """q: [B, H, 1, D]; k, v: [B, KVH, L, D] -> [B, 1, H * D]; query head h reads key head h // G."""
    B = q.shape[0]
    q = q.reshape(B, shape.kv_heads, shape.groups, shape.head_dim)  # T = 1: heads fold into SDPA's query axis
    if uses_split_kv(context.options, B):
        out = split_kv_attention(q, k, v, context.mask)
    else:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=context.mask, scale=shape.head_dim**-0.5)
    return out.reshape(B, 1, shape.heads * shape.head_dim)  # reshape: CUDA's kernel is non-contiguous


def layer_step(
    x: torch.Tensor, w: LayerWeights, shape: ModelShape, context: DecodeContext, k_rows, v_rows
) -> torch.Tensor:
    """x: [B, 1, hidden]; k_rows, v_rows: [B, KVH, cache_len + tail, D] views of this layer's cache."""
    B = x.shape[0]
    options = context.options
    h = norm(x, w.attn_norm, shape.eps, options)
    qkv = F.linear(h, w.qkv)  # [B, 1, (H + 2 * KVH) * D]
    qk_width = (shape.heads + shape.kv_heads) * shape.head_dim
    qk = qkv[..., :qk_width].view(B, 1, shape.heads + shape.kv_heads, shape.head_dim)
    v = qkv[..., qk_width:].view(B, 1, shape.kv_heads, shape.head_dim)
    q, k = rotate_qk(qk, context, shape)
    k_rows[context.rows, :, context.entries] = k.transpose(1, 2)  # [B, 1, KVH, D] into the ring
    v_rows[context.rows, :, context.entries] = v
    kv_len = context.mask.shape[-1]
    attn = attend_one(q, k_rows.narrow(2, 0, kv_len), v_rows.narrow(2, 0, kv_len), context, shape)
    x = x + F.linear(attn, w.o)
    h = norm(x, w.mlp_norm, shape.eps, options)
    gate, up = F.linear(h, w.gate_up).chunk(2, dim=-1)
    return x + F.linear(F.silu(gate) * up, w.down)


def decode(
    weights: MistralWeights,
    cache: KVCache,
    tokens: torch.Tensor,
    positions: torch.Tensor,
    kv_len: int,
    options: StepOptions,
) -> torch.Tensor:
    """One token for each of the first B slots, as `mistral.decode` (same contract). -> logits [B, V]."""
    batch = tokens.shape[0]
    x = F.embedding(tokens[:, None], weights.embed)  # [B, 1, hidden]
    context = decode_context(weights, positions, kv_len, cache.cache_len, options)
    for index, layer in enumerate(weights.layers):
        x = layer_step(x, layer, weights.shape, context, cache.k[index, :batch], cache.v[index, :batch])
    hidden = norm(x[:, 0], weights.norm, weights.shape.eps, options)
    if options.pad_vocab and weights.lm_head_padded is not None:
        return F.linear(hidden, weights.lm_head_padded)[:, : weights.shape.vocab]  # [B, V], a view
    return F.linear(hidden, weights.lm_head)
