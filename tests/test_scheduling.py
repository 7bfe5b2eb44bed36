"""Which prompts share a prefill forward: the oldest first, packed only while the padding is safe."""

from __future__ import annotations

from orca_space.engines.kv_cache import padded_forward_fits
from orca_space.engines.requests import RequestHandle
from orca_space.engines.scheduling import Slot, budget_rows, eager_shortcuts, prefill_rows
from orca_space.params import SamplingParams


def slot(index: int, prompt_len: int, prefilled: int = 0) -> Slot:
    return Slot(RequestHandle([7] * prompt_len, SamplingParams()), index, prefilled=prefilled)


def test_short_prompts_share_a_forward_oldest_first():
    slots = [slot(0, 40), slot(1, 30), slot(2, 600)]
    rows = prefill_rows(slots, chunk_size=512, cache_len=4608, window=4096)
    assert [(s.index, take) for s, take in rows] == [(0, 40), (1, 30)], (
        "600 tokens padded to 512 would not fit"
    )


def test_a_decoding_slot_is_not_prefilled():
    rows = prefill_rows([slot(0, 40, prefilled=40), slot(1, 30)], 512, 4608, 4096)
    assert [s.index for s, _ in rows] == [1]


def test_padding_never_wraps_a_cache_that_is_no_ring():
    """--context-length 700 holds the whole context (no ring): the rest of a 690-token prompt
    (178 tokens from 512) padded to a 200-token neighbour would write past entry 700, onto the
    prompt's own first keys. It goes alone; the neighbour follows."""
    old, new = slot(0, 690, prefilled=512), slot(1, 200)
    rows = prefill_rows([old, new], chunk_size=512, cache_len=700, window=4096)
    assert [(s.index, take) for s, take in rows] == [(0, 178)]
    assert [(s.index, take) for s, take in prefill_rows([new], 512, 700, 4096)] == [(1, 200)]


def test_without_a_sliding_window_padding_never_wraps():
    """No window: every key stays visible, so no padding may wrap however wide (a model such as
    Mistral v0.2 has `sliding_window: null`)."""
    rows = prefill_rows(
        [slot(0, 1000, prefilled=980), slot(1, 250)], chunk_size=512, cache_len=1024, window=None
    )
    assert [(s.index, take) for s, take in rows] == [(0, 20)]
    assert not padded_forward_fits(1230, 250, 1024, None) and padded_forward_fits(1024, 250, 1024, None)


def test_a_real_ring_packs_what_fits_its_spare_room():
    """window 16 + chunk 32 = a 48-entry ring: rows padded to at most 32 tokens may wrap."""
    rows = prefill_rows([slot(0, 100, prefilled=90), slot(1, 12)], chunk_size=32, cache_len=48, window=16)
    assert [(s.index, take) for s, take in rows] == [(0, 10), (1, 12)], "the first row wraps, safely"


def test_eager_shortcuts_know_greedy_and_top_k_bounds():
    greedy, sampled = SamplingParams(temperature=0.0), SamplingParams(temperature=0.7, top_k=40)
    assert eager_shortcuts([greedy, greedy]) == (True, 1)
    assert eager_shortcuts([greedy, sampled]) == (False, 40)
    assert eager_shortcuts([sampled, SamplingParams(temperature=0.7, top_k=0)]) == (False, None)


# -- the token budget (`budget_rows`), stepped by a counter: no model, no clock --

BUDGET = 256


class Steps:
    """A loop with a step counter: each step, every decoding slot takes one token, then the
    prompt chunks `budget_rows` chooses go in; prompts arrive at the steps a test says."""

    def __init__(self, budget: int = BUDGET) -> None:
        self.budget, self.step, self.slots = budget, 0, []
        self.first_token: dict[int, int] = {}  # request id -> the step its first token came in
        self.tokens: dict[int, list[int]] = {}  # request id -> the steps it decoded in

    def arrive(self, prompt_len: int) -> Slot:
        new = slot(len(self.slots), prompt_len)
        self.slots.append(new)
        return new

    def run(self) -> list[tuple[Slot, int]]:
        self.step += 1
        rows = budget_rows(self.slots, self.budget)
        decoding = [s for s in self.slots if s.decoding]
        assert len(decoding) + sum(take for _, take in rows) <= self.budget, "the step stays in budget"
        for s in decoding:
            self.tokens.setdefault(s.handle.id, []).append(self.step)
        for s, take in rows:
            s.prefilled += take
            s.chunked = not s.decoding  # as the engine marks it
            if s.decoding:
                self.first_token[s.handle.id] = self.step
        return rows


def test_a_short_prompt_arriving_during_a_long_prefill_starts_in_the_next_step():
    steps = Steps()
    long = steps.arrive(3000)
    for _ in range(3):
        steps.run()
    short = steps.arrive(60)
    steps.run()
    assert steps.first_token[short.handle.id] == steps.step, "prefilled whole beside the long chunk"
    assert not long.decoding and long.prefilled == 3 * BUDGET + (BUDGET - 60), "the long one got the rest"


