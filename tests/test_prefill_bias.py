"""On CUDA a prefill's mask becomes an additive bias once per forward (`mistral.prefill_bias`),
not once per layer inside SDPA: the same numbers, checked here by building it on the CPU too."""

from __future__ import annotations

import pytest
import torch

from orca_space.engines import hf_weights, kv_cache, mistral, packed
from tests.test_batching import make_prompt


def prefill_both_ways(weights, monkeypatch, devices, run) -> torch.Tensor:
    monkeypatch.setattr(mistral, "PREFILL_BIAS_DEVICES", devices)
    torch.manual_seed(0)
    cache = kv_cache.allocate_kv_cache(weights.shape, 3, 24, torch.float32, "cpu")
    cache.k.normal_(), cache.v.normal_()  # stale keys must stay unseen either way
    with torch.no_grad():
        return torch.cat([run(weights, cache, start) for start in range(0, 40, 8)])


@pytest.mark.parametrize("forward", ["packed", "padded"])
def test_prefill_bias_gives_the_boolean_masks_logits(monkeypatch, forward):
    from orca_space.tiny import build_model

    model = build_model().eval()
    model.config.sliding_window = 16  # cache of 24 entries: the ring wraps
    weights = hf_weights.weights_from_hf(model)
    prompts = [make_prompt(40), make_prompt(40, offset=5)]

    def run(weights, cache, start):
        chunks = [mistral.PromptChunk(slot, start, p[start : start + 8]) for slot, p in zip((0, 2), prompts)]
        if forward == "packed":
            return packed.prefill(weights, cache, chunks)[0]
        return mistral.prefill(weights, cache, chunks)

    built: list[torch.dtype] = []
    real_bias = mistral.prefill_bias

    def bias(mask, dtype):
        result = real_bias(mask, dtype)
        built.append(result.dtype)
        return result

    monkeypatch.setattr(mistral, "prefill_bias", bias)
    monkeypatch.setattr(packed, "prefill_bias", bias)
    boolean = prefill_both_ways(weights, monkeypatch, ("cuda",), run)
    assert set(built) == {torch.bool}, "the CPU keeps the boolean mask"
    built.clear()
    additive = prefill_both_ways(weights, monkeypatch, ("cuda", "cpu"), run)
    assert set(built) == {torch.float32}, "the bias, in the model's dtype"
    per_forward = 2 if forward == "packed" else 1  # a chunk's own mask, or the padded batch's
    assert len(built) == 5 * per_forward, "built once per forward, not once per layer"
    assert torch.equal(boolean, additive)
