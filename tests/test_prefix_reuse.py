"""The batched engine starts a request from what an earlier one of the same visitor left in the KV
cache: the next turn, a retry, an edit, a continue, a retry after a stop. Each reply must be what
prefilling the whole prompt gives (transformers' `generate`, token for token), and the engine's
counters must show that the reuse happened, or that it did not where it must not.
"""

from __future__ import annotations

import pytest
import torch

from orca_space.engines.batched import BatchedEngine
from orca_space.params import SamplingParams
from tests.test_batching import make_prompt, tokens_of

NEW = 12
GREEDY = SamplingParams(max_new_tokens=NEW, temperature=0.0, repetition_penalty=1.0)


def greedy(new_tokens: int) -> SamplingParams:
    return SamplingParams(max_new_tokens=new_tokens, temperature=0.0, repetition_penalty=1.0)


def greedy_reference(model, prompt: list[int], new_tokens: int) -> list[int]:
    """`generate` over the whole prompt. The attention mask is explicit: left to itself,
    `generate` would mask the prompt's <|im_end|> as padding (the tiny model's pad token)."""
    ids = torch.tensor([prompt])
    out = model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        do_sample=False,
        max_new_tokens=new_tokens,
        eos_token_id=None,
    )
    return out[0, len(prompt) :].tolist()


END_OF_TURN = [32000, 13]  # <|im_end|>\n, as a next turn's prompt has after the reply


@pytest.fixture()
def engine_for(make_engine):
    def build(model=None, **options) -> BatchedEngine:
        return make_engine(model, **{"context_length": 1024, "slots": 4, "chunk_size": 64, **options})

    return build


def reused(engine: BatchedEngine) -> int:
    return engine.stats().prompt_tokens_reused


def ask(engine, model, prompt, scope="alice", params=GREEDY) -> list[int]:
    """One greedy request, checked against `generate` over its whole prompt; its tokens."""
    got = tokens_of(engine.submit(prompt, params, cache_scope=scope))
    assert got == greedy_reference(model, prompt, params.max_new_tokens), "equal to a full prefill"
    return got


def stopped_after_two_chunks(engine: BatchedEngine, monkeypatch, prompt: list[int], scope: str) -> None:
    """Send `prompt` and stop it while it is going in, once two of its chunks went through the model."""
    real_forward, chunks = engine._prefill_forward, []

    def forward_then_stop(rows):
        chunks.append(rows[0][1])
        if len(chunks) == 2:
            rows[0][0].handle.cancel()
        return real_forward(rows)

    monkeypatch.setattr(engine, "_prefill_forward", forward_then_stop)
    partial = engine.submit(prompt, GREEDY, cache_scope=scope)
    assert list(partial)[-1].finish_reason == "cancelled"
    monkeypatch.setattr(engine, "_prefill_forward", real_forward)


def test_next_turn_retry_edit_and_continue_start_from_the_kept_cache(engine_for, tiny_model):
    engine = engine_for()
    first = make_prompt(150)
    reply = ask(engine, tiny_model, first)
    assert reused(engine) == 0 and engine.stats().kept_caches == 1
    # The next turn: the prompt and every reply token but the last (whose keys were never
    # written) come from the cache.
    turn = first + reply + END_OF_TURN + make_prompt(30, 1)
    second = ask(engine, tiny_model, turn)
    assert reused(engine) == len(first) + NEW - 1
    before = reused(engine)
    ask(engine, tiny_model, turn + second)  # a continue of the second reply: no end of turn
    assert reused(engine) - before == len(turn) + NEW - 1
    before = reused(engine)
    ask(engine, tiny_model, turn)  # a retry: all but the last prompt token
    assert reused(engine) - before == len(turn) - 1
    before = reused(engine)
    edited = turn[:160] + make_prompt(20, 2)  # an edit of the last message
    ask(engine, tiny_model, edited)
    assert reused(engine) - before == 160
    stats = engine.stats()
    assert stats.prompt_tokens_prefilled + stats.prompt_tokens_reused == sum(
        map(len, (first, turn, turn + second, turn, edited))
    )


