"""Sampling parameters: defaults, limits, and validation that names the bad parameter.

Values arrive from sliders, from gradio's API and from raw HTTP, so anything can show up:
strings, NaN, infinities, booleans. `SamplingParams.from_raw` accepts only finite numbers of
the right kind within range and raises `ValueError` naming the parameter otherwise.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from numbers import Integral, Real


@dataclass(frozen=True)
class Limit:
    name: str
    label: str
    default: float
    low: float
    high: float
    integer: bool = False
    low_inclusive: bool = True


# The model card's suggestions for a chat; 0 temperature means greedy decoding.
LIMITS = {
    limit.name: limit
    for limit in (
        Limit("max_new_tokens", "Max new tokens", 500, 1, 4096, integer=True),
        Limit("temperature", "Temperature", 0.4, 0.0, 2.0),
        Limit("top_p", "Top-p", 0.95, 0.0, 1.0, low_inclusive=False),
        Limit("top_k", "Top-k (0 = off)", 40, 0, 1000, integer=True),
        Limit("repetition_penalty", "Repetition penalty", 1.1, 1.0, 2.0),
    )
}
PARAMETER_ORDER = tuple(LIMITS)
# Settings only API callers send (OpenAI's and vLLM's fields): no slider on the page, and off by
# default, so the page's replies and transformers' `generate` are unchanged by them.
API_LIMITS = {
    limit.name: limit
    for limit in (
        Limit("min_p", "Min-p (0 = off)", 0.0, 0.0, 1.0),
        Limit("presence_penalty", "Presence penalty", 0.0, -2.0, 2.0),
        Limit("frequency_penalty", "Frequency penalty", 0.0, -2.0, 2.0),
    )
}
# Most alternatives a token's log-probability comes with (OpenAI's `top_logprobs` limit).
MAX_TOP_LOGPROBS = 20
# The smallest context the app takes (--context-length), and the room always kept in it for the
# prompt: the ChatML frame, a short system message and a short question.
MIN_CONTEXT_LENGTH = 256
MIN_PROMPT_TOKENS = 128
# Below this, logits / temperature overflows: 0 (greedy) is what such a value means anyway.
MIN_SAMPLING_TEMPERATURE = 0.01
# A seed is a signed 64-bit integer, as OpenAI-compatible servers (vLLM, TGI) take it.
SEED_RANGE = (-(2**63), 2**63 - 1)


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = int(LIMITS["max_new_tokens"].default)
    temperature: float = LIMITS["temperature"].default
    top_p: float = LIMITS["top_p"].default
    top_k: int = int(LIMITS["top_k"].default)
    repetition_penalty: float = LIMITS["repetition_penalty"].default
    seed: int | None = None
    min_p: float = 0.0  # keep tokens at least this share of the likeliest one's probability
    presence_penalty: float = 0.0  # subtracted from a token's logit once it is in the reply
    frequency_penalty: float = 0.0  # subtracted once per time it is in the reply
    ignore_eos: bool = False  # go on past the end-of-turn token, to max_new_tokens
    logprobs: int | None = None  # return each token's log-probability and this many alternatives
    # A compiled grammar every token must follow (`grammar.Constraint`: tools, response_format),
    # or None for free text. Set by the API after checking, never from raw values.
    constraint: object | None = field(default=None, compare=False, repr=False)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @classmethod
    def from_raw(
        cls, seed: int | None = None, ignore_eos: bool = False, logprobs: int | None = None, **raw: object
    ) -> SamplingParams:
        limits = {**LIMITS, **API_LIMITS}
        unknown = set(raw) - set(limits)
        if unknown:
            raise ValueError(f"unknown sampling parameter(s): {', '.join(sorted(unknown))}")
        values = {name: check_value(limits[name], value) for name, value in raw.items()}
        if 0 < values.get("temperature", 0) < MIN_SAMPLING_TEMPERATURE:
            raise ValueError(
                f"temperature must be 0 (greedy) or at least {MIN_SAMPLING_TEMPERATURE}, "
                f"got {values['temperature']}"
            )
        if not isinstance(ignore_eos, bool):
            raise ValueError(f"ignore_eos must be true or false, got {ignore_eos!r:.40}")
        if logprobs is not None and (
            isinstance(logprobs, bool)
            or not isinstance(logprobs, int)
            or not 0 <= logprobs <= MAX_TOP_LOGPROBS
        ):
            raise ValueError(
                f"top_logprobs must be a whole number from 0 to {MAX_TOP_LOGPROBS}, got {logprobs!r:.40}"
            )
        seed = None if seed is None else check_seed(seed)
        return cls(seed=seed, ignore_eos=ignore_eos, logprobs=logprobs, **values)


def max_new_tokens_limit(context_length: int) -> Limit:
    """Max new tokens for a context of `context_length` tokens (prompt plus reply).

    The reply may take all but MIN_PROMPT_TOKENS of the context (and at most 4096), so the
    largest setting still leaves room for a message; the default is the model card's 500, or
    half the context when that is less, so that with the defaults a message is answered and
    the history keeps as much room as the reply. At the model's 8,192 tokens both are as before.
    """
    if context_length < MIN_CONTEXT_LENGTH:
        raise ValueError(f"context_length must be at least {MIN_CONTEXT_LENGTH}, got {context_length}")
    limit = LIMITS["max_new_tokens"]
    high = min(limit.high, context_length - MIN_PROMPT_TOKENS)
    return replace(limit, high=high, default=min(limit.default, context_length // 2))


def check_seed(value: object) -> int:
    """A whole number in SEED_RANGE (42.0 counts as 42), or ValueError naming `seed`."""
    if isinstance(value, bool) or not isinstance(value, Real):
        raise ValueError(f"seed must be a whole number, got {type(value).__name__} {value!r:.40}")
    if not isinstance(value, Integral):
        if not (math.isfinite(value) and float(value).is_integer()):
            raise ValueError(f"seed must be a whole number, got {value!r:.40}")
        value = int(value)
    low, high = SEED_RANGE
    if not low <= value <= high:
        raise ValueError(f"seed must be in [-2**63, 2**63 - 1], got a {len(str(abs(value)))}-digit number")
    return int(value)


def check_value(limit: Limit, value: object) -> int | float:
    """Return `value` as the limit's type, or raise ValueError naming the parameter."""
    if isinstance(value, bool) or not isinstance(value, Real):
        raise ValueError(f"{limit.name} must be a number, got {type(value).__name__} {value!r:.40}")
    try:
        number = float(value)
    except OverflowError:  # an integer too large for a float: JSON allows any number of digits
        digits = len(str(abs(value)))
        raise ValueError(f"{limit.name} must be in {_bounds(limit)}, got a {digits}-digit number") from None
    if not math.isfinite(number):
        raise ValueError(f"{limit.name} must be a finite number, got {value}")
    if limit.integer:
        if not (isinstance(value, Integral) or number.is_integer()):
            raise ValueError(f"{limit.name} must be a whole number, got {value}")
    too_low = number < limit.low or (number == limit.low and not limit.low_inclusive)
    if too_low or number > limit.high:
        raise ValueError(f"{limit.name} must be in {_bounds(limit)}, got {value!r:.40}")
    return int(number) if limit.integer else number


def _bounds(limit: Limit) -> str:
    return f"{'[' if limit.low_inclusive else '('}{_fmt(limit.low)}, {_fmt(limit.high)}]"


def _fmt(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)
