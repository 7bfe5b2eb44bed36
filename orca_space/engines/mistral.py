"""The batched engine's model math: Mistral's forward as small functions over a slot-indexed KV cache.

In the spirit of gpt-fast, the transformer is a few pure functions of tensors: they read the
weights of a loaded transformers `MistralForCausalLM` (no copy) and the ring KV cache of
`kv_cache.py`, where each slot holds one request at its own length. Nothing here allocates per
step beyond temporaries and nothing reads a tensor back to the host, so a whole decode step
(forward and sampling, `decode_step.py`) can be replayed as a CUDA graph.

Shapes in comments: B rows (slots), T new tokens per row, L attended key positions, H query
heads, KVH key/value heads, G = H // KVH query heads per key/value head, D head dim, V vocab.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F

from .hf_weights import LayerWeights, MistralWeights, ModelShape
from .kv_cache import KVCache, cached_positions, padded_forward_fits

# -- the transformer, one small function per piece --


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """As transformers' MistralRMSNorm: the statistics in fp32, the scale in the model dtype.

    `F.rms_norm` is one fused kernel on CUDA where the spelled-out formula is five; a decode
    step has 65 norms, and in a CUDA graph every kernel costs microseconds however small. (Its
    CUDA kernel sums the squares in another order: equal to fp32 rounding, not bit for bit.)
    """
    return weight * F.rms_norm(x.float(), (x.shape[-1],), eps=eps).to(x.dtype)


def rope_cos_sin(
    positions: torch.Tensor, inv_freq: torch.Tensor, scale: float, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """positions: [B, T] -> cos, signed sin: [B, 1, T, D] (broadcast over heads).

    transformers rotates as cat(-x2, x1) * sin; that equals cat(x2, x1) * (sin with its first half
    negated), bit for bit (negation is exact), one kernel fewer per use. See `apply_rope`.
    """
    freqs = positions[..., None].float() * inv_freq  # [B, T, D/2]
    angles = torch.cat((freqs, freqs), dim=-1)  # [B, T, D]
    cos, sin = (angles.cos() * scale).to(dtype), (angles.sin() * scale).to(dtype)
    half = sin.shape[-1] // 2
    signed_sin = torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)
    return cos[:, None], signed_sin[:, None]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """x: [B, heads, T, D]; rotate-half rope, as transformers does it (see `rope_cos_sin`).

    The halves are swapped by a flip over a [2, D/2] view: one kernel that reads strided input
    (q and k are slices of the stacked projection), where roll would first copy it contiguous.
    """
    swapped = x.unflatten(-1, (2, x.shape[-1] // 2)).flip(-2).flatten(-2)  # cat(x2, x1)
    return x * cos + swapped * signed_sin


def attention_mask(positions: torch.Tensor, kv_len: int, cache_len: int, window: int | None) -> torch.Tensor:
    """positions: [B, T], increasing along T -> bool [B, 1, T, L].

    A query at position p sees the ring entry holding position q if 0 <= q <= p and
    p - window < q. Every query sees at least its own key (written before attending), so no
    row is all-masked (SDPA would give NaN). A row riding along in a decode step (position -1,
    see `step_context`) sees every entry: its output is never read, but it must be a number.
    """
    held = cached_positions(positions[:, -1], kv_len, cache_len)[:, None, None, :]  # [B, 1, 1, L]
    query = positions[:, None, :, None]  # [B, 1, T, 1]
    visible = (held >= 0) & (held <= query)
    if window is not None:
        visible &= held > query - window
    return visible | (query < 0)


def grouped_mask(visible: torch.Tensor, groups: int) -> torch.Tensor:
    """bool [B, 1, T, L] -> [B, 1, G * T, L], as `attend` folds query heads; built once per forward.

    Kept boolean: on the CPU an additive float mask made SDPA slower (2,100 vs 3,000 tok/s in
    all at 64 streams in bench/engine_bench.py --tiny), and on CUDA SDPA's own conversion is one
    small kernel per layer.
    """
    B, _, T, L = visible.shape
    return visible[:, :, None].expand(B, 1, groups, T, L).reshape(B, 1, groups * T, L)


# Devices where a prefill's mask becomes an additive bias once per forward (see `prefill_bias`).
PREFILL_BIAS_DEVICES = ("cuda",)


def prefill_bias(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A prefill's boolean mask [B, 1, G * T, L] as the additive bias SDPA would otherwise make of
    it again in every layer (False -> -inf, True -> 0, in the query's dtype: the same numbers),
    made once per forward: at a 512-token chunk over a 4,608-entry ring that is 19 MB written per
    layer, 32 times. The CPU keeps the boolean: SDPA is slower there with a float mask."""
    if mask.device.type not in PREFILL_BIAS_DEVICES:
        return mask
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, float("-inf"))