def test_a_stopped_reply_leaves_its_cache_for_the_retry(engine_for, tiny_model, monkeypatch):
    engine = engine_for(chunk_size=32, prompt_chunk=32)
    prompt = make_prompt(200)
    running = engine.submit(prompt, greedy(500), cache_scope="alice")
    for count, event in enumerate(running, start=1):
        if count == 5:
            running.cancel()
            break
    assert list(running)[-1].finish_reason == "cancelled"
    ask(engine, tiny_model, prompt)
    assert reused(engine) == len(prompt) - 1
    # Stopped while its prompt was still going in: the two chunks already in are kept.
    long = make_prompt(300, 7)
    stopped_after_two_chunks(engine, monkeypatch, long, scope="bob")
    before = reused(engine)
    ask(engine, tiny_model, long, scope="bob")
    assert reused(engine) - before == 64, "the whole chunks prefilled before the stop"


def test_visitors_do_not_reuse_each_other_unless_the_space_shares(engine_for, tiny_model):
    prompt = make_prompt(120)
    private = engine_for()
    ask(private, tiny_model, prompt, scope="alice")
    ask(private, tiny_model, prompt, scope="bob")
    ask(private, tiny_model, prompt, scope=None)
    assert reused(private) == 0, "by default a cache answers only its own visitor"
    ask(private, tiny_model, prompt, scope="alice")
    assert reused(private) == len(prompt) - 1
    shared = engine_for(prefix_cache="shared")
    ask(shared, tiny_model, prompt, scope="alice")
    ask(shared, tiny_model, prompt, scope="bob")
    assert reused(shared) == len(prompt) - 1, "shared: any visitor's prefix"
    off = engine_for(prefix_cache="off")
    ask(off, tiny_model, prompt)
    ask(off, tiny_model, prompt)
    assert reused(off) == 0 and off.stats().kept_caches == 0


def test_under_pressure_the_least_recently_used_cache_goes(engine_for, tiny_model):
    engine = engine_for(slots=2)
    prompts = {name: make_prompt(80, offset) for offset, name in enumerate(("alice", "bob", "carol"))}
    for name in ("alice", "bob", "carol"):  # two slots: carol's request evicts alice's cache
        ask(engine, tiny_model, prompts[name], scope=name)
    assert engine.stats().kept_caches == 2
    ask(engine, tiny_model, prompts["bob"], scope="bob")
    assert reused(engine) == 79, "bob's cache survived"
    ask(engine, tiny_model, prompts["alice"], scope="alice")
    assert reused(engine) == 79, "alice's, the oldest, was evicted"
    ask(engine, tiny_model, prompts["bob"], scope="bob")
    assert reused(engine) == 2 * 79, "carol's went for alice's request, bob's stayed"


def test_a_ring_that_wrapped_reuses_what_it_still_holds():
    from orca_space.tiny import build_model

    model = build_model().eval()
    model.config.sliding_window = 16
    engine = BatchedEngine(model, (), context_length=400, slots=3, chunk_size=16)
    try:
        assert engine.wait_ready(30) and engine.cache_len == 32
        prompt = make_prompt(70)
        reply = ask(engine, model, prompt)
        turn = prompt + reply + END_OF_TURN + make_prompt(9, 3)
        ask(engine, model, turn)
        assert reused(engine) == len(prompt) + NEW - 1, "the next turn sees only recent positions"
        ask(engine, model, prompt[:30] + make_prompt(10, 4))  # positions 0-29 were overwritten
        assert reused(engine) == len(prompt) + NEW - 1, "an edit far back prefills it all"
    finally:
        engine.close()


def test_live_requests_move_down_and_kept_caches_never_widen_a_step(engine_for, tiny_model, monkeypatch):
    """Eight slots: six short requests end and keep their caches while two long ones, admitted
    into the top rows, go on. The long ones move down to rows 0 and 1 (their caches copied
    mid-reply, still equal to `generate`), and every later step covers two rows, not eight."""
    engine = engine_for(slots=8)
    batches, real_step = [], engine.eager_step

    def step(batch, *args):
        batches.append((batch, sum(s is not None for s in engine._slots)))
        return real_step(batch, *args)

    monkeypatch.setattr(engine, "eager_step", step)
    short, long = greedy(2), greedy(40)
    prompts = [make_prompt(30, offset) for offset in range(8)]
    with engine._wakeup:
        handles = [engine.submit(p, short, cache_scope=f"v{i}") for i, p in enumerate(prompts[:6])]
        handles += [engine.submit(p, long, cache_scope="w") for p in prompts[6:]]
    outputs = [tokens_of(h) for h in handles]
    for prompt, output, params in zip(prompts, outputs, [short] * 6 + [long] * 2):
        assert output == greedy_reference(tiny_model, prompt, params.max_new_tokens)
    assert engine.stats().kept_caches == 8
    two_live = [batch for batch, live in batches if live == 2]
    assert two_live and set(two_live) == {2}, "two live requests, two rows, beside six kept caches"


