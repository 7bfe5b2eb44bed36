"""Constrained decoding in the batched engine, on the tiny random-weight checkpoint.

Random weights know nothing of JSON: every valid reply here is the grammar's doing, which is
what must hold. The schemas bound every value (enums, ranges, short strings, few items), so a
reply always ends well within its token limit, with `<|im_end|>` where the grammar allows it.
"""

from __future__ import annotations

import json
from dataclasses import replace

import jsonschema
import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from orca_space.engines.batched import BatchedEngine
from orca_space.engines.token_masks import mask_disallowed
from orca_space.grammar import GrammarCompiler, GrammarError, ToolSpec
from orca_space.params import SamplingParams

GREEDY = SamplingParams(max_new_tokens=24, temperature=0.0, repetition_penalty=1.0)
SAMPLED = SamplingParams(max_new_tokens=200, temperature=1.0, top_p=1.0, top_k=40, repetition_penalty=1.0)
WEATHER = {
    "type": "object",
    "properties": {
        "city": {"enum": ["Paris", "Rome", "Lima"]},
        "days": {"type": "integer", "minimum": 1, "maximum": 14},
        "metric": {"type": "boolean"},
        "note": {"type": "string", "maxLength": 12},
    },
    "required": ["city", "days", "metric", "note"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def grammars(tokenizer):
    return GrammarCompiler(tokenizer, len(tokenizer), [tokenizer.convert_tokens_to_ids("<|im_end|>")])


@pytest.fixture(scope="module")
def engine(tiny_model, encoder):
    engine = BatchedEngine(tiny_model, stop_ids=encoder.controls.stop_ids, context_length=1024, slots=6)
    assert engine.wait_ready(30)
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def prompt(encoder):
    return encoder.encode_chat([{"role": "user", "content": "The weather, as JSON please."}])


def reply(engine, tokenizer, handle) -> tuple[str, str]:
    events = handle.collect(timeout=60)
    assert events[-1].finish_reason != "error", events[-1].error
    return tokenizer.decode([e.token for e in events if e.token is not None]), events[-1].finish_reason


def test_mask_sets_exactly_the_disallowed_tokens_to_minus_infinity():
    logits = torch.arange(70, dtype=torch.float32).repeat(2, 1)  # [2, 70]: 3 words of 32 bits
    allowed = torch.zeros(2, 3, dtype=torch.int32)
    allowed[0, 0] = 1 << 5  # token 5
    allowed[0, 2] = 1 << 1  # token 65
    allowed[1] = -1  # every token
    masked = mask_disallowed(logits, allowed)
    assert torch.isfinite(masked[0]).nonzero().flatten().tolist() == [5, 65]
    assert torch.equal(masked[1], logits[1]), "an all-allowed row is left as it was"
    high = torch.zeros(1, 3, dtype=torch.int32)
    high[0, 1] = -(2**31)  # bit 31 of word 1: token 63, the sign bit of an int32
    assert torch.isfinite(mask_disallowed(logits[:1], high)[0]).nonzero().flatten().tolist() == [63]


def test_sampled_replies_under_a_schema_parse_and_validate(engine, tokenizer, grammars, prompt):
    constraint = grammars.json(WEATHER)
    handles = [engine.submit(prompt, replace(SAMPLED, seed=seed, constraint=constraint)) for seed in range(3)]
    for handle in handles:
        text, finish = reply(engine, tokenizer, handle)
        assert finish == "stop", f"the grammar ends the reply with <|im_end|> once complete: {text!r}"
        jsonschema.validate(json.loads(text), WEATHER)


def test_free_requests_sharing_a_batch_with_constrained_ones_are_unchanged(
    engine, tokenizer, grammars, prompt
):
    alone = reply(engine, tokenizer, engine.submit(prompt, GREEDY))
    constraint = grammars.json(WEATHER)
    with engine._wakeup:  # submitted together, so they are admitted together and share every step
        constrained = [engine.submit(prompt, replace(SAMPLED, seed=s, constraint=constraint)) for s in (1, 2)]
        free = engine.submit(prompt, GREEDY)
        constrained.append(engine.submit(prompt, replace(GREEDY, max_new_tokens=200, constraint=constraint)))
    assert reply(engine, tokenizer, free) == alone, "a grammar in the batch must not touch a free row"
    for handle in constrained:
        jsonschema.validate(json.loads(reply(engine, tokenizer, handle)[0]), WEATHER)


def test_a_forced_tool_call_is_a_valid_call_of_one_of_the_tools(engine, tokenizer, grammars, prompt):
    tools = [ToolSpec("get_weather", WEATHER), ToolSpec("ping", {"type": "object", "properties": {}})]
    constraint = grammars.tool_calls(tools, forced=True, parallel=False)
    for seed in range(3):
        handle = engine.submit(prompt, replace(SAMPLED, seed=seed, constraint=constraint))
        text, finish = reply(engine, tokenizer, handle)
        assert finish == "stop" and text.startswith("<tool_call>\n") and text.endswith("\n</tool_call>")
        call = json.loads(text.removeprefix("<tool_call>\n").removesuffix("\n</tool_call>"))
        assert call["name"] in ("get_weather", "ping")
        if call["name"] == "get_weather":
            jsonschema.validate(call["arguments"], WEATHER)


def test_a_schema_that_cannot_be_compiled_is_a_named_error(grammars):
    with pytest.raises(GrammarError, match="cannot be compiled.*Unsupported type"):
        grammars.json({"type": "object", "properties": {"a": {"type": "no-such-type"}}})
    with pytest.raises(GrammarError, match="cannot be compiled"):
        grammars.json({"$ref": "#/$defs/missing"})


def test_a_grammar_for_another_vocabulary_fails_its_request_only(engine, tokenizer, prompt):
    other = GrammarCompiler(tokenizer, len(tokenizer) + 64, [32000]).json(None)
    events = engine.submit(prompt, replace(GREEDY, constraint=other)).collect(timeout=30)
    assert events[-1].finish_reason == "error" and "compiled for" in events[-1].error
    assert reply(engine, tokenizer, engine.submit(prompt, GREEDY))[1] == "length"


# -- every constrained reply parses and validates, over generated schemas --

leaf_schemas = st.one_of(
    st.just({"type": "boolean"}),
    st.lists(st.text("abcxyz", min_size=1, max_size=5), min_size=1, max_size=4, unique=True).map(
        lambda values: {"enum": values}
    ),
    st.tuples(st.integers(-50, 50), st.integers(0, 60)).map(
        lambda r: {"type": "integer", "minimum": r[0], "maximum": r[0] + r[1]}
    ),
    st.integers(0, 8).map(lambda n: {"type": "string", "maxLength": n}),
    st.just({"type": "null"}),
)


def objects(children):
    return st.dictionaries(
        st.text("abcdefgh_", min_size=1, max_size=6), children, min_size=1, max_size=3
    ).map(
        lambda props: {
            "type": "object",
            "properties": props,
            "required": sorted(props),
            "additionalProperties": False,
        }
    )


schemas = st.recursive(
    leaf_schemas,
    lambda children: st.one_of(
        objects(children), children.map(lambda item: {"type": "array", "items": item, "maxItems": 3})
    ),
    max_leaves=6,
).map(
    lambda schema: (
        schema
        if schema.get("type") == "object"
        else {
            "type": "object",
            "properties": {"value": schema},
            "required": ["value"],
            "additionalProperties": False,
        }
    )
)


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(schema=schemas, seed=st.integers(0, 2**32 - 1))
@example(  # xgrammar 0.2.9 lets a raw control character into a maxLength string (grammar.py works around it)
    schema={
        "type": "object",
        "properties": {
            "value": {"type": "array", "items": {"type": "string", "maxLength": 3}, "maxItems": 3}
        },
        "required": ["value"],
        "additionalProperties": False,
    },
    seed=0,
)
def test_every_constrained_reply_parses_and_validates(engine, tokenizer, grammars, prompt, schema, seed):
    params = replace(SAMPLED, max_new_tokens=400, seed=seed, constraint=grammars.json(schema))
    text, finish = reply(engine, tokenizer, engine.submit(prompt, params))
    assert finish == "stop", f"a bounded schema's reply ends by the grammar: {text!r}"
    jsonschema.validate(json.loads(text), schema)


def test_the_reference_rung_applies_the_same_grammar(
    tiny_model, encoder, engine, tokenizer, grammars, prompt
):
    """transformers' `generate` with the grammar as a logits processor: the same greedy reply as
    the batched engine's masked step, and sampled replies that validate."""
    from orca_space.engines.reference import ReferenceEngine

    reference = ReferenceEngine(tiny_model, stop_ids=encoder.controls.stop_ids, context_length=1024)
    try:
        constraint = grammars.json(WEATHER)
        greedy = replace(GREEDY, max_new_tokens=200, constraint=constraint)
        text, finish = reply(reference, tokenizer, reference.submit(prompt, greedy))
        assert (text, finish) == reply(engine, tokenizer, engine.submit(prompt, greedy))
        jsonschema.validate(json.loads(text), WEATHER)
        sampled = reply(
            reference, tokenizer, reference.submit(prompt, replace(SAMPLED, seed=4, constraint=constraint))
        )
        assert sampled[1] == "stop"
        jsonschema.validate(json.loads(sampled[0]), WEATHER)
    finally:
        reference.close()


@pytest.mark.gpu
def test_cuda_graph_steps_apply_the_mask_like_eager_ones(tiny_dir, encoder, tokenizer, grammars, prompt):
    """The mask is an input buffer of the captured step: replayed graphs give constrained rows
    the same replies as eager steps, beside a free row, and every constrained reply validates."""
    from orca_space.loading import load_model

    model = load_model(tiny_dir, "cuda", dtype=torch.float32)
    constraint = grammars.json(WEATHER)
    params = [replace(SAMPLED, seed=s, constraint=constraint) for s in range(3)] + [replace(SAMPLED, seed=9)]
    replies = []
    for use_graphs in (True, False):
        engine = BatchedEngine(model, encoder.controls.stop_ids, 1024, slots=4, use_graphs=use_graphs)
        try:
            assert engine.wait_ready(300)
            with engine._wakeup:
                handles = [engine.submit(prompt, p) for p in params]
            replies.append([reply(engine, tokenizer, h) for h in handles])
        finally:
            engine.close()
    assert replies[0] == replies[1]
    for text, _ in replies[0][:3]:
        jsonschema.validate(json.loads(text), WEATHER)


def test_end_of_turn_is_allowed_only_where_the_grammar_is_complete(grammars, encoder):
    matcher = grammars.json(WEATHER).matcher()
    bitmask = torch.zeros(1, (grammars.vocab_size + 31) // 32, dtype=torch.int32)
    im_end = encoder.controls.im_end

    def allowed(token: int) -> bool:
        matcher.fill(bitmask, 0)
        return bool((int(bitmask[0, token // 32]) >> (token % 32)) & 1)

    document = json.dumps({"city": "Rome", "days": 3, "metric": True, "note": "ok"})
    for token in encoder._encode_text(document):
        assert not allowed(im_end), "no end of turn inside the JSON"
        assert matcher.accept(token)
    assert allowed(im_end), "the end of turn once the JSON is complete"
    assert not allowed(encoder.controls.im_start), "never a new turn"
