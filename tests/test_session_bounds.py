"""What forged gradio sessions can make the server keep (issue #27, item 2).

Any client makes up a `session_hash`, and gradio keeps, per session, the last value of every
component an event read or wrote and every gr.State it wrote. These tests attack as a script
would, through the REST routes the page's own events use, with forged sessions and forged
addresses (`--trusted-proxy-hops 1`, so each X-Forwarded-For is another client): past the limits
nothing is kept, a new session beyond the chat's rate is refused, and however many sessions are
forged, what all of them keep stays within the budget while a real chat still answers.
bench/forged_sessions.py does the same at scale and prints the server's memory.
"""

from __future__ import annotations

import secrets

import gradio as gr
import httpx
import pytest

from orca_space.web import session_bounds
from orca_space.web.session_bounds import SessionLimits, TooLarge, stored_size
from tests.helpers import chat_and_sync_ids, chat_through_api, page_in_process

RATE_LIMIT = 4  # the app's --rate-limit here: new sessions a minute are 4 times that
NEW_SESSIONS_A_MINUTE = RATE_LIMIT * session_bounds.SESSIONS_PER_MESSAGE
LIMITS = SessionLimits(max_list_items=2_000, max_session_bytes=8 << 20)  # all sessions: --session-memory-mb
TOTAL_MB = 12


def test_gradio_still_stores_where_the_bounds_look():
    """The bounds wrap these; a gradio upgrade that moves them must fail here, not silently."""
    from gradio.state_holder import SessionState, StateHolder

    assert callable(gr.Blocks.process_api) and callable(gr.Blocks.postprocess_data)
    holder = StateHolder()
    assert {"session_data", "time_last_used", "lock"} <= set(vars(holder))
    assert {"state_data", "config_values"} <= set(vars(SessionState(gr.Blocks())))


def test_stored_size_refuses_long_lists_and_big_values():
    assert stored_size(["a"] * 10, max_list_items=10, max_bytes=1 << 20) > 0
    with pytest.raises(TooLarge, match="a list of 11 messages or items; the limit is 10"):
        stored_size([{"role": "user", "content": ["a"] * 11}], max_list_items=10, max_bytes=1 << 20)
    with pytest.raises(TooLarge, match="more than 1 MB"):
        stored_size(["x" * (1 << 20)], max_list_items=10, max_bytes=1 << 20)


@pytest.fixture(scope="module")
def page(tiny_dir):
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(session_bounds, "DEFAULT_LIMITS", LIMITS)
        args = ("--model", str(tiny_dir), "--trusted-proxy-hops", "1")
        args += ("--rate-limit", str(RATE_LIMIT), "--session-memory-mb", str(TOTAL_MB))
        with page_in_process(*args) as (url, runtime, demo):
            with httpx.Client(base_url=url, timeout=60) as http:
                yield http, demo, chat_and_sync_ids(http)["sync"]


def history(messages: int, text_chars: int) -> list[dict]:
    part = "y" * text_chars
    return [
        {"role": ("user", "assistant")[i % 2], "content": [{"type": "text", "text": part}]}
        for i in range(messages)
    ]


def forge(http, sync_id: int, value, address: str, session: str | None = None) -> httpx.Response:
    """Write `value` into a session's chat history as the page's chatbot -> history sync does."""
    body = {"data": [value], "fn_index": sync_id, "session_hash": session or f"forged-{secrets.token_hex(8)}"}
    return http.post("/gradio_api/run/predict", json=body, headers={"x-forwarded-for": address})


def kept_bytes(demo: gr.Blocks, session_hash: str | None = None) -> int:
    """What gradio's sessions hold now, measured on gradio's own objects (every state's value and
    every component value kept in a session's config), not on the bounds' bookkeeping."""
    holder = demo.state_holder
    with holder.lock:
        sessions = [holder.session_data[session_hash]] if session_hash else list(holder.session_data.values())
    values = []
    for state in sessions:
        values += list(state.state_data.values())
        values += [config.get("props", {}).get("value") for config in state.config_values.values()]
    return stored_size(values, max_list_items=10**9, max_bytes=10**12)


def test_a_history_past_the_limit_is_refused_and_not_kept(page):
    http, demo, sync_id = page
    session = f"too-long-{secrets.token_hex(4)}"
    answer = forge(http, sync_id, history(LIMITS.max_list_items + 1, 1), "10.1.0.1", session)
    assert answer.status_code != 200 and "2,001 messages" in answer.text, answer.text[:300]
    assert kept_bytes(demo, session) < 1 << 20, "nothing of the refused history may stay in the session"
    assert forge(http, sync_id, history(LIMITS.max_list_items, 1), "10.1.0.2").status_code == 200


def test_a_session_over_its_byte_limit_is_refused(page):
    http, demo, sync_id = page
    answer = forge(http, sync_id, history(300, 10_000), "10.2.0.1")  # 3 MB, kept three times over
    assert answer.status_code != 200 and "more than a chat session can keep" in answer.text, answer.text[:300]


def test_new_sessions_from_one_address_are_rate_limited(page):
    http, _, sync_id = page
    statuses = [
        forge(http, sync_id, history(2, 1), "10.3.0.1").status_code for _ in range(NEW_SESSIONS_A_MINUTE + 2)
    ]
    assert statuses.count(200) == NEW_SESSIONS_A_MINUTE, statuses
    refused = forge(http, sync_id, history(2, 1), "10.3.0.1")
    assert "Too many new sessions from this address" in refused.text, refused.text[:300]
    assert forge(http, sync_id, history(2, 1), "10.3.0.2").status_code == 200, (
        "another address is not held up"
    )


def test_forged_sessions_stay_within_the_budget_and_the_chat_answers(page):
    http, demo, sync_id = page
    largest = history(200, 5_000)  # about 1 MB of JSON, kept three times: within the session's limit
    for index in range(12):
        assert forge(http, sync_id, largest, f"10.4.0.{index}").status_code == 200
    kept = kept_bytes(demo)
    assert kept <= TOTAL_MB << 20, f"12 forged sessions keep {kept >> 20} MB, over the budget"
    assert chat_through_api(http.base_url.__str__().rstrip("/"), "Hello")[-1], "a real chat still answers"
