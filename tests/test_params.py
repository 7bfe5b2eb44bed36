from __future__ import annotations

import math

import pytest

from orca_space.params import (
    LIMITS,
    MIN_PROMPT_TOKENS,
    MIN_SAMPLING_TEMPERATURE,
    PARAMETER_ORDER,
    Limit,
    SamplingParams,
    check_seed,
    check_value,
    max_new_tokens_limit,
)


def test_defaults_are_the_documented_ones():
    p = SamplingParams()
    assert (p.max_new_tokens, p.temperature, p.top_p, p.top_k, p.repetition_penalty) == (
        500,
        0.4,
        0.95,
        40,
        1.1,
    )
    assert PARAMETER_ORDER == ("max_new_tokens", "temperature", "top_p", "top_k", "repetition_penalty")


def test_valid_values_are_converted():
    p = SamplingParams.from_raw(max_new_tokens=64.0, temperature=0, top_p=1, top_k=0, repetition_penalty=1)
    assert p.max_new_tokens == 64 and isinstance(p.max_new_tokens, int)
    assert p.greedy and p.top_k == 0


@pytest.mark.parametrize(
    "name, value, fragment",
    [
        ("temperature", math.nan, "finite"),
        ("temperature", math.inf, "finite"),
        ("temperature", -0.1, "in [0, 2]"),
        ("temperature", 2.5, "in [0, 2]"),
        ("temperature", 1e-39, "0 (greedy) or at least 0.01"),
        ("top_p", 0.0, "in (0, 1]"),
        ("top_p", 1.01, "in (0, 1]"),
        ("top_k", -1, "in [0, 1000]"),
        ("top_k", 3.5, "whole number"),
        ("max_new_tokens", 0, "in [1, 4096]"),
        ("max_new_tokens", 10**9, "in [1, 4096]"),
        ("max_new_tokens", "500", "must be a number"),
        ("repetition_penalty", None, "must be a number"),
        ("repetition_penalty", 0.5, "in [1, 2]"),
        ("temperature", True, "must be a number"),
        ("top_p", [0.5], "must be a number"),
    ],
)
def test_bad_values_name_the_parameter(name, value, fragment):
    with pytest.raises(ValueError) as info:
        SamplingParams.from_raw(**{name: value})
    assert name in str(info.value) and fragment in str(info.value)


def test_unknown_parameter_is_rejected():
    with pytest.raises(ValueError, match="unknown sampling parameter"):
        SamplingParams.from_raw(typical_p=0.5)


def test_every_limit_default_is_valid():
    for limit in LIMITS.values():
        SamplingParams.from_raw(**{limit.name: limit.default})


@pytest.mark.parametrize(
    "seed, expected",
    [(0, 0), (-5, -5), (-(2**63), -(2**63)), (2**63 - 1, 2**63 - 1), (42.0, 42), (None, None)],
)
def test_seed_is_a_whole_number_in_the_64_bit_range(seed, expected):
    assert SamplingParams.from_raw(seed=seed).seed == expected, (
        "both ends of the signed 64-bit range are seeds that vLLM and TGI accept: so must we"
    )


@pytest.mark.parametrize("seed", [True, "42", 1.5, float("nan"), float("inf"), 2**63, -(2**63) - 1, [1]])
def test_bad_seed_is_refused_by_name(seed):
    with pytest.raises(ValueError, match="^seed must"):
        SamplingParams.from_raw(seed=seed)


@pytest.mark.parametrize(
    "seed, message",
    [
        ("42", "seed must be a whole number, got str '42'"),
        (True, "seed must be a whole number, got bool True"),
        ([1], "seed must be a whole number, got list [1]"),
        (1.5, "seed must be a whole number, got 1.5"),
        (float("inf"), "seed must be a whole number, got inf"),
        (2**63, "seed must be in [-2**63, 2**63 - 1], got a 19-digit number"),
        (-(10**400), "seed must be in [-2**63, 2**63 - 1], got a 401-digit number"),
    ],
)
def test_a_bad_seed_is_shown_as_it_was_sent(seed, message):
    """The OpenAI route returns this sentence in its 400: it must say what the client sent, by type
    where the type is the mistake (a JSON string, a boolean), and by length where the number is."""
    with pytest.raises(ValueError) as info:
        check_seed(seed)
    assert str(info.value) == message


