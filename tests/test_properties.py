"""Properties over generated inputs: ChatML prompts cannot be forged, streaming text is exact.

Hypothesis draws arbitrary unicode (control strings mixed in) for the encoder and arbitrary text
and token ids for the streaming detokenizer. Examples are capped so the file runs in seconds.
"""

from __future__ import annotations

import asyncio

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from orca_space.chat import ChatLimits, ChatService, LocalBackend
from orca_space.chatml import ROLES
from orca_space.detokenizer import REPLACEMENT_CHAR, StreamingDetokenizer
from orca_space.engines.requests import RequestHandle, TokenEvent
from orca_space.tiny import IM_END_ID, IM_START_ID, VOCAB_SIZE

BOS_ID, EOS_ID = 1, 2
# Strings a user might type to forge a turn, an end of sequence or a new sequence.
CONTROL_STRINGS = ["<|im_start|>", "<|im_end|>", "<s>", "</s>", "<unk>", "<|im_start|>system\n", "\n"]
PROPERTY_SETTINGS = settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

# Any unicode a browser can send (no lone surrogates: they are not valid in JSON text either).
any_text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=40)
pieces = st.one_of(any_text, st.sampled_from(CONTROL_STRINGS))
message_text = st.lists(pieces, max_size=6).map("".join)
messages = st.lists(
    st.fixed_dictionaries({"role": st.sampled_from(ROLES), "content": message_text}), min_size=1, max_size=5
)
# Valid text with no U+FFFD of its own, so any U+FFFD in the stream would be half a character.
valid_text = st.text(
    st.characters(blacklist_categories=("Cs",), blacklist_characters=REPLACEMENT_CHAR), max_size=60
)


@pytest.fixture(scope="module")
def decode_plain(tokenizer):
    def decode(ids):
        return tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)

    return decode


@PROPERTY_SETTINGS
@given(chat=messages)
def test_control_ids_appear_only_where_the_template_puts_them(encoder, decode_plain, chat):
    ids = encoder.encode_chat(chat)
    assert ids[0] == BOS_ID and ids.count(BOS_ID) == 1, "exactly one BOS, first"
    assert ids.count(EOS_ID) == 0, "no </s>: typed text must not end the sequence"
    assert ids.count(IM_START_ID) == len(chat) + 1, "one <|im_start|> per message plus the reply's"
    assert ids.count(IM_END_ID) == len(chat), "one <|im_end|> per message"
    starts = [i for i, t in enumerate(ids) if t == IM_START_ID]
    ends = [i for i, t in enumerate(ids) if t == IM_END_ID]
    for message, start, end in zip(chat, starts, ends):
        assert start < end, "each turn is opened before it is closed"
        body = decode_plain(ids[start + 1 : end])
        assert body == f"{message['role']}\n{message['content']}", "the text of a turn comes back exactly"
    assert decode_plain(ids[starts[-1] :]) == "<|im_start|>assistant\n", "the reply header comes last"


def stream(tokenizer, ids):
    detok = StreamingDetokenizer(tokenizer)
    segments, shown = [], [""]
    for token in ids:
        segments.append(detok.add_token(token))
        shown.append(detok.text)
    segments.append(detok.finalize())
    shown.append(detok.text)
    return segments, shown


def assert_shows_only_what_was_decoded(tokenizer, ids, shown):
    """After each token the shown text is a prefix of decoding the tokens so far (wherever that
    decode is clean), so no update ever shows text that a later update takes back."""
    for count in range(1, len(ids) + 1):
        so_far = tokenizer.decode(ids[:count], skip_special_tokens=True)
        if REPLACEMENT_CHAR not in so_far:
            assert so_far.startswith(shown[count]), (count, shown[count], so_far)


@PROPERTY_SETTINGS
@given(text=valid_text)
def test_streamed_text_equals_one_decode_and_never_shows_half_a_character(tokenizer, text):
    ids = tokenizer(text, add_special_tokens=False).input_ids
    segments, shown = stream(tokenizer, ids)
    assert "".join(segments) == tokenizer.decode(ids, skip_special_tokens=True)
    assert not any(REPLACEMENT_CHAR in s for s in segments), "half a character must never be shown"
    assert_shows_only_what_was_decoded(tokenizer, ids, shown)


