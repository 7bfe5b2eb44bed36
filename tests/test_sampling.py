"""The sampler alone, on small CPU tensors: each parameter does what it says, rows never mix,
non-finite rows are marked, and the counter-based uniform is exact, reproducible and uniform.

The engine tests (tests/test_batching.py) check the sampler inside a decode step against
transformers' `generate`; these check its arithmetic directly and run in about a second.
"""

from __future__ import annotations

import pytest
import torch

from orca_space.engines.sampling import (
    NON_FINITE,
    SamplingTensors,
    apply_repetition_penalty,
    sample_next_tokens,
    uniform_from_counter,
)
from orca_space.params import SamplingParams

LOGITS = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0]])  # [1, 5]: distinct, so the ranking is clear


def sample(logits, *params: SamplingParams, seeds=None, counters=None, seen=None, **shortcuts):
    """One call of the sampler over the rows of `logits`, row b with params[b] (or params[0])."""
    rows = logits.shape[0]
    tensors = SamplingTensors.from_params([params[b % len(params)] for b in range(rows)], logits.device)
    seen = torch.zeros_like(logits, dtype=torch.bool) if seen is None else seen
    seeds = torch.full((rows,), 5) if seeds is None else seeds
    counters = torch.arange(rows) if counters is None else counters
    return sample_next_tokens(logits, tensors, seen, seeds, counters, **shortcuts)


def frequencies(logits, params: SamplingParams, draws: int = 4000, **shortcuts) -> torch.Tensor:
    """How often each token is drawn from one row of logits, over `draws` counters."""
    tokens = sample(logits.repeat(draws, 1), params, **shortcuts)
    return torch.bincount(tokens, minlength=logits.shape[-1]) / draws


def temperature(t: float, **params) -> SamplingParams:
    return SamplingParams(temperature=t, **{"top_k": 0, "top_p": 1.0, "repetition_penalty": 1.0, **params})


# -- SamplingTensors --


def test_parameter_columns_are_per_row_on_the_requested_device():
    """Whole numbers from Python (temperature=1) still make float columns: the graph's buffers are float."""
    params = [
        SamplingParams(temperature=1, top_p=1, top_k=3, repetition_penalty=1),
        SamplingParams(temperature=2, top_p=1, top_k=40, repetition_penalty=2),
    ]
    tensors = SamplingTensors.from_params(params, torch.device("meta"))
    columns = {
        "temperature": torch.float32,
        "top_p": torch.float32,
        "top_k": torch.long,
        "repetition_penalty": torch.float32,
    }
    for name, dtype in columns.items():
        column = getattr(tensors, name)
        assert (column.shape, column.dtype, column.device.type) == ((2, 1), dtype, "meta"), name
    on_cpu = SamplingTensors.from_params(params, torch.device("cpu"))
    assert on_cpu.temperature.flatten().tolist() == [1.0, 2.0], "one row per request, in order"
    assert on_cpu.top_k.flatten().tolist() == [3, 40]


def test_the_sampler_runs_on_the_device_of_its_inputs():
    """On the meta device (shapes and devices only): nothing is created on another device."""
    meta = torch.device("meta")
    logits = torch.zeros(3, 50, device=meta)
    tokens = sample(
        logits,
        SamplingParams(),
        seeds=torch.zeros(3, dtype=torch.long, device=meta),
        counters=torch.zeros(3, dtype=torch.long, device=meta),
    )
    assert (tokens.shape, tokens.dtype, tokens.device.type) == ((3,), torch.long, "meta")


# -- repetition penalty --


def test_repetition_penalty_shrinks_seen_logits_towards_less_likely_and_leaves_the_rest():
    """CTRL's rule, as transformers applies it: a positive logit is divided, a negative one multiplied."""
    logits = torch.tensor([[2.0, 0.5, 0.0, -0.5, -2.0, 3.0]])
    seen = torch.tensor([[True, True, True, True, True, False]])
    penalised = apply_repetition_penalty(logits, seen, torch.tensor([[2.0]]))
    assert penalised.tolist() == [[1.0, 0.25, 0.0, -1.0, -4.0, 3.0]]


