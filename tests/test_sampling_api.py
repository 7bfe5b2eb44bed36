"""The sampler's API settings on small CPU tensors: presence and frequency penalties, min-p, and
the log-probabilities it reports (from the distribution it draws from), plus `ignore_eos` in the
engine. The decode step with them is checked against `generate` by the engine tests and
/work/shared/tools/engine_fuzz.py (at their defaults they change nothing)."""

from __future__ import annotations

import math

import pytest
import torch

from orca_space.engines.batched import BatchedEngine
from orca_space.engines.sampling import LogprobRows, SamplingTensors, sample_next_tokens
from orca_space.params import SamplingParams
from tests.test_sampling import LOGITS, frequencies, sample, temperature

K = 5  # alternatives asked for: the whole of LOGITS' vocabulary


def with_logprobs(logits, params: SamplingParams, counts=None):
    """(tokens, LogprobRows) for the rows of `logits`, all with `params`."""
    rows = logits.shape[0]
    tensors = SamplingTensors.from_params([params] * rows, logits.device)
    out = LogprobRows.allocate(rows, K, logits.device)
    seen = torch.zeros_like(logits, dtype=torch.bool)
    tokens = sample_next_tokens(
        logits, tensors, seen, torch.full((rows,), 5), torch.arange(rows), counts=counts, logprobs_out=out
    )
    return tokens, out


def test_frequency_penalty_comes_off_once_per_use_and_presence_once():
    counts = torch.tensor([[2.0, 0.0, 0.0, 0.0, 0.0]])  # token 0 is twice in the reply
    greedy = temperature(0.0)
    assert sample(LOGITS, greedy).item() == 0, "unpenalised, token 0 leads by 1.0"
    tensors = SamplingTensors.from_params([temperature(0.0, frequency_penalty=0.6)], LOGITS.device)
    seen = torch.zeros_like(LOGITS, dtype=torch.bool)
    args = (seen, torch.tensor([5]), torch.tensor([0]))
    assert sample_next_tokens(LOGITS, tensors, *args, counts=counts).item() == 1, "2 x 0.6 > 1.0"
    tensors = SamplingTensors.from_params([temperature(0.0, presence_penalty=0.9)], LOGITS.device)
    assert sample_next_tokens(LOGITS, tensors, *args, counts=counts).item() == 0, (
        "presence counts once: 0.9 < 1.0"
    )
    tensors = SamplingTensors.from_params([temperature(0.0, presence_penalty=-2.0)], LOGITS.device)
    said = torch.tensor([[0.0, 1.0, 0.0, 0.0, 0.0]])
    assert sample_next_tokens(LOGITS, tensors, *args, counts=said).item() == 1, (
        "a negative presence penalty favours what was said: 1.0 + 2.0 > 2.0"
    )


def test_min_p_keeps_only_tokens_near_the_likeliest():
    free = frequencies(LOGITS, temperature(1.0))
    assert (free > 0).all(), "at temperature 1 every token is drawn sometimes"
    # p(1) / p(0) = e^-1 = 0.37, p(2) / p(0) = e^-1.5 = 0.22: min_p 0.3 keeps tokens 0 and 1.
    cut = frequencies(LOGITS, temperature(1.0, min_p=0.3))
    assert cut[2:].sum() == 0 and cut[1] > 0
    assert cut[1] / cut[0] == pytest.approx(math.exp(-1), abs=0.05), "the kept tokens keep their odds"


def test_logprobs_of_a_sampled_row_are_its_truncated_distribution():
    logits = LOGITS.repeat(8, 1)
    tokens, out = with_logprobs(logits, temperature(0.7, top_k=3))
    kept = out.top_values[:, :3]
    assert torch.exp(kept).sum(-1).tolist() == pytest.approx([1.0] * 8, abs=1e-5), (
        "the 3 kept tokens sum to 1"
    )
    assert torch.isneginf(out.top_values[:, 3:]).all(), "top-k's cut tokens have probability 0"
    assert out.top_ids[0].tolist() == [0, 1, 2, 3, 4], "likeliest first"
    expected = torch.log_softmax(LOGITS[0, :3] / 0.7, -1)
    assert out.top_values[0, :3].tolist() == pytest.approx(expected.tolist(), abs=1e-5), "after temperature"
    for row, token in enumerate(tokens.tolist()):
        assert out.chosen[row].item() == pytest.approx(expected[token].item(), abs=1e-5)


