from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from orca_space.history import PromptTooLong, fit_history, group_turns


def cost(message):  # one token per character keeps the arithmetic readable
    return len(message["content"])


def user(text):
    return {"role": "user", "content": text}


def bot(text):
    return {"role": "assistant", "content": text}


SYSTEM = {"role": "system", "content": "sys"}  # 3
HISTORY = [user("aaaa"), bot("bbbb"), user("cc"), bot("dd"), user("e"), bot("f")]  # turns of 8, 4, 2


def test_everything_fits():
    fitted = fit_history(SYSTEM, HISTORY, user("new"), budget=100, message_cost=cost, fixed_cost=2)
    assert fitted.messages == [SYSTEM, *HISTORY, user("new")]
    assert fitted.dropped_turns == 0 and fitted.prompt_tokens == 2 + 3 + 14 + 3


def test_oldest_whole_turns_are_dropped_first():
    # fixed 2 + system 3 + new 3 = 8; room for 6 more: the newest turns (2 and 4) fit, the oldest (8) not.
    fitted = fit_history(SYSTEM, HISTORY, user("new"), budget=14, message_cost=cost, fixed_cost=2)
    assert fitted.messages == [SYSTEM, user("cc"), bot("dd"), user("e"), bot("f"), user("new")]
    assert fitted.dropped_turns == 1 and fitted.prompt_tokens == 14


def test_never_half_a_turn_and_a_step_leaves_room():
    # Budget 11: the prompt before `e` held 15 tokens, so the first turn went (7 of 11 left);
    # now 14: dropping one more turn leaves 10, more than three quarters of the budget, so the
    # step drops both, although `e`/`f` alone would fit.
    fitted = fit_history(SYSTEM, HISTORY, user("new"), budget=11, message_cost=cost, fixed_cost=2)
    assert fitted.messages == [SYSTEM, user("new")]
    assert fitted.dropped_turns == 3 and fitted.prompt_tokens == 8


def test_a_newer_turn_that_does_not_fit_stops_older_ones_too():
    """Keeping an old turn after dropping a newer one would leave a hole in the conversation."""
    history = [user("a"), bot("b"), user("x" * 50), bot("y")]
    fitted = fit_history(None, history, user("n"), budget=10, message_cost=cost, fixed_cost=0)
    assert fitted.messages == [user("n")] and fitted.dropped_turns == 2


def test_message_too_long_for_budget_is_a_clear_error():
    with pytest.raises(PromptTooLong, match="only 10 fit"):
        fit_history(SYSTEM, [], user("x" * 20), budget=10, message_cost=cost, fixed_cost=0)


def test_group_turns_handles_unanswered_user_messages():
    turns = group_turns([user("a"), user("b"), bot("c")])
    assert turns == [[user("a")], [user("b"), bot("c")]]


def test_a_message_that_exactly_fills_the_budget_is_sent():
    # fixed 2 + system 3 + new 5 = 10: not one token to spare, and nothing too many.
    fitted = fit_history(SYSTEM, HISTORY, user("x" * 5), budget=10, message_cost=cost, fixed_cost=2)
    assert fitted.messages == [SYSTEM, user("x" * 5)], "a prompt of exactly the budget fits"
    assert fitted.prompt_tokens == 10 and fitted.dropped_turns == 3


def test_a_turn_that_exactly_fills_what_is_left_is_kept():
    # fixed 2 + system 3 + new 3 = 8; the newest turn (2) takes the last 2 tokens of 10.
    fitted = fit_history(SYSTEM, HISTORY, user("new"), budget=10, message_cost=cost, fixed_cost=2)
    assert fitted.messages == [SYSTEM, user("e"), bot("f"), user("new")]
    assert fitted.prompt_tokens == 10


def test_the_error_for_a_message_too_long_says_what_to_do():
    with pytest.raises(PromptTooLong) as info:
        fit_history(SYSTEM, [], user("x" * 20), budget=10, message_cost=cost, fixed_cost=2)
    assert str(info.value) == (
        "the message needs 25 tokens with the system message, but only 10 fit "
        "(context length minus max new tokens); shorten it or lower max new tokens"
    ), "the user is told both what went wrong and the two ways out"


