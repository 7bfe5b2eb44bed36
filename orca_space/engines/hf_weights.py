"""The weights of a loaded transformers `MistralForCausalLM`, as the batched engine reads them.

`weights_from_hf` reads them without copies, and restacks each layer's q/k/v and gate/up
projections into one matrix each (the model's own weights become views of them, so it computes
exactly as before); `ModelShape` is the little the engine needs to know of the config.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# The logits product's rows rounded up to this (32002 -> 32064 for Mistral), as vLLM pads its
# vocabulary: a matrix product whose size is a multiple of 64 gets the aligned tensor-core tiles.
VOCAB_MULTIPLE = 64
# Rope variants whose frequencies depend on the sequence length cannot use a fixed table.
DYNAMIC_ROPE_TYPES = ("dynamic", "longrope")


@dataclass(frozen=True)
class ModelShape:
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    sliding_window: int | None  # a query sees keys at positions (p - window, p]
    eps: float

    @property
    def groups(self) -> int:
        return self.heads // self.kv_heads

    def kv_bytes_per_token(self, dtype: torch.dtype) -> int:
        """Keys and values of one token in every layer: 128 KiB for Mistral 7B in fp16."""
        return 2 * self.layers * self.kv_heads * self.head_dim * torch.empty((), dtype=dtype).element_size()


@dataclass(frozen=True)
class LayerWeights:
    attn_norm: torch.Tensor  # [hidden]
    qkv: torch.Tensor  # [(H + 2 * KVH) * D, hidden]: q, k and v projections stacked by rows
    o: torch.Tensor  # [hidden, H * D]
    mlp_norm: torch.Tensor  # [hidden]
    gate_up: torch.Tensor  # [2 * intermediate, hidden]: gate and up projections stacked by rows
    down: torch.Tensor  # [hidden, intermediate]


@dataclass(frozen=True)
class MistralWeights:
    shape: ModelShape
    embed: torch.Tensor  # [V, hidden]
    layers: tuple[LayerWeights, ...]
    norm: torch.Tensor  # [hidden]
    lm_head: torch.Tensor  # [V, hidden]
    inv_freq: torch.Tensor  # float32 [D / 2]: the rotary frequencies transformers itself uses
    rope_scale: float  # transformers' `attention_scaling` (1.0 for the default rope)
    # [V rounded up to VOCAB_MULTIPLE, hidden], zero rows past V; `lm_head` is a view of it
    # (see `pad_lm_head`). The same tensor when V is already a multiple.
    lm_head_padded: torch.Tensor | None = None

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.dtype

    @property
    def device(self) -> torch.device:
        return self.embed.device


def restack_layer(layer) -> tuple[torch.Tensor, torch.Tensor]:
    """A decoder layer's q/k/v and gate/up weights, each stacked by rows in one tensor, with the
    linears' weights re-pointed to their slices: one matrix product where there were several (at
    batch 1 the small k and v products are mostly launch and tail) and no second copy. The model
    computes exactly as before; a second call (a second engine on the same model) reuses the first's.

    On CUDA the layer's projection weights all go through host memory first: copied out, freed,
    then allocated again, the stacked ones and o and down alike, largest first. transformers loads
    a model into one reserved block, so stacking in place (a new stacked copy, then the parts
    freed) would leave holes between live weights that a KV cache allocated whole cannot use;
    allocated again into the memory they freed, the layer's weights fill its own holes.
    """
    attn, mlp = layer.self_attn, layer.mlp
    qkv_parts, gate_up_parts = [attn.q_proj, attn.k_proj, attn.v_proj], [mlp.gate_proj, mlp.up_proj]
    qkv, gate_up = getattr(attn, "orca_qkv", None), getattr(mlp, "orca_gate_up", None)
    if (
        qkv is not None
        and gate_up is not None
        and _views_of(qkv, qkv_parts)
        and _views_of(gate_up, gate_up_parts)
    ):
        return qkv, gate_up
    groups = {"gate_up": gate_up_parts, "qkv": qkv_parts}
    through_host = restack_through_host(attn.q_proj.weight.device)
    if through_host:  # largest first, each into room the layer itself freed
        groups = {"gate_up": gate_up_parts, "down": [mlp.down_proj], "qkv": qkv_parts, "o": [attn.o_proj]}
    stacked = restack(groups, through_host)
    object.__setattr__(attn, "orca_qkv", stacked["qkv"])  # plain attributes: not parameters or buffers
    object.__setattr__(mlp, "orca_gate_up", stacked["gate_up"])
    return stacked["qkv"], stacked["gate_up"]


def restack_through_host(device: torch.device) -> bool:
    return device.type == "cuda"


def _restack_through_host(groups: dict[str, list[torch.nn.Linear]]) -> dict[str, torch.Tensor]:
    """Copy every group out, free it on the device, allocate it again stacked. If the device
    refuses an allocation (a tight or fragmented GPU), the layer gets its weights back as they
    were, so the model still runs (the reference engine, the self-check) and the error says why."""
    device = next(iter(groups.values()))[0].weight.device
    on_host = {
        name: [linear.weight.detach().to("cpu", copy=True) for linear in group]
        for name, group in groups.items()
    }
    for group in groups.values():
        for linear in group:
            linear.weight.data = linear.weight.data.new_empty(0)  # frees its memory
    stacked: dict[str, torch.Tensor] = {}
    try:
        for name, parts in on_host.items():
            stacked[name] = torch.cat(parts).to(device)
    except BaseException:
        stacked.clear()
        for name, group in groups.items():
            for linear, part in zip(group, on_host[name]):
                linear.weight.data = part.to(device)
        raise
    return stacked


def restack(groups: dict[str, list[torch.nn.Linear]], through_host: bool) -> dict[str, torch.Tensor]:
    """Each group's weights stacked by rows, every linear re-pointed to its slice."""
    with torch.no_grad():
        if through_host:
            stacked = _restack_through_host(groups)
        else:
            stacked = {name: torch.cat([linear.weight for linear in group]) for name, group in groups.items()}
        for name, group in groups.items():
            start = 0
            for linear in group:
                rows = linear.out_features
                linear.weight.data = stacked[name][start : start + rows]
                start += rows
    return stacked


