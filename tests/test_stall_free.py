"""Stall-free batching (issue 31): packed prefill equals the model, and the engine's token budget
keeps short chats and running streams moving while a long prompt goes in.

Steps are counted, not timed: the engine's loop iterations are numbered, and every token it
accepts is logged with the iteration it came in.
"""

from __future__ import annotations

import pytest
import torch

from orca_space.engines import decode_step, hf_weights, kv_cache, mistral, packed
from orca_space.engines.batched import BatchedEngine
from orca_space.engines.sampling import sample_next_tokens
from orca_space.params import SamplingParams
from tests.test_batching import greedy_reference, make_prompt, tokens_of
from tests.test_prefix_reuse import greedy_reference as masked_reference  # prompts holding <|im_end|>

STALL_FREE = ("budget", "mixed")


def ring_model(window: int = 16):
    from orca_space.tiny import build_model

    model = build_model().eval()
    model.config.sliding_window = window
    return model


def greedy(new_tokens: int) -> SamplingParams:
    return SamplingParams(max_new_tokens=new_tokens, temperature=0.0, repetition_penalty=1.0)


# -- the packed forward against transformers --


def test_packed_prefill_matches_transformers_logits_with_a_wrapping_ring():
    """Three prompts of different lengths in slots 2, 0 and 3, prefilled together over three
    rounds of unequal chunks (no padding), the 14-entry ring wrapping, stale keys in the cache;
    in the last round two decode rows ride in the same forward (the mixed step)."""
    model = ring_model(window=8)
    weights = hf_weights.weights_from_hf(model)
    a, b, c = make_prompt(19), make_prompt(17, offset=5), make_prompt(4, offset=9)
    with torch.no_grad():
        expected = [model(torch.tensor([p])).logits[0] for p in (a, b, c)]
        cache = kv_cache.allocate_kv_cache(weights.shape, 4, 14, torch.float32, "cpu")
        cache.k.normal_(), cache.v.normal_()
        rounds = [((0, 6), (0, 4), (0, 1)), ((6, 12), (4, 9), (1, 3)), ((12, 17), (9, 15), (3, 4))]
        for spans in rounds:
            chunks = [
                mistral.PromptChunk(slot, start, prompt[start:end])
                for slot, prompt, (start, end) in zip((2, 0, 3), (a, b, c), spans)
            ]
            logits, none = packed.prefill(weights, cache, chunks)
            assert none is None
            for row, (prompt_logits, (_, end)) in enumerate(zip(expected, spans)):
                assert torch.allclose(logits[row], prompt_logits[end - 1], atol=1e-4), (row, spans)
        # slots 0 and 2 decode (b and a) while slot 3's prompt c... is done; slot 1 rides along
        tokens, positions = torch.tensor([b[15], 9, a[17]]), torch.tensor([15, -1, 17])
        rows = packed.DecodeRows(tokens, positions, 14)
        c_more = make_prompt(6, offset=11)
        logits, decoded = packed.prefill(
            weights, cache, [mistral.PromptChunk(3, 4, c_more)], decode_rows=rows
        )
        expected_c = model(torch.tensor([c + c_more])).logits[0]
    assert torch.allclose(logits[0], expected_c[-1], atol=1e-4), "the prompt row of a mixed step"
    assert torch.allclose(decoded[0], expected[1][15], atol=1e-4), "decode row b"
    assert torch.allclose(decoded[2], expected[0][17], atol=1e-4), "decode row a"


def test_a_chunk_longer_than_the_ring_allows_is_refused():
    weights = hf_weights.weights_from_hf(ring_model(window=8))
    cache = kv_cache.allocate_kv_cache(weights.shape, 1, 14, torch.float32, "cpu")
    with pytest.raises(ValueError, match="does not fit this cache"):
        packed.prefill(weights, cache, [mistral.PromptChunk(0, 10, make_prompt(7))])


def test_mixed_step_samples_decode_rows_as_the_decode_step_does():
    """Same logits, same buffers: the same tokens and the same `seen` rows, sampled or greedy."""
    vocab = 50
    logits = torch.randn(3, vocab, generator=torch.Generator().manual_seed(0))
    params = [
        SamplingParams(temperature=0.9, top_k=10, seed=3),
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=1.2, top_p=0.8, seed=4),
    ]
    buffers = [decode_step.DecodeBuffers.allocate(3, vocab, "cpu") for _ in range(2)]
    for b in buffers:
        for row, p in enumerate(params):
            b.set_request(row, p)
        b.positions[:] = torch.tensor([5, 9, 12])
    tokens = packed.sample_decode_rows(buffers[0], logits, 3, keep_logits=True)
    b = buffers[1]
    chosen = sample_next_tokens(
        logits, b.sampling_rows(slice(0, 3)), b.seen[:3], b.seeds[:3], b.positions[:3]
    )
    assert tokens == chosen.tolist()
    assert buffers[0].seen[torch.arange(3), chosen].all() and torch.equal(buffers[0].logits, logits)
    assert buffers[0].counts[torch.arange(3), chosen].eq(1).all(), "the reply penalties count the token"


# -- the engine's loop, step by step --


