"""A decode step with one long chat among short ones runs in two launches by key bucket
(`engines/key_groups.py`): the short rows at their own bucket, greedy-equal to one launch and to
transformers' `generate`, a wrapped ring included."""

from __future__ import annotations

import pytest

from orca_space.engines import decode_step, key_groups, kv_cache
from orca_space.engines.batched import BatchedEngine
from orca_space.params import SamplingParams
from tests.test_batching import greedy_reference, make_prompt, tokens_of

MISTRAL_7B_WEIGHTS = 14_500_000_000  # bytes, fp16
MISTRAL_7B_ENTRY = 128 * 1024  # one ring entry of one slot: 32 layers, keys and values, fp16
RING = kv_cache.cache_length(8192, 4096, 512)  # 4608 entries


def seven_b_groups(positions: dict[int, int], slots: int = 64) -> list[key_groups.KeyGroup]:
    sizes = decode_step.batch_buckets(slots)
    cost = key_groups.StepCost(MISTRAL_7B_WEIGHTS, MISTRAL_7B_ENTRY)
    return key_groups.key_groups(positions, RING, lambda n: decode_step.batch_bucket(n, sizes), cost)


def test_one_long_chat_among_63_short_ones_splits_the_step():
    positions = {0: 4600, **{row: 780 + row for row in range(1, 64)}}
    short, long = seven_b_groups(positions)
    assert (short.batch, short.kv_len, short.rows) == (64, 1024, tuple(range(1, 64)))
    assert (long.batch, long.kv_len, long.rows) == (1, RING, (0,))


def test_no_split_where_it_saves_too_little():
    # The long chat in the last slot: its launch covers every slot anyway.
    assert len(seven_b_groups({**{row: 800 for row in range(63)}, 63: 4600})) == 1
    # Buckets less than twice apart.
    assert len(seven_b_groups({0: 1500, **{row: 800 for row in range(1, 64)}})) == 1
    # One short row beside the long one: a second read of the weights costs more than it saves.
    assert len(seven_b_groups({0: 4600, 1: 800}, slots=2)) == 1
    whole = seven_b_groups({row: 100 * row for row in range(8)})
    assert [(g.batch, g.kv_len, g.rows) for g in whole] == [(8, 1024, tuple(range(8)))]


LONG, SHORT = 700, (3, 40, 100)  # the long prompt wraps the 664-entry ring below
LONG_NEW, SHORT_NEW = 16, 60  # the short requests still decode while the long one does


@pytest.fixture(scope="module")
def windowed():
    """The tiny model with a 600-token window: a ring of 664 entries (buckets 256, 512, 664)."""
    from orca_space.tiny import build_model

    model = build_model().eval()
    model.config.sliding_window = 600
    prompts = [make_prompt(LONG), *(make_prompt(n) for n in SHORT)]
    news = [LONG_NEW, *(SHORT_NEW for _ in SHORT)]
    references = [greedy_reference(model, p, n) for p, n in zip(prompts, news)]
    return model, prompts, news, references


def run(windowed, monkeypatch, cost: key_groups.StepCost, pad_batches: bool, **sampling):
    """Every request at once, the long one first (slot 0); returns the replies and, per eager
    launch, (kv_len, positions of the rows that decode in it)."""
    model, prompts, news, _ = windowed
    # `budget`: decode steps of their own, which key groups split (a mixed step is one forward);
    # 16-token chunks, so that the long prompt decodes while the short ones still do
    engine = BatchedEngine(
        model, (), context_length=1024, slots=4, chunk_size=64, policy="budget", prompt_chunk=16
    )
    launches: list[tuple[int, list[int]]] = []
    real_step = engine.eager_step

    def step(batch, kv_len, *args):
        positions = engine.buffers.positions[:batch].tolist()
        launches.append((kv_len, [p for p in positions if p >= 0]))
        return real_step(batch, kv_len, *args)

    try:
        assert engine.wait_ready(30) and engine.cache_len == 664
        engine.pad_batches = pad_batches
        engine.step_cost = cost
        monkeypatch.setattr(engine, "eager_step", step)
        with engine._wakeup:
            handles = [
                engine.submit(
                    p,
                    SamplingParams(
                        **{"temperature": 0.0, "repetition_penalty": 1.0, **sampling}, max_new_tokens=n
                    ),
                )
                for p, n in zip(prompts, news)
            ]
        return [tokens_of(h) for h in handles], launches
    finally:
        engine.close()


@pytest.mark.parametrize("pad_batches", [False, True])
def test_grouped_steps_equal_one_launch_and_generate(windowed, monkeypatch, pad_batches):
    references = windowed[3]
    # Weights free to read: every step whose buckets are twice apart splits.
    grouped, launches = run(windowed, monkeypatch, key_groups.StepCost(0, 1), pad_batches)
    # Weights dear: never.
    whole, single = run(windowed, monkeypatch, key_groups.StepCost(10**15, 1), pad_batches)
    assert grouped == references, "grouped launches equal generate"
    assert whole == references, "one launch a step equals generate"
    short_alone = [rows for kv_len, rows in launches if kv_len == 256 and len(rows) == len(SHORT)]
    long_alone = [rows for kv_len, rows in launches if kv_len == 664 and len(rows) == 1]
    assert short_alone and long_alone, "the short rows ran at their own bucket, the long one alone"
    assert any(rows[0] >= 664 for rows in long_alone), "the long row decoded past the ring's end"
    assert all(max(rows) < 256 for rows in short_alone)
    assert not any(kv_len == 664 and len(rows) > 1 for kv_len, rows in launches), "never all at 664"
    assert any(kv_len == 664 and len(rows) == 1 + len(SHORT) for kv_len, rows in single), (
        "without the split, the short rows read the long one's bucket"
    )


def test_a_row_riding_along_keeps_its_penalty_state(windowed, monkeypatch):
    """Each launch samples every row of [0, batch): the other group's rows must not count a token
    they did not take (`seen` and `counts` feed the penalties)."""
    penalties = {"repetition_penalty": 1.3, "frequency_penalty": 0.5, "presence_penalty": 0.4}
    grouped, launches = run(windowed, monkeypatch, key_groups.StepCost(0, 1), True, **penalties)
    whole, _ = run(windowed, monkeypatch, key_groups.StepCost(10**15, 1), True, **penalties)
    assert any(len(rows) == 1 for _, rows in launches), "the steps did split"
    assert grouped == whole


def test_sampling_leaves_a_riding_along_rows_state_alone():
    """Directly: the sampler's `seen` and `counts` updates skip rows at position -1."""
    import torch

    buffers = decode_step.DecodeBuffers.allocate(3, 50, "cpu")
    buffers.positions[:3] = torch.tensor([5, -1, 7])
    buffers.counts[1, 3] = 2.0
    before_seen, before_counts = buffers.seen[1].clone(), buffers.counts[1].clone()
    logits = torch.zeros(3, 50)
    logits[:, 9] = 1.0  # every row's greedy token is 9
    decode_step.sample_decoded(buffers, logits, 3, all_greedy=True)
    assert buffers.next[:3].tolist() == [9, 9, 9]
    assert torch.equal(buffers.seen[1], before_seen) and torch.equal(buffers.counts[1], before_counts)
    assert buffers.seen[0, 9] and buffers.seen[2, 9] and buffers.counts[0, 9] == buffers.counts[2, 9] == 1.0