DOCUMENTED_RANGES = {
    "max_new_tokens": "[1, 4096]",
    "temperature": "[0, 2]",
    "top_p": "(0, 1]",
    "top_k": "[0, 1000]",
    "repetition_penalty": "[1, 2]",
}


@pytest.mark.parametrize("name", PARAMETER_ORDER)
@pytest.mark.parametrize("sign", [1, -1])
def test_an_integer_of_hundreds_of_digits_names_the_parameter(name, sign):
    """JSON allows any number of digits; float() of such a number raises OverflowError, which must
    become the same named error as any other out-of-range value, not a 500."""
    with pytest.raises(ValueError) as info:
        SamplingParams.from_raw(**{name: sign * 10**400})
    assert str(info.value) == f"{name} must be in {DOCUMENTED_RANGES[name]}, got a 401-digit number"


@pytest.mark.parametrize("temperature", [MIN_SAMPLING_TEMPERATURE, 0.0100001, 2.0])
def test_the_temperature_floor_itself_is_allowed(temperature):
    assert SamplingParams.from_raw(temperature=temperature).temperature == temperature


@pytest.mark.parametrize("temperature", [0.0099999, 5e-324])
def test_a_temperature_just_under_the_floor_is_refused(temperature):
    with pytest.raises(ValueError, match=r"^temperature must be 0 \(greedy\) or at least 0.01, got "):
        SamplingParams.from_raw(temperature=temperature)


def test_the_seed_is_kept():
    assert SamplingParams.from_raw(seed=1234, temperature=0.7).seed == 1234
    assert SamplingParams.from_raw().seed is None


def test_every_unknown_parameter_is_listed():
    with pytest.raises(ValueError) as info:
        SamplingParams.from_raw(typical_p=0.5, eta_cutoff=0.1, temperature=0.5)
    assert str(info.value) == "unknown sampling parameter(s): eta_cutoff, typical_p"


@pytest.mark.parametrize("value, shown", [("500", "str '500'"), (None, "NoneType None"), ([1], "list [1]")])
def test_a_value_that_is_not_a_number_is_shown_with_its_type(value, shown):
    with pytest.raises(ValueError) as info:
        SamplingParams.from_raw(max_new_tokens=value)
    assert str(info.value) == f"max_new_tokens must be a number, got {shown}"


def test_bounds_that_are_not_whole_numbers_are_shown_as_they_are():
    limit = Limit("min_p", "Min-p", 0.05, 0.05, 0.95, low_inclusive=False)
    with pytest.raises(ValueError, match=r"^min_p must be in \(0.05, 0.95\], got 0.99$"):
        check_value(limit, 0.99)
    with pytest.raises(ValueError, match=r"^max_new_tokens must be in \[1, 4096\], got 5000$"):
        check_value(LIMITS["max_new_tokens"], 5000)


@pytest.mark.parametrize(
    "context, default, high",
    [
        (8192, 500, 4096),  # the model's context: the model card's 500, the engine's 4096
        (4096, 500, 3968),
        (1000, 500, 872),
        (300, 150, 172),  # `--demo --context-length 300`: half the context, the rest for the prompt
        (256, 128, 128),  # the smallest context the app takes
    ],
)
def test_max_new_tokens_follows_the_context(context, default, high):
    limit = max_new_tokens_limit(context)
    assert (limit.default, limit.high, limit.low) == (default, high, 1)
    assert limit.default <= limit.high, "the default is always a value the slider can hold"
    assert context - limit.default >= context // 2, (
        "with the defaults, half the context is left for the prompt"
    )
    assert context - limit.high >= MIN_PROMPT_TOKENS, "the largest setting still leaves room for a message"
    assert (limit.name, limit.label) == ("max_new_tokens", "Max new tokens")


def test_max_new_tokens_needs_a_context():
    with pytest.raises(ValueError, match="context_length must be at least 256, got 200"):
        max_new_tokens_limit(200)