def test_greedy_takes_the_argmax_after_the_penalty():
    logits = torch.tensor([[1.5, 1.0, 0.5]])
    seen = torch.tensor([[True, False, False]])
    tokens = sample(logits, SamplingParams(temperature=0.0, repetition_penalty=2.0), seen=seen)
    assert tokens.tolist() == [1], "the seen best token (1.5 -> 0.75) falls behind the next one"


# -- temperature, top-k, top-p --


@pytest.mark.parametrize("t", [0.5, 1.0, 2.0])
def test_draws_follow_the_softmax_at_the_temperature(t):
    expected = torch.softmax(LOGITS[0] / t, -1)
    assert torch.allclose(frequencies(LOGITS, temperature(t)), expected, atol=0.03), t


def test_temperature_zero_is_the_argmax_whatever_the_rest():
    tokens = sample(LOGITS.repeat(64, 1), SamplingParams(temperature=0.0, top_k=3, top_p=0.5))
    assert (tokens == 0).all()


def test_top_k_one_is_greedy_at_any_temperature():
    tokens = sample(LOGITS.repeat(500, 1), temperature(2.0, top_k=1))
    assert (tokens == 0).all(), "top-k 1 keeps the best token only"


def test_top_k_keeps_exactly_the_k_best():
    drawn = frequencies(LOGITS, temperature(1.0, top_k=2))
    assert torch.allclose(drawn, torch.tensor([0.731, 0.269, 0, 0, 0]), atol=0.03), drawn


def test_top_k_zero_means_the_whole_vocabulary_whatever_the_batch_size():
    """A batch of 16 rows must not become a top-16: every one of 1,000 equal tokens can be drawn."""
    tokens = sample(torch.zeros(16, 1000), temperature(1.0, top_k=0))
    assert tokens.max() >= 16 and len(set(tokens.tolist())) > 12, tokens.tolist()


def test_ranking_only_the_top_candidates_draws_the_same_tokens_even_for_one_row():
    params = temperature(1.0, top_k=2)
    for counter in range(200):
        counters = torch.tensor([counter])
        bounded = sample(LOGITS, params, counters=counters, top_k_bound=3)
        assert bounded == sample(LOGITS, params, counters=counters), counter
    drawn = {sample(LOGITS, params, counters=torch.tensor([c]), top_k_bound=3).item() for c in range(200)}
    assert drawn == {0, 1}, "a single row still ranks top_k_bound candidates, not one"


def test_top_p_keeps_the_smallest_set_reaching_it():
    # softmax(LOGITS) = 0.56, 0.21, 0.13, 0.08, 0.03: top-p 0.7 keeps the two best.
    drawn = frequencies(LOGITS, temperature(1.0, top_p=0.7))
    assert torch.allclose(drawn, torch.tensor([0.731, 0.269, 0, 0, 0]), atol=0.03), drawn


def test_top_p_reached_exactly_by_the_first_token_keeps_only_it():
    """Two equal tokens of probability 0.5 and top-p 0.5: the first reaches it, as in transformers."""
    drawn = frequencies(torch.zeros(1, 2), temperature(1.0, top_p=0.5), draws=500)
    assert drawn.tolist() == [1.0, 0.0]


def test_a_tiny_top_p_keeps_the_best_token_only():
    drawn = frequencies(LOGITS, temperature(1.0, top_p=1e-6), draws=500)
    assert drawn.tolist() == [1.0, 0.0, 0.0, 0.0, 0.0]


def test_tied_logits_rank_by_token_id():
    """Ties are common (fp16 logits); ranking them by id keeps a seeded draw independent of the sort."""
    tokens = sample(torch.zeros(64, 5000), temperature(1.0, top_k=3))
    assert set(tokens.tolist()) == {0, 1, 2}, "top-3 of 5,000 equal logits are the three lowest ids"


def test_the_draw_inverts_the_cdf_over_half_open_intervals():
    """Token i owns [cdf(i-1), cdf(i)): a uniform of exactly 0.5 over two equal tokens is the second."""
    seed, counter = 0, 521315  # found by search: this pair's uniform is exactly 0.5
    assert uniform_from_counter(torch.tensor([seed]), torch.tensor([counter])).item() == 0.5
    tokens = sample(
        torch.zeros(1, 2), temperature(1.0), seeds=torch.tensor([seed]), counters=torch.tensor([counter])
    )
    assert tokens.tolist() == [1]