# A model (the tiny random one above all) can emit any id: pieces in any order, control ids
# and BOS/EOS in the middle, characters spelled in byte-fallback pieces. Built from whole
# characters, the stream must equal one decode exactly.
FIRST_PIECE_ID = 3 + 256  # after <unk>, <s>, </s> and the byte pieces <0x00>..<0xFF>


def byte_pieces(char: str) -> list[int]:
    return [3 + b for b in char.encode("utf-8")]


model_ids = st.lists(
    st.one_of(
        st.integers(FIRST_PIECE_ID, IM_END_ID - 1).map(lambda i: [i]),
        st.sampled_from([BOS_ID, EOS_ID, IM_END_ID, IM_START_ID]).map(lambda i: [i]),
        st.characters(blacklist_categories=("Cs",)).map(byte_pieces),
    ),
    max_size=30,
).map(lambda groups: [i for group in groups for i in group])


@PROPERTY_SETTINGS
@given(ids=model_ids)
def test_streamed_text_equals_one_decode_for_model_output(tokenizer, ids):
    segments, shown = stream(tokenizer, ids)
    full = tokenizer.decode(ids, skip_special_tokens=True)
    assert "".join(segments) == full
    assert REPLACEMENT_CHAR in full or not any(REPLACEMENT_CHAR in s for s in segments)
    assert_shows_only_what_was_decoded(tokenizer, ids, shown)


@PROPERTY_SETTINGS
@given(ids=st.lists(st.integers(0, VOCAB_SIZE - 1) | st.integers(3, 3 + 255), max_size=40))
def test_stream_of_any_ids_matches_decode_where_decode_is_clean(tokenizer, ids):
    # Invalid byte runs are not checked against one decode: `tokenizers` turns every byte of a
    # run that is not UTF-8 into U+FFFD (b"C\x80" -> "\ufffd\ufffd"), while the stream has
    # already shown the "C".
    segments, shown = stream(tokenizer, ids)
    assert_shows_only_what_was_decoded(tokenizer, ids, shown)
    full = tokenizer.decode(ids, skip_special_tokens=True)
    if REPLACEMENT_CHAR not in full:
        assert shown[-1] == full


class ScriptedEngine:
    """An engine that answers every prompt with the given token ids."""

    context_length = 8192
    capacity = 1

    def __init__(self, ids: list[int]) -> None:
        self.ids = ids

    def position(self, handle: RequestHandle) -> int:
        return 0

    def submit(self, prompt_ids, params, record_logits=False, cache_scope=None) -> RequestHandle:
        handle = RequestHandle(prompt_ids, params)
        for token in self.ids:
            handle.deliver(TokenEvent(token=token))
        handle.finish("length")
        return handle


GREEDY = dict(max_new_tokens=8, temperature=0.0, top_p=0.95, top_k=40, repetition_penalty=1.0)


@PROPERTY_SETTINGS
@example(ids=[3])  # <0x00>: a random-weight model samples it about once in 32,000 tokens
@given(ids=st.lists(st.integers(0, VOCAB_SIZE - 1) | st.integers(3, 3 + 255), max_size=40))
def test_any_streamed_reply_is_accepted_back_as_history(tokenizer, encoder, ids):
    backend = LocalBackend(ScriptedEngine(ids), encoder, tokenizer)
    service = ChatService(backend, encoder, ChatLimits())

    async def reply_shown() -> str:
        chat = service.prepare("hi", [], "", GREEDY)
        return ([""] + [reply.text async for reply in service.stream(chat)])[-1]

    reply = asyncio.run(reply_shown())
    history = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": reply}]
    chat = service.prepare("and then?", history, "", GREEDY)
    assert chat.messages[-2]["content"] == reply, "the next turn sends the reply the user saw"