class StepLog:
    """Numbers the engine's iterations and logs (iteration, request id) for every accepted token."""

    def __init__(self, engine: BatchedEngine, monkeypatch) -> None:
        self.step, self.tokens = 0, []
        real_iteration, real_accept = engine._iteration, engine._accept

        def iteration():
            self.step += 1
            real_iteration()

        def accept(slot, token, *rest):
            self.tokens.append((self.step, slot.handle.id))
            real_accept(slot, token, *rest)

        monkeypatch.setattr(engine, "_iteration", iteration)
        monkeypatch.setattr(engine, "_accept", accept)

    def steps_of(self, handle) -> list[int]:
        return [step for step, request in self.tokens if request == handle.id]


@pytest.fixture()
def ring_engine(make_engine):
    def build(model, **options) -> BatchedEngine:
        return make_engine(model, **{"context_length": 1024, "slots": 4, "chunk_size": 16, **options})

    return build


def submit_during_prefill(
    engine: BatchedEngine, monkeypatch, log: StepLog, chunks_before: int, prompt, params
):
    """Submit `prompt` from inside the engine's loop once `chunks_before` prefill forwards of the
    long prompt ran: it arrives mid-prefill, whatever the machine's speed. -> (handle, step)."""
    arrived = {}
    forward = engine._prefill_forward if engine.policy != "mixed" else None
    seen = []

    def on_step():
        seen.append(log.step)
        if len(seen) == chunks_before and "handle" not in arrived:
            arrived["handle"], arrived["step"] = engine.submit(prompt, params), log.step

    if forward is not None:

        def counted(rows):
            out = forward(rows)
            on_step()
            return out

        monkeypatch.setattr(engine, "_prefill_forward", counted)
    else:
        mixed = engine._mixed_step

        def counted_mixed(rows):
            mixed(rows)
            on_step()

        monkeypatch.setattr(engine, "_mixed_step", counted_mixed)
    return arrived


@pytest.mark.parametrize("policy", STALL_FREE)
def test_short_chat_and_running_stream_keep_moving_during_a_long_prefill(ring_engine, monkeypatch, policy):
    """A stream is running when a 300-token prompt arrives (19 steps of a 16-token budget); a
    5-token prompt arrives after its third chunk. The stream gets a token in every step, the
    short prompt its first token in the step after it arrived, and every reply equals `generate`
    (the ring of 32 entries wraps in the long prompt and in the stream)."""
    model = ring_model()
    stream_prompt, long_prompt, short_prompt = make_prompt(20), make_prompt(300, 1), make_prompt(5, 2)
    engine = ring_engine(model, policy=policy, prompt_chunk=16)
    log = StepLog(engine, monkeypatch)
    stream = engine.submit(stream_prompt, greedy(60))
    first = next(iter(stream))
    short = submit_during_prefill(engine, monkeypatch, log, 3, short_prompt, greedy(8))
    arrival = log.step  # read off the engine's thread: at most one step early
    long = engine.submit(long_prompt, greedy(8))
    long_tokens, stream_tokens = tokens_of(long), [first.token, *tokens_of(stream)]
    short_tokens = tokens_of(short["handle"])
    stream_steps, long_steps = log.steps_of(stream), log.steps_of(long)
    short_steps = log.steps_of(short["handle"])
    assert short_steps[0] <= short["step"] + 1, "the short chat does not wait for the long prompt"
    assert short_steps[0] < long_steps[0]
    during = range(stream_steps[0], long_steps[0] + 1)
    assert all(step in stream_steps for step in during), "the stream decodes in every step"
    assert long_steps[0] - arrival <= -(-300 // 3) + 1, "the long prompt gets a quarter of the room at least"
    assert stream_tokens == greedy_reference(model, stream_prompt, 60)
    assert long_tokens == greedy_reference(model, long_prompt, 8)
    assert short_tokens == greedy_reference(model, short_prompt, 8)


@pytest.mark.parametrize("policy", STALL_FREE)
def test_packed_prefill_from_kept_prefixes_on_a_wrapped_ring_equals_generate(ring_engine, policy):
    """A conversation's next turn starts from its kept cache (its ring wrapped) while a long
    prompt and a short one go in beside it, and while another stream decodes."""
    model = ring_model()
    engine = ring_engine(model, policy=policy)
    first = make_prompt(45, 3)
    reply = tokens_of(engine.submit(first, greedy(10), cache_scope="alice"))
    assert reply == greedy_reference(model, first, 10)
    turn = first + reply + [32000, 13] + make_prompt(12, 4)
    others = [make_prompt(120, 5), make_prompt(3, 6)]
    running = engine.submit(make_prompt(30, 7), greedy(40))
    next(iter(running))
    with engine._wakeup:
        handles = [engine.submit(turn, greedy(10), cache_scope="alice")]
        handles += [engine.submit(p, greedy(10)) for p in others]
    assert [tokens_of(h) for h in handles] == [masked_reference(model, p, 10) for p in [turn, *others]]
    assert engine.stats().prompt_tokens_reused == len(first) + 10 - 1, "the turn reused its kept cache"
    running.cancel()


def test_an_unknown_policy_is_refused_by_name(tiny_model):
    with pytest.raises(ValueError, match="policy must be one of budget, mixed, fcfs"):
        BatchedEngine(tiny_model, (), 256, slots=1, policy="sjf")