# -- rows are independent; non-finite rows are marked --


def test_a_seeded_row_draws_the_same_token_whatever_shares_its_batch():
    alone = sample(LOGITS, temperature(1.0), seeds=torch.tensor([7]), counters=torch.tensor([3]))
    batch = torch.cat([torch.randn(2, 5), LOGITS, torch.randn(1, 5)])
    shared = sample(
        batch,
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=0.9, top_k=2),
        temperature(1.0),
        seeds=torch.tensor([1, 2, 7, 4]),
        counters=torch.tensor([0, 0, 3, 0]),
    )
    assert shared[2] == alone[0]


@pytest.mark.parametrize("poison", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize(
    "params, shortcuts",
    [
        (SamplingParams(temperature=0.0), {"all_greedy": True}),
        (SamplingParams(temperature=0.0), {}),
        (SamplingParams(temperature=0.8, top_k=40), {}),
        (SamplingParams(temperature=0.8, top_k=40), {"top_k_bound": 40}),
    ],
)
def test_a_row_with_a_non_finite_logit_is_marked_non_finite(poison, params, shortcuts):
    """Not merely an id in range: the engine must know to fail that request instead of streaming it."""
    logits = torch.randn(3, 100, generator=torch.Generator().manual_seed(0))
    clean = sample(logits, params, **shortcuts)
    logits[1, 17] = poison
    tokens = sample(logits, params, **shortcuts)
    assert tokens[1] == NON_FINITE
    assert tokens[[0, 2]].tolist() == clean[[0, 2]].tolist(), "the other rows sample as before"


def test_a_row_of_nan_is_marked_non_finite_on_every_path():
    logits = torch.full((2, 10), float("nan"))
    for params, shortcuts in (
        (SamplingParams(temperature=0.0), {"all_greedy": True}),
        (SamplingParams(), {}),
    ):
        assert sample(logits, params, **shortcuts).tolist() == [NON_FINITE, NON_FINITE]


def test_finite_logits_that_overflow_in_the_sampler_are_not_marked():
    """Only the model's output decides: a huge logit over a tiny temperature still samples."""
    logits = torch.full((1, 50), -3e38)
    logits[0, 7] = 3e38
    seen = torch.ones(1, 50, dtype=torch.bool)  # the penalty multiplies -3e38 into -inf
    tokens = sample(
        logits, SamplingParams(temperature=0.01, top_k=0, top_p=0.5, repetition_penalty=2.0), seen=seen
    )
    assert tokens.tolist() == [7]


# -- the uniform --


def test_the_uniform_is_pinned_for_given_seeds_and_counters():
    """A pure function of (seed, counter), the same on every device and in every release: a request
    with a seed replays the same reply, and a captured CUDA graph draws what the eager step draws.
    Changing the hash changes every seeded reply; these values make such a change deliberate."""
    seeds = torch.tensor([0, 1, 12345, 0xFFFFFFFF, 0, 0])
    counters = torch.tensor([0, 0, 0, 0, 1, 4095])
    in_24_bits = uniform_from_counter(seeds, counters) * (1 << 24)
    assert in_24_bits.long().tolist() == [16042503, 4869082, 13518621, 8320174, 5371590, 7350687]


def test_the_uniform_is_exact_24_bit_and_below_one():
    counters = torch.arange(20000)
    u = uniform_from_counter(torch.full_like(counters, 3), counters)
    assert u.dtype == torch.float32 and (u >= 0).all() and (u < 1).all()
    assert torch.equal(u * (1 << 24), (u * (1 << 24)).round()), "every value is k / 2**24, exact in float32"


def test_the_uniform_is_uniform_and_depends_on_both_seed_and_counter():
    counters = torch.arange(20000)
    u = uniform_from_counter(torch.full_like(counters, 11), counters)
    histogram = torch.histc(u, bins=10, min=0.0, max=1.0) / len(u)
    assert torch.allclose(histogram, torch.full((10,), 0.1), atol=0.01), histogram
    other_seed = uniform_from_counter(torch.full_like(counters, 12), counters)
    assert (u != other_seed).float().mean() > 0.99, "another seed is another sequence"
    assert len(set(u.tolist())) > 19900, "counters rarely collide"