class StepContext(NamedTuple):
    """What every layer of one forward shares, computed once per forward, not per layer."""

    cos: torch.Tensor  # [B, 1, T, D]
    signed_sin: torch.Tensor  # [B, 1, T, D], see `rope_cos_sin`
    mask: torch.Tensor  # bool [B, 1, G * T, L], see `grouped_mask`
    rows: torch.Tensor  # long [B, 1]: row indices for the cache writes
    entries: torch.Tensor  # long [B, T]: the ring entries the new keys go to


def step_context(
    weights: MistralWeights, positions: torch.Tensor, kv_len: int, cache_len: int
) -> StepContext:
    """A decode row at position -1 rides along: a slot with nothing to decode (free, holding a
    kept cache, or still prefilling) inside a step's batch. Its keys go to the entry past the
    ring's end (`kv_cache.UNUSED_TAIL`), which no query reads, so its cache stays as it was."""
    shape = weights.shape
    cos, signed_sin = rope_cos_sin(positions, weights.inv_freq, weights.rope_scale, weights.dtype)
    visible = attention_mask(positions, kv_len, cache_len, shape.sliding_window)
    return StepContext(
        cos=cos,
        signed_sin=signed_sin,
        mask=grouped_mask(visible, shape.groups),
        rows=torch.arange(positions.shape[0], device=positions.device)[:, None],
        # The ring; a riding-along row writes past its end.
        entries=torch.where(positions < 0, cache_len, torch.remainder(positions, cache_len)),
    )


def write_kv(cache_rows: torch.Tensor, new: torch.Tensor, context: StepContext) -> None:
    """cache_rows: [B, KVH, cache_len, D]; new: [B, KVH, T, D].

    Index arithmetic only (no host reads), so the write is graph-capturable.
    """
    cache_rows[context.rows, :, context.entries] = new.transpose(1, 2)  # indexed view: [B, T, KVH, D]


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """q: [B, H, T, D]; k, v: [B, KVH, L, D]; mask: bool [B, 1, G * T, L] -> [B, T, H * D].

    Grouped-query attention without repeating keys: the G query heads that share a key/value
    head are folded into SDPA's query-length axis ([B, KVH, G * T, D]), so each cached key is
    read once per step instead of G times. Query head h uses key/value head h // G, as in
    transformers' `repeat_kv`. See `grouped_mask` for the mask.
    """
    B, H, T, D = q.shape
    kv_heads = k.shape[1]
    groups = H // kv_heads
    q = q.reshape(B, kv_heads, groups * T, D)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=D**-0.5)  # [B, KVH, G*T, D]
    # reshape, not view: CUDA's memory-efficient kernel returns a non-contiguous layout.
    return out.reshape(B, H, T, D).transpose(1, 2).reshape(B, T, H * D)


def layer_forward(
    x: torch.Tensor,
    w: LayerWeights,
    shape: ModelShape,
    context: StepContext,
    k_rows: torch.Tensor,
    v_rows: torch.Tensor,
) -> torch.Tensor:
    """x: [B, T, hidden]; k_rows, v_rows: this layer's cache for the B rows [B, KVH, cache_len, D]."""
    B, T, _ = x.shape
    h = rms_norm(x, w.attn_norm, shape.eps)
    q_width, kv_width = shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim
    q, k, v = F.linear(h, w.qkv).split([q_width, kv_width, kv_width], dim=-1)
    q = q.view(B, T, shape.heads, shape.head_dim).transpose(1, 2)  # [B, H, T, D]
    k = k.view(B, T, shape.kv_heads, shape.head_dim).transpose(1, 2)  # [B, KVH, T, D]
    v = v.view(B, T, shape.kv_heads, shape.head_dim).transpose(1, 2)
    q, k = apply_rope(q, context.cos, context.signed_sin), apply_rope(k, context.cos, context.signed_sin)
    write_kv(k_rows, k, context)
    write_kv(v_rows, v, context)
    kv_len = context.mask.shape[-1]
    attn = attend(q, k_rows.narrow(2, 0, kv_len), v_rows.narrow(2, 0, kv_len), context.mask)  # [B, T, H*D]
    x = x + F.linear(attn, w.o)
    h = rms_norm(x, w.mlp_norm, shape.eps)
    gate, up = F.linear(h, w.gate_up).chunk(2, dim=-1)
    return x + F.linear(F.silu(gate) * up, w.down)