def _views_of(stacked: torch.Tensor, linears: list[torch.nn.Linear]) -> bool:
    """Whether every linear's weight is still its slice of `stacked` (none replaced since)."""
    start = 0
    for linear in linears:
        if linear.weight.data_ptr() != stacked[start:].data_ptr():
            return False
        start += linear.weight.shape[0]
    return start == stacked.shape[0]


def layer_weights(layer) -> LayerWeights:
    qkv, gate_up = restack_layer(layer)  # first: through the host it re-allocates o and down too
    return LayerWeights(
        attn_norm=layer.input_layernorm.weight,
        qkv=qkv,
        o=layer.self_attn.o_proj.weight,
        mlp_norm=layer.post_attention_layernorm.weight,
        gate_up=gate_up,
        down=layer.mlp.down_proj.weight,
    )


def pad_lm_head(model) -> torch.Tensor:
    """The output projection with zero rows up to a multiple of `VOCAB_MULTIPLE`; the model's own
    weight becomes a view of its first V rows (it computes exactly as before, and no second copy
    stays: on CUDA the weight goes through the host, as `restack_layer` does). A tied head (the
    embedding's weight) is left as it is. A second call returns the first's."""
    linear = model.lm_head
    weight = linear.weight
    padded = getattr(linear, "orca_padded", None)
    if padded is not None and padded.data_ptr() == weight.data_ptr():
        return padded
    vocab, hidden = weight.shape
    rows = -(-vocab // VOCAB_MULTIPLE) * VOCAB_MULTIPLE
    if rows == vocab or weight is model.model.embed_tokens.weight:
        return weight
    with torch.no_grad():
        through_host = restack_through_host(weight.device)
        source = weight.detach().to("cpu", copy=True) if through_host else weight.detach()
        if through_host:
            linear.weight.data = weight.data.new_empty(0)  # frees its memory for the padded copy
        padded = torch.zeros(rows, hidden, dtype=source.dtype, device=weight.device)
        padded[:vocab] = source
        linear.weight.data = padded[:vocab]
    object.__setattr__(linear, "orca_padded", padded)  # a plain attribute: not a parameter
    return padded


def weights_from_hf(model) -> MistralWeights:
    """The weights of a loaded `MistralForCausalLM`, without copies; raises ValueError for what we
    can't run. The q/k/v and gate/up projections are stacked (see `restack_layer`), so the model's
    own weights become views of the stacked tensors."""
    config = model.config
    if getattr(config, "hidden_act", "silu") != "silu":
        raise ValueError(f"model hidden_act must be 'silu', got {config.hidden_act!r}")
    rotary = model.model.rotary_emb
    if getattr(rotary, "rope_type", "default") in DYNAMIC_ROPE_TYPES:
        raise ValueError(f"model rope_type {rotary.rope_type!r} changes with length; not supported")
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    shape = ModelShape(
        layers=config.num_hidden_layers,
        heads=heads,
        kv_heads=kv_heads,
        head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads,
        vocab=config.vocab_size,
        sliding_window=getattr(config, "sliding_window", None),
        eps=config.rms_norm_eps,
    )
    layers = tuple(layer_weights(layer) for layer in model.model.layers)
    lm_head_padded = pad_lm_head(model)
    return MistralWeights(
        shape=shape,
        embed=model.model.embed_tokens.weight,
        layers=layers,
        norm=model.model.norm.weight,
        lm_head=model.lm_head.weight,
        lm_head_padded=lm_head_padded,
        inv_freq=rotary.inv_freq.detach().float(),
        rope_scale=float(getattr(rotary, "attention_scaling", 1.0)),
    )
