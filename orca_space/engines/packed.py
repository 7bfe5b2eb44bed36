"""Packed (variable-length) prefill: prompt chunks of different lengths in one forward, no padding.

The rows' tokens are laid end to end as one sequence [1, N] (N = the sum of the chunks' lengths),
so the matrix products (most of a forward's work) run once over exactly the tokens there are;
only attention is per row, each chunk's queries over its own slot's ring with its own causal
sliding-window mask (`mistral.attention_mask`), after writing its keys, as `mistral.forward`
does. Nothing is padded, so no chunk writes past its own end: a chunk fits the ring whenever it
alone would (`kv_cache.padded_forward_fits` at its own length), and the ring, the window and
kept prefixes behave exactly as with one prompt at a time.

A step may also carry the decode rows (`DecodeRows`: slots [0, B), one token each, read from the
decode buffers as `decode_step.decode_and_sample` reads them): the "mixed" step, one forward for
both, which reads the weights once instead of twice. It runs eagerly; the `budget` policy's
default keeps decode a separate step, a captured CUDA graph on GPU (see `bench/scheduling.py`).

Shapes as in `mistral.py`; N packed prompt tokens, R prompt rows.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .decode_step import DecodeBuffers, sample_decoded
from .hf_weights import LayerWeights, MistralWeights, ModelShape
from .kv_cache import KVCache, padded_forward_fits
from .mistral import (
    PromptChunk,
    StepContext,
    ToDevice,
    _plain_to_device,
    apply_rope,
    attend,
    attention_mask,
    grouped_mask,
    logits_of,
    prefill_bias,
    rms_norm,
    rope_cos_sin,
    step_context,
    write_kv,
)


@dataclass(frozen=True)
class PromptRow:
    """One chunk's place in the packed sequence and what its attention needs."""

    slot: int
    begin: int  # its first token's index in the packed sequence
    end: int  # one past its last
    entries: torch.Tensor  # long [T]: the ring entries its keys go to
    kv_len: int  # ring entries its queries attend over
    mask: torch.Tensor  # bool [1, 1, G * T, kv_len], or its additive bias (`mistral.prefill_bias`)


@dataclass(frozen=True)
class DecodeRows:
    """The decode rows riding in a mixed step: slots [0, batch), inputs in the decode buffers."""

    tokens: torch.Tensor  # long [B]
    positions: torch.Tensor  # long [B]; -1 for a row with nothing to decode
    kv_len: int


def check_fits(chunks: list[PromptChunk], cache_len: int, window: int | None) -> None:
    for chunk in chunks:
        end, width = chunk.start + len(chunk.tokens), len(chunk.tokens)
        if not padded_forward_fits(end, width, cache_len, window):  # it would overwrite what it sees
            raise ValueError(
                f"a {width}-token chunk ending at position {end} does not fit this cache "
                f"({cache_len} entries, a {window or 0}-token window)"
            )