def test_a_history_that_starts_with_an_assistant_message_is_one_whole_turn():
    """The browser sends back whatever history it holds; one opening with a greeting must not crash."""
    history = [bot("hello!"), user("aa"), bot("bb")]
    assert group_turns(history) == [[bot("hello!")], [user("aa"), bot("bb")]]
    fitted = fit_history(None, history, user("n"), budget=100, message_cost=cost, fixed_cost=0)
    assert fitted.messages == [*history, user("n")] and fitted.dropped_turns == 0
    tight = fit_history(None, history, user("n"), budget=6, message_cost=cost, fixed_cost=0)
    assert tight.messages == [user("aa"), bot("bb"), user("n")] and tight.dropped_turns == 1, (
        "the opening assistant message is dropped whole, like any turn"
    )


def test_a_history_of_only_assistant_messages_stays_in_order():
    history = [bot("a"), bot("b")]
    assert group_turns(history) == [[bot("a"), bot("b")]]
    fitted = fit_history(None, history, user("n"), budget=100, message_cost=cost, fixed_cost=0)
    assert fitted.messages == [bot("a"), bot("b"), user("n")]


def test_the_start_stays_put_until_the_room_is_used_up():
    """Turns of 10 tokens in a budget of 100: the prompt start moves once every few turns, not
    at every turn, and each move frees at least a quarter of the budget."""
    history, starts = [], []
    for turn in range(40):
        fitted = fit_history(None, history, user("q" * 4), budget=100, message_cost=cost, fixed_cost=0)
        starts.append(fitted.dropped_turns)
        history += [user("q" * 4), bot("a" * 6)]
    moves = [k for k in range(1, len(starts)) if starts[k] != starts[k - 1]]
    assert len(moves) <= 40 // 3, f"the start moved at turns {moves}"
    assert starts[:10] == [0] * 10, "nothing dropped while it fits"


def replay(turn_costs, budget):
    """Fit each turn of a conversation with the rule, as the page sends it turn after turn."""
    history, fits = [], []
    for user_cost, reply_cost in turn_costs:
        fits.append(
            fit_history(None, history, user("u" * user_cost), budget=budget, message_cost=cost, fixed_cost=3)
        )
        history += [user("u" * user_cost), bot("r" * reply_cost)]
    return fits


@settings(max_examples=200, deadline=None)
@given(
    turn_costs=st.lists(st.tuples(st.integers(1, 30), st.integers(0, 60)), min_size=1, max_size=40),
    budget=st.integers(40, 400),
)
def test_steps_over_a_long_conversation(turn_costs, budget):
    fits = replay(turn_costs, budget)
    for k, fitted in enumerate(fits):
        assert fitted.prompt_tokens <= budget, "never over the budget"
        total = 3 + sum(u + r for u, r in turn_costs[:k]) + turn_costs[k][0]
        if total <= budget:
            assert fitted.dropped_turns == 0, "nothing dropped while the whole conversation fits"
        if k:
            assert fitted.dropped_turns >= fits[k - 1].dropped_turns, "the start only moves forward"
            if fitted.dropped_turns != fits[k - 1].dropped_turns:
                kept = 3 + sum(u + r for u, r in turn_costs[fits[k - 1].dropped_turns : k]) + turn_costs[k][0]
                assert kept > budget, "the start moves only when the prompt no longer fits"


@settings(max_examples=200, deadline=None)
@given(
    turn_costs=st.lists(st.tuples(st.integers(1, 30), st.integers(0, 60)), min_size=1, max_size=40),
    budget=st.integers(40, 400),
    reply_cost=st.integers(1, 60),
)
def test_a_continue_starts_where_its_turn_did(turn_costs, budget, reply_cost):
    """A continue's prompt is its turn's plus the open reply: it keeps the turn's start (and so
    the turn's kept KV cache) while the reply fits there, and never exceeds the budget."""
    fits = replay(turn_costs, budget)
    history = []
    for (user_cost, reply_cost_then), turn in zip(turn_costs, fits):
        try:
            carried_on = fit_history(
                None, history, user("u" * user_cost), budget, cost, fixed_cost=3, open_cost=reply_cost
            )
        except PromptTooLong:
            assert 3 + user_cost + reply_cost > budget
        else:
            assert carried_on.prompt_tokens <= budget
            if turn.prompt_tokens + reply_cost <= budget:
                assert carried_on.dropped_turns == turn.dropped_turns, "the turn's start"
            else:
                assert carried_on.dropped_turns > turn.dropped_turns
        history += [user("u" * user_cost), bot("r" * reply_cost_then)]
