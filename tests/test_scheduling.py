"""Which prompts share a prefill forward: the oldest first, packed only while the padding is safe."""

from __future__ import annotations

from orca_space.engines.kv_cache import padded_forward_fits
from orca_space.engines.requests import RequestHandle
from orca_space.engines.scheduling import Slot, eager_shortcuts, prefill_rows
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