def prefill(
    weights: MistralWeights,
    cache: KVCache,
    chunks: list[PromptChunk],
    to_device: ToDevice | None = None,
    decode_rows: DecodeRows | None = None,
    logits_for: Sequence[int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Prompt chunks (each in its own slot) in one packed forward, with `decode_rows` if given.

    Returns (logits [R, V] at each chunk's last token, the decode rows' logits [B, V] or None).
    `logits_for`: only these chunks' logits (the engine's: the chunks that end their prompt),
    [len(logits_for), V]. The output layer is a third of a small model's weights and a
    sixteenth of Mistral 7B's: a chunk in the middle of a prompt has no use for it, and the rows
    that do (the decode rows' too) share one product, so the layer is read once a step.
    `to_device` moves the index lists to the device (the engine passes its pinned staging).
    """
    shape = weights.shape
    check_fits(chunks, cache.cache_len, shape.sliding_window)
    to_device = to_device or _plain_to_device(weights.device)
    lengths = [len(chunk.tokens) for chunk in chunks]
    ends = [sum(lengths[: i + 1]) for i in range(len(chunks))]
    tokens, positions, last = to_device(
        [
            [t for chunk in chunks for t in chunk.tokens],
            [p for chunk in chunks for p in range(chunk.start, chunk.start + len(chunk.tokens))],
            [end - 1 for end in ends],
        ]
    )
    rows = [
        prompt_row(weights, chunk, begin, end, positions, cache.cache_len)
        for chunk, begin, end in zip(chunks, [0, *ends[:-1]], ends)
    ]
    x = F.embedding(tokens, weights.embed)[None]  # [1, N, hidden]
    cos, signed_sin = rope_cos_sin(positions[None], weights.inv_freq, weights.rope_scale, weights.dtype)
    decode_context = None
    if decode_rows is not None:  # its B tokens go first in the packed sequence
        x = torch.cat([F.embedding(decode_rows.tokens, weights.embed)[None], x], dim=1)
        decode_context = step_context(
            weights, decode_rows.positions[:, None], decode_rows.kv_len, cache.cache_len
        )
    for index, layer in enumerate(weights.layers):
        x = packed_layer(
            x, layer, shape, (cos, signed_sin), rows, decode_context, cache.k[index], cache.v[index]
        )
    batch = 0 if decode_rows is None else decode_rows.tokens.shape[0]
    wanted = x[0, batch:][last if logits_for is None else last[list(logits_for)]]
    logits = logits_of(weights, torch.cat([x[0, :batch], wanted]) if batch else wanted)
    return logits[batch:], (logits[:batch] if batch else None)


def prompt_row(
    weights: MistralWeights, chunk: PromptChunk, begin: int, end: int, positions: torch.Tensor, cache_len: int
) -> PromptRow:
    """A chunk's ring entries and mask, built once per forward (every layer shares them)."""
    shape = weights.shape
    own = positions[begin:end]  # [T]
    kv_len = min(cache_len, chunk.start + len(chunk.tokens))
    visible = attention_mask(own[None], kv_len, cache_len, shape.sliding_window)  # [1, 1, T, L]
    mask = prefill_bias(grouped_mask(visible, shape.groups), weights.dtype)
    return PromptRow(chunk.slot, begin, end, torch.remainder(own, cache_len), kv_len, mask)


def packed_layer(
    x: torch.Tensor,
    w: LayerWeights,
    shape: ModelShape,
    rope: tuple[torch.Tensor, torch.Tensor],
    rows: list[PromptRow],
    decode: StepContext | None,
    layer_k: torch.Tensor,
    layer_v: torch.Tensor,
) -> torch.Tensor:
    """x: [1, B + N, hidden] (B decode tokens first, if any, then the packed prompt tokens);
    layer_k, layer_v: this layer's whole cache [S, KVH, cache_len + tail, D]."""
    total = x.shape[1]
    h = rms_norm(x, w.attn_norm, shape.eps)
    q_width, kv_width = shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim
    q, k, v = F.linear(h, w.qkv).split([q_width, kv_width, kv_width], dim=-1)  # [1, B + N, *]
    batch = total - rows[-1].end if rows else total
    parts = []
    if decode is not None:
        parts.append(
            decode_attention(q[0, :batch], k[0, :batch], v[0, :batch], shape, decode, layer_k, layer_v)
        )
    q, k, v = (t[:, batch:].view(1, total - batch, -1, shape.head_dim).transpose(1, 2) for t in (q, k, v))
    q, k = apply_rope(q, *rope), apply_rope(k, *rope)  # [1, H or KVH, N, D]
    for row in rows:
        k_row, v_row = layer_k[row.slot], layer_v[row.slot]  # views [KVH, cache_len + tail, D]
        k_row[:, row.entries] = k[0, :, row.begin : row.end]
        v_row[:, row.entries] = v[0, :, row.begin : row.end]
        keys, values = (t[None, :, : row.kv_len] for t in (k_row, v_row))
        parts.append(attend(q[:, :, row.begin : row.end], keys, values, row.mask)[0])  # [T, H*D]
    x = x + F.linear(torch.cat(parts)[None], w.o)
    h = rms_norm(x, w.mlp_norm, shape.eps)
    gate, up = F.linear(h, w.gate_up).chunk(2, dim=-1)
    return x + F.linear(F.silu(gate) * up, w.down)


def decode_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    shape: ModelShape,
    context: StepContext,
    layer_k: torch.Tensor,
    layer_v: torch.Tensor,
) -> torch.Tensor:
    """The decode rows' attention, as `mistral.layer_forward` does it for slots [0, B).
    q, k, v: [B, width] -> [B, H * D]."""
    batch = q.shape[0]
    q = q.view(batch, 1, shape.heads, shape.head_dim).transpose(1, 2)  # [B, H, 1, D]
    k = k.view(batch, 1, shape.kv_heads, shape.head_dim).transpose(1, 2)
    v = v.view(batch, 1, shape.kv_heads, shape.head_dim).transpose(1, 2)
    q, k = apply_rope(q, context.cos, context.signed_sin), apply_rope(k, context.cos, context.signed_sin)
    k_rows, v_rows = layer_k[:batch], layer_v[:batch]
    write_kv(k_rows, k, context)
    write_kv(v_rows, v, context)
    kv_len = context.mask.shape[-1]
    return attend(q, k_rows.narrow(2, 0, kv_len), v_rows.narrow(2, 0, kv_len), context.mask)[:, 0]


def sample_decode_rows(buffers: DecodeBuffers, logits: torch.Tensor, batch: int, **options) -> list[int]:
    """A mixed step's decode rows: sample from their logits [B, V] exactly as the decode step
    does after its forward (`decode_step.sample_decoded`, with its `options`), and read the
    tokens back."""
    sample_decoded(buffers, logits, batch, **options)
    return buffers.next[:batch].tolist()