def test_a_kept_cache_riding_along_in_padded_steps_stays_intact(engine_for, tiny_model):
    """On CUDA graphs a step is padded to a captured batch size: three decoding rows run as four,
    and the fourth holds a kept cache. Its entries must come through unchanged."""
    engine = engine_for(slots=4)
    engine.pad_batches = True  # batch sizes 1, 2, 4
    kept_prompt = make_prompt(100, 9)
    with engine._wakeup:
        runners = [engine.submit(make_prompt(20, i), greedy(60)) for i in range(3)]
        kept = engine.submit(kept_prompt, greedy(1), cache_scope="alice")
    list(kept)
    for runner in runners:  # 59 more steps of batch 4, the kept cache's row riding along
        list(runner)
    ask(engine, tiny_model, kept_prompt + [5, 6, 7])
    assert reused(engine) == len(kept_prompt)


def test_reuse_with_a_repetition_penalty_counts_the_whole_prompt(engine_for, tiny_model):
    """The penalty's `seen` tokens come from the whole prompt, not only the part prefilled."""
    engine = engine_for()
    prompt = make_prompt(3) + greedy_reference(tiny_model, make_prompt(3), 8)
    penalised = SamplingParams(max_new_tokens=16, temperature=0.0, repetition_penalty=1.3)
    tokens_of(engine.submit(prompt, penalised, cache_scope="alice"))
    again = tokens_of(engine.submit(prompt, penalised, cache_scope="alice"))
    ids = torch.tensor([prompt])
    out = tiny_model.generate(
        ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=16, eos_token_id=None,
        repetition_penalty=1.3,
    )  # fmt: skip
    assert reused(engine) == len(prompt) - 1 and again == out[0, len(prompt) :].tolist()


@pytest.mark.parametrize("failing", ["move_entries", "move_row"])
def test_a_move_that_fails_fails_its_request_and_leaves_no_kept_cache_wrong(
    engine_for, tiny_model, monkeypatch, failing
):
    """Compaction moves a live request down over a kept cache (a swap). When that move fails,
    the request fails, and the kept cache either stays whole where its record is or goes: a
    later prompt of its visitor must still get what a full prefill gives."""
    from orca_space.engines import decode_step, slots

    engine = engine_for(slots=3)
    kept_prompt, long_prompt = make_prompt(90, 1), make_prompt(60, 2)
    with engine._wakeup:  # kept_prompt's request in row 0 ends first; the long one in row 1 goes on
        short = engine.submit(kept_prompt, greedy(1), cache_scope="alice")
        running = engine.submit(long_prompt, greedy(40), cache_scope="bob")
        owner = slots if failing == "move_entries" else decode_step.DecodeBuffers  # KV, or sampling row
        real = getattr(owner, failing)

        def fail_once(*args, **kwargs):
            monkeypatch.setattr(owner, failing, real)
            raise RuntimeError("injected move failure")

        monkeypatch.setattr(owner, failing, fail_once)
    list(short)
    assert list(running)[-1].finish_reason == "error", "the request being moved fails"
    ask(engine, tiny_model, kept_prompt + make_prompt(20, 3), scope="alice")


def test_prompt_tokens_prefilled_counts_what_went_through_the_model(engine_for, monkeypatch):
    """A prompt stopped while it was going in counts the chunks that went in, not all of it."""
    engine = engine_for(chunk_size=32, prompt_chunk=32)
    stopped_after_two_chunks(engine, monkeypatch, make_prompt(300, 5), scope="alice")
    assert engine.stats().prompt_tokens_prefilled == 64, "two chunks of 32 went through the model"