def test_a_running_stream_decodes_in_every_step_of_a_long_prefill():
    steps = Steps()
    stream = steps.arrive(40)
    steps.run()
    long = steps.arrive(3000)
    while not long.decoding:
        steps.run()
    assert steps.tokens[stream.handle.id] == list(range(2, steps.step + 1)), "one token in every step"


def test_arrival_order_is_kept_among_equal_prompts():
    """Three equal prompts and room for two: the two oldest go first, the third whole in the next
    step (not a chunk of the room left, which would keep it in chunks to its end); two equal long
    prompts: the older finishes first."""
    steps = Steps(budget=200)
    first, second, third = (steps.arrive(90) for _ in range(3))
    rows = steps.run()
    assert [(s.index, take) for s, take in rows] == [(0, 90), (1, 90)]
    assert first.decoding and second.decoding and not third.decoding
    assert [(s.index, take) for s, take in steps.run()] == [(2, 90)]
    steps = Steps()
    older, younger = steps.arrive(1000), steps.arrive(1000)
    while not younger.decoding:
        steps.run()
    assert steps.first_token[older.handle.id] < steps.first_token[younger.handle.id]


def test_a_long_prompt_finishes_while_short_ones_keep_arriving():
    """Room for short prompts every step, filled every step: the oldest prompt still gets a
    quarter of the room, so it ends within a bounded number of steps (here 3000 / 64 rounded up)."""
    steps = Steps()
    long = steps.arrive(3000)
    while not long.decoding and steps.step < 1000:
        for _ in range(3):
            steps.arrive(60)  # 180 tokens of new prompts every step: more than the room left
        steps.run()
    assert long.decoding and steps.step <= -(-3000 // (BUDGET // 4))
    waiting = [s for s in steps.slots if not s.decoding]
    assert all(s.handle.id > long.handle.id for s in waiting), "and the short ones in order behind it"


def test_prompts_still_start_when_streams_fill_the_budget():
    """More decoding streams than the budget: a quarter of it stays for prompts."""
    streams = [slot(i, 5, prefilled=5) for i in range(300)]
    rows = budget_rows([*streams, slot(300, 1000)], BUDGET)
    assert [(s.index, take) for s, take in rows] == [(300, BUDGET // 4)]


def test_a_decoding_slot_takes_no_prompt_budget():
    rows = budget_rows([slot(0, 40, prefilled=40), slot(1, 30, prefilled=10)], BUDGET)
    assert [(s.index, take) for s, take in rows] == [(1, 20)]


def takes(rows: list[tuple[Slot, int]]) -> list[int]:
    return [take for _, take in rows]


def test_a_long_prompt_takes_one_chunk_a_step_however_big_the_budget():
    """`prompt_chunk` bounds a step while a long prompt goes in; short prompts (up to four
    chunks) go whole beside it, and many arriving together fill the budget in arrival order."""
    long, short, stream = slot(0, 3000), slot(1, 100), slot(9, 5, prefilled=5)
    rows = budget_rows([stream, long, short], budget=512, prompt_chunk=32)
    assert [(s.index, take) for s, take in rows] == [(0, 32), (1, 100)]
    assert takes(budget_rows([stream, slot(0, 129)], 512, 32)) == [32], "129 is long: a chunk"
    assert takes(budget_rows([stream, slot(0, 128)], 512, 32)) == [128], "128 is short: whole"
    assert takes(budget_rows([slot(0, 3000)], 512, 32)) == [128], "no stream: a short prompt's size a step"
    assert takes(budget_rows([slot(0, 3000)], 512, 32, whole=200)) == [200]
    crowd = [slot(i, 40) for i in range(30)]
    rows = budget_rows(crowd, budget=512, prompt_chunk=32)
    assert [(s.index, take) for s, take in rows] == [(i, 40) for i in range(12)], "the 13th waits to go whole"


def test_a_chunked_prompt_goes_on_in_chunks_while_streams_decode():
    """Its short rest does not go whole: that step would be longer for every stream. With no
    stream left, the rest goes whole."""
    stream, long = slot(0, 5, prefilled=5), slot(1, 100, prefilled=90)
    long.chunked = True
    assert takes(budget_rows([stream, long], 512, 4)) == [4]
    assert takes(budget_rows([long], 512, 4)) == [10]
    fresh = slot(2, 10)  # a new chat of the same length goes whole beside the stream
    assert takes(budget_rows([stream, fresh], 512, 4)) == [10]


def test_a_long_prompt_beside_a_stream_goes_in_one_chunk_a_step_to_its_end():
    stream, long = slot(0, 5, prefilled=5), slot(1, 1000)
    sizes = []
    while not long.decoding:
        ((_, take),) = budget_rows([stream, long], 512, 16)
        sizes.append(take)
        long.prefilled += take
        long.chunked = not long.decoding
    assert sizes == [16] * 62 + [8], "no step carries more than a chunk of it"