def forward(
    weights: MistralWeights,
    cache: KVCache,
    tokens: torch.Tensor,
    positions: torch.Tensor,
    slots: slice | torch.Tensor,
    kv_len: int,
    prefilling: bool = False,
) -> torch.Tensor:
    """Run tokens [B, T] at positions [B, T] for B slots: a run of them (a slice) or any (long [B]).

    Writes their keys and values into the cache and returns the final hidden states
    [B, T, hidden] before the last norm. Each row attends over its slot's first `kv_len` ring
    entries, masked to its own causal sliding window; every position a row can see must
    already be written (earlier chunks or steps) or be written by this call. A run of slots is
    read and written through views; other slots attend over gathered copies of their first
    kv_len entries, and the entries this call wrote are scattered back.
    """
    x = F.embedding(tokens, weights.embed)  # [B, T, hidden]
    context = step_context(weights, positions, kv_len, cache.cache_len)
    if prefilling:  # (the decode step's mask is its variant's choice: step_options.py)
        context = context._replace(mask=prefill_bias(context.mask, weights.dtype))
    for index, layer in enumerate(weights.layers):
        layer_k, layer_v = cache.k[index], cache.v[index]  # [S, KVH, cache_len + tail, D]
        if isinstance(slots, slice):
            x = layer_forward(x, layer, weights.shape, context, layer_k[slots], layer_v[slots])
            continue
        k_rows, v_rows = layer_k[slots, :, :kv_len], layer_v[slots, :, :kv_len]  # copies
        x = layer_forward(x, layer, weights.shape, context, k_rows, v_rows)
        written = (context.rows, slice(None), context.entries)
        layer_k[slots[:, None], :, context.entries] = k_rows[written]
        layer_v[slots[:, None], :, context.entries] = v_rows[written]
    return x


def logits_of(weights: MistralWeights, hidden: torch.Tensor) -> torch.Tensor:
    """hidden: [B, hidden] -> logits [B, V] (in the model dtype, as transformers returns them)."""
    return F.linear(rms_norm(hidden, weights.norm, weights.shape.eps), weights.lm_head)


@dataclass(frozen=True)
class PromptChunk:
    """Prompt tokens of one request, to go into `slot` from position `start`."""

    slot: int
    start: int
    tokens: list[int]


def prefill(
    weights: MistralWeights,
    cache: KVCache,
    chunks: list[PromptChunk],
    to_device: ToDevice | None = None,
) -> torch.Tensor:
    """Several requests' prompt chunks in one forward, one row each, padded to the longest.

    Returns logits [N, V], row i at chunk i's last real token (the next-token logits once a
    prompt is all in). Padding tokens are written past a chunk's end: positions the request
    writes again before any query of it reads them, and ring entries whose old keys no later
    query sees (`kv_cache.padded_forward_fits`, which the engine's scheduling keeps to). One
    chunk runs on a view of its slot's cache, several on gathered copies. `to_device` moves the
    index lists to the device (the engine passes its pinned staging).
    """
    width = max(len(chunk.tokens) for chunk in chunks)
    end = max(chunk.start for chunk in chunks) + width
    window = weights.shape.sliding_window
    if not padded_forward_fits(end, width, cache.cache_len, window):  # it would overwrite what it sees
        raise ValueError(
            f"a {width}-token chunk ending at position {end} does not fit this cache "
            f"({cache.cache_len} entries, a {window or 0}-token window)"
        )
    to_device = to_device or _plain_to_device(weights.device)
    tokens, starts, slot_ids, last = to_device(
        [
            [t for c in chunks for t in c.tokens + [0] * (width - len(c.tokens))],
            [c.start for c in chunks],
            [c.slot for c in chunks],
            [len(c.tokens) - 1 for c in chunks],
        ]
    )
    tokens = tokens.view(len(chunks), width)
    positions = starts[:, None] + torch.arange(width, device=weights.device)  # [N, T]
    slots = slice(chunks[0].slot, chunks[0].slot + 1) if len(chunks) == 1 else slot_ids
    hidden = forward(weights, cache, tokens, positions, slots, min(cache.cache_len, end), prefilling=True)
    return logits_of(weights, hidden[torch.arange(len(chunks), device=weights.device), last])


ToDevice = Callable[[list[list[int]]], list[torch.Tensor]]


def _plain_to_device(device: torch.device) -> ToDevice:
    def to_device(rows: list[list[int]]) -> list[torch.Tensor]:
        return [torch.tensor(row, dtype=torch.long, device=device) for row in rows]

    return to_device


def decode(
    weights: MistralWeights, cache: KVCache, tokens: torch.Tensor, positions: torch.Tensor, kv_len: int
) -> torch.Tensor:
    """One token for each of the first B slots (row b is slot b). tokens, positions: [B].

    Returns logits [B, V]. Every row's visible keys must lie in the first kv_len ring entries
    (kv_len = cache_len once any row's position has reached it). A row at position -1 rides
    along without touching its slot's ring (see `step_context`); its logits mean nothing.
    """
    hidden = forward(weights, cache, tokens[:, None], positions[:, None], slice(0, tokens.shape[0]), kv_len)
    return logits_of(weights, hidden[:, 0])