def test_logprobs_of_a_greedy_row_are_the_penalised_logits_log_softmax():
    counts = torch.tensor([[1.0, 0.0, 0.0, 0.0, 0.0]])
    tokens, out = with_logprobs(LOGITS, temperature(0.0, top_k=2, top_p=0.5, frequency_penalty=0.5), counts)
    penalised = LOGITS - 0.5 * counts
    expected = torch.log_softmax(penalised, -1)[0]
    assert tokens.item() == 0 and out.chosen.item() == pytest.approx(expected[0].item(), abs=1e-6)
    assert out.top_values[0].tolist() == pytest.approx(sorted(expected.tolist(), reverse=True), abs=1e-6)


def test_asking_for_logprobs_changes_no_draw():
    logits = torch.randn(64, 50, generator=torch.Generator().manual_seed(0))
    params = temperature(0.9, top_k=10, top_p=0.8, min_p=0.05)
    tensors = SamplingTensors.from_params([params] * 64, logits.device)
    args = (torch.zeros_like(logits, dtype=torch.bool), torch.full((64,), 3), torch.arange(64))
    plain = sample_next_tokens(logits, tensors, *args)
    out = LogprobRows.allocate(64, 20, logits.device)
    assert torch.equal(sample_next_tokens(logits, tensors, *args, logprobs_out=out), plain)


@pytest.fixture(scope="module")
def first_greedy_token(tiny_model):
    """The token the tiny model writes first after PROMPT, greedily."""
    with torch.inference_mode():
        return int(tiny_model(torch.tensor([PROMPT])).logits[0, -1].argmax())


PROMPT = [1, 330, 2173, 28723, 415, 4077]


@pytest.mark.parametrize("ignore_eos", [False, True])
def test_ignore_eos_goes_on_past_a_stop_token(tiny_model, first_greedy_token, ignore_eos):
    engine = BatchedEngine(tiny_model, stop_ids={first_greedy_token}, context_length=64, slots=1)
    try:
        assert engine.wait_ready(60)
        params = SamplingParams(max_new_tokens=6, temperature=0.0, ignore_eos=ignore_eos)
        events = engine.submit(PROMPT, params).collect(timeout=60)
    finally:
        engine.close()
    tokens = [e.token for e in events if e.token is not None]
    if ignore_eos:
        assert events[-1].finish_reason == "length" and len(tokens) == 6 and tokens[0] == first_greedy_token
    else:
        assert events[-1].finish_reason == "stop" and tokens == [], "the stop token ends the reply, unsent"


def test_engine_logprobs_are_the_models_own_for_greedy_requests(tiny_model):
    """Through prefill and decode steps, each token's log-probability is the log-softmax of the
    logits it was chosen from (recorded by the engine, as the self-check records them)."""
    engine = BatchedEngine(tiny_model, stop_ids=set(), context_length=64, slots=2)
    try:
        assert engine.wait_ready(60)
        params = SamplingParams(max_new_tokens=5, temperature=0.0, repetition_penalty=1.0, logprobs=3)
        events = engine.submit(PROMPT, params, record_logits=True).collect(timeout=60)
    finally:
        engine.close()
    tokens = [e for e in events if e.token is not None]
    assert len(tokens) == 5
    for event in tokens:
        expected = torch.log_softmax(event.logits.float(), -1)
        assert event.logprobs.logprob == pytest.approx(expected[event.token].item(), abs=1e-4)
        best = torch.topk(expected, 3)
        assert [t for t, _ in event.logprobs.top] == best.indices.tolist()
        assert [v for _, v in event.logprobs.top] == pytest.approx(best.values.tolist(), abs=1e-4)
