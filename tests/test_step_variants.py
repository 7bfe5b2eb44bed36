"""Every decode-step variant (`step_options.py`) computes today's step: the same logits as
`mistral.decode` on a wrapped ring with riding-along rows, and in the engine the same greedy
tokens as transformers' `generate` (ring wrapped, prompts arriving together, a kept prefix
continued). The fused ones run fewer ops per step; the choice is read from the defaults file."""

from __future__ import annotations

import json
import sys

import pytest
import torch

from orca_space.engines import decode_step, hf_weights, kv_cache, mistral, step_options
from orca_space.engines.batched import BatchedEngine
from orca_space.engines.selfcheck import TOLERANCES
from orca_space.engines.step_options import BASELINE, FUSED, StepOptions
from orca_space.params import SamplingParams
from tests.helpers import ROOT

VARIANTS = {
    "today": BASELINE,
    "fused": FUSED,
    "additive": StepOptions(mask="additive", norm="fused", rope="fused"),
    "split_kv": StepOptions(mask="additive", norm="fused", rope="fused", split_kv_up_to=64),
    "split_kv_unfused": StepOptions(split_kv_up_to=64),
    "padded_vocab": StepOptions(mask="additive", norm="fused", rope="fused", pad_vocab=True),
}


def ring_model(window: int = 8):
    from orca_space.tiny import build_model

    model = build_model().eval()
    model.config.sliding_window = window
    return model


@pytest.mark.parametrize("name", [name for name in VARIANTS if name != "today"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_each_variant_computes_todays_logits_on_a_wrapped_ring(name, dtype):
    weights = hf_weights.weights_from_hf(ring_model().to(dtype))
    slots, cache_len = 4, 14  # window 8 + chunk 6: positions past 14 have wrapped
    torch.manual_seed(1)
    with torch.inference_mode():
        cache = kv_cache.allocate_kv_cache(weights.shape, slots, cache_len, dtype, "cpu")
        cache.k.normal_(), cache.v.normal_()
        tokens, positions = (
            torch.tensor([5, 600, 7000, 31999]),
            torch.tensor([3, 40, -1, 13]),
        )  # -1 rides along
        before, results = cache.k.clone(), []
        for run in (mistral.decode, lambda *a: decode_step.fused_decode.decode(*a, VARIANTS[name])):
            k, v = cache.k.clone(), cache.v.clone()
            results.append((run(weights, cache, tokens, positions, cache_len).float(), cache.k.clone()))
            cache.k.copy_(k), cache.v.copy_(v)
    (today, today_k), (variant, variant_k) = results
    live = [0, 1, 3]
    tolerance = TOLERANCES[dtype]
    allowed = tolerance.atol + tolerance.rtol * float(today[live].abs().max())
    assert float((variant[live] - today[live]).abs().max()) <= (1e-4 if dtype == torch.float32 else allowed)
    assert torch.allclose(variant_k.float(), today_k.float(), atol=1e-2), "the same keys in the same entries"
    ring = slice(0, cache_len)  # a riding-along row writes past the ring's end, never inside it
    assert torch.equal(variant_k[:, 2, :, ring], before[:, 2, :, ring]), "its ring stays as it was"


def greedy_reference(model, prompt: list[int], new_tokens: int) -> list[int]:
    out = model.generate(
        torch.tensor([prompt]), do_sample=False, max_new_tokens=new_tokens, eos_token_id=None
    )
    return out[0, len(prompt) :].tolist()


def prompt_of(length: int, offset: int = 0) -> list[int]:
    return [(7 * i + 13 * length + offset) % 31000 + 100 for i in range(length)]


@pytest.fixture(scope="module")
def ring_case():
    """A window of 16 in a ring of 24: prompts and replies wrap it many times."""
    model = ring_model(window=16)
    prompts = [prompt_of(n) for n in (3, 40, 150)]
    return model, prompts, [greedy_reference(model, p, 20) for p in prompts]


@pytest.mark.parametrize("name", ["fused", "additive", "split_kv"])  # today's: tests/test_batching.py
def test_each_variant_in_the_engine_equals_generate(ring_case, name):
    model, prompts, references = ring_case
    engine = BatchedEngine(model, (), context_length=1024, slots=4, chunk_size=8, step_options=VARIANTS[name])
    params = SamplingParams(max_new_tokens=20, temperature=0.0, repetition_penalty=1.0)
    try:
        assert engine.wait_ready(30) and engine.cache_len == 24 and engine.step_options == VARIANTS[name]
        with engine._wakeup:  # they arrive together: packed prefills, shared decode steps
            handles = [engine.submit(p, params, cache_scope="a") for p in prompts]
        replies = [[e.token for e in h if e.token is not None] for h in handles]
        assert replies == references
        # The next turn of the longest: continued from its kept cache, the ring wrapped again.
        follow_up = prompts[2] + replies[2] + prompt_of(20, offset=3)
        reused_before = engine.stats().prompt_tokens_reused
        reply = [e.token for e in engine.submit(follow_up, params, cache_scope="a") if e.token is not None]
        assert engine.stats().prompt_tokens_reused > reused_before, "a kept prefix was continued"
        assert reply == greedy_reference(model, follow_up, 20)
    finally:
        engine.close()


def test_the_fused_step_runs_fewer_ops_than_todays():
    sys.path.insert(0, str(ROOT / "bench"))
    from op_count import count_aten_ops

    weights = hf_weights.weights_from_hf(ring_model().to(torch.float16))
    with torch.inference_mode():
        cache = kv_cache.allocate_kv_cache(weights.shape, 2, 256, weights.dtype, "cpu")
        buffers = decode_step.DecodeBuffers.allocate(2, weights.shape.vocab, "cpu", weights.dtype)
        counts = {
            name: count_aten_ops(
                lambda: decode_step.decode_and_sample(weights, cache, buffers, 2, 256, options=VARIANTS[name])
            )[0]
            for name in ("today", "fused")
        }
    layers = weights.shape.layers
    # Per layer: the norms' upcast, downcast and weight multiply (3 x 2) and rope's second tensor.
    assert counts["today"] - counts["fused"] >= 8 * layers, counts


def test_the_engine_reads_its_variant_from_the_defaults_file(tmp_path):
    path = tmp_path / "defaults.json"
    choice = StepOptions(mask="additive", norm="fused", rope="fused", split_kv_up_to=8)
    step_options.write_defaults(path, "cuda", choice, {"decided_by": "a test"})
    step_options.write_defaults(path, "cpu", BASELINE, {"decided_by": "a test"})
    assert step_options.defaults_for("cuda", path) == choice
    assert step_options.defaults_for("cpu", path) == BASELINE
    assert json.loads(path.read_text())["evidence"]["cuda"] == {"decided_by": "a test"}
    assert step_options.defaults_for("cuda", tmp_path / "missing.json") == FUSED, "no file: the safe fusions"
    shipped = step_options.defaults_for("cuda")
    assert shipped.norm == "fused" and step_options.defaults_for("cpu").mask == "bool"
    with pytest.raises(ValueError, match="step option mask must be one of bool, additive, got 'float'"):
        StepOptions.from_dict({"mask": "float"})
    with pytest.raises(ValueError, match="unknown step options: fast"):
        StepOptions.from_dict({"fast": True})


def test_the_fused_step_compiles_as_one_graph():
    """What the compiled rung runs (`--engine compiled`): a graph break would only show on the GPU.
    Dynamo finds the breaks; Inductor's C++ build (minutes on this CPU) adds nothing to that."""
    weights = hf_weights.weights_from_hf(ring_model())
    options = VARIANTS["split_kv"]
    with torch.inference_mode():
        cache = kv_cache.allocate_kv_cache(weights.shape, 2, 14, torch.float32, "cpu")
        cache.k.normal_(), cache.v.normal_()
        buffers = decode_step.DecodeBuffers.allocate(2, weights.shape.vocab, "cpu")
        buffers.positions.copy_(torch.tensor([3, 30]))
        compiled = torch.compile(decode_step.decode_and_sample, fullgraph=True, dynamic=True, backend="eager")
        logits = []
        for step in (decode_step.decode_and_sample, compiled):
            k, v = cache.k.clone(), cache.v.clone()
            step(weights, cache, buffers, 2, 14, keep_logits=True, options=options)
            logits.append(buffers.logits.clone())
            cache.k.copy_(k), cache.v.copy_(v)
    assert torch.allclose(logits[0], logits[1], atol=1e-4)


def test_the_padded_output_projection_changes_nothing_and_copies_nothing():
    from orca_space.tiny import build_model

    model = build_model().eval()
    ids = torch.tensor([[5, 600, 7000, 31999]])
    with torch.no_grad():
        before = model(ids).logits
        weights = hf_weights.weights_from_hf(model)
        padded = weights.lm_head_padded
        assert padded.shape == (32064, weights.embed.shape[1]) and not padded[32002:].any(), "zero rows to 64"
        assert model.lm_head.weight.data_ptr() == padded.data_ptr(), "the model's weight is a view of it"
        assert torch.equal(model(ids).logits, before), "the model computes as before"
    assert hf_weights.weights_from_hf(model).lm_head_padded is padded, "a second engine reuses it"
