"""What the batched engine decides on the host each iteration: which prompts to prefill together,
and what it knows about a step's rows that lets an eager step skip work. Pure functions of the
slots, so they are tested without a model.

Two policies choose the prompt tokens of a step (`POLICIES`; the engine's `policy`):

- `budget` (the default where the decode step is a CUDA graph; vLLM V1's scheduler and
  Sarathi-Serve's "stall-free batching"): a step
  has a budget of tokens. Every decoding stream spends one of it first, so it gets a token in
  every step; prompt chunks fill the rest (`budget_rows`), packed without padding
  (`packed.prefill`). A long prompt is cut into chunks, so no step is longer than the budget
  allows, and a short prompt that arrives meanwhile is prefilled whole in the next step beside
  the long one's chunk, instead of after it ends.
- `mixed` (the default where it is not: a CPU, or CUDA without graphs): the same rows, with the
  decode tokens in the same (eager) forward as the prompt chunks (`packed.prefill` with decode
  rows): the weights are read once a step, but on CUDA the decode step is no longer a captured
  graph whenever a prompt is in.
- `fcfs` (the policy before issue 31, kept to compare against in `bench/scheduling.py`): up to
  `chunk_size` prompt tokens a step, oldest prompt first, rows padded to the longest
  (`prefill_rows`), so a short prompt waits for a long one ahead of it to finish.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from ..params import SamplingParams
from .kv_cache import padded_forward_fits
from .requests import RequestHandle

WHOLE_CHUNKS = 4  # a prompt of at most this many `prompt_chunk`s goes into one step whole
Policy = Literal["budget", "mixed", "fcfs"]
POLICIES: tuple[Policy, ...] = ("budget", "mixed", "fcfs")


@dataclass
class Slot:
    """A request holding one row of the KV cache."""

    handle: RequestHandle
    index: int
    prefilled: int = 0  # prompt tokens already in the cache (taken from a kept cache included)
    high_water: int = 0  # 1 + the highest ring position written (see prefix_cache.KeptCache)
    generated: int = 0  # tokens sampled so far, a final stop token included
    last_token: int = 0  # the latest sampled token: the next decode step's input
    sampled: list[int] = field(default_factory=list)  # every token sampled, a final stop included
    chunked: bool = False  # a chunk of its prompt went in and more is left: it goes on in chunks

    @property
    def prompt_len(self) -> int:
        return len(self.handle.prompt_ids)

    def took(self, token: int) -> None:
        """A token was sampled for this request."""
        self.sampled.append(token)
        self.generated += 1
        self.last_token = token

    def cached_tokens(self) -> list[int]:
        """The tokens whose keys and values are in the slot: the prompt so far, then every
        sampled token but the last (a decode step writes its input's keys, never its output's)."""
        if not self.decoding:
            return self.handle.prompt_ids[: self.prefilled]
        return self.handle.prompt_ids + self.sampled[:-1]

    def wrote(self, end: int) -> None:
        """The slot's ring was written up to position `end` (exclusive)."""
        self.high_water = max(self.high_water, end)

    @property
    def decoding(self) -> bool:
        return self.prefilled == self.prompt_len

    @property
    def next_position(self) -> int:
        """Where this slot writes next: its next prompt token, or its last sampled token."""
        return self.prompt_len + self.generated - 1 if self.decoding else self.prefilled


def prefill_rows(
    slots: list[Slot], chunk_size: int, cache_len: int, window: int | None
) -> list[tuple[Slot, int]]:
    """Which prompts to prefill now, and how many tokens of each: the oldest first, and more in
    the same forward while all of them, padded to the longest, fit `chunk_size` tokens and the
    padding overwrites no key a query of theirs still sees (`padded_forward_fits`).

    Many short prompts arriving together then cost one forward, not one each: on CUDA an eager
    forward is hundreds of kernel launches, whatever its length. The oldest prompt always goes
    (alone it always fits: its chunk ends within its context, or within the ring's spare room).
    """
    rows: list[tuple[Slot, int]] = []
    width, furthest_start = 0, 0
    for slot in sorted(slots, key=lambda s: s.handle.id):  # oldest first
        if slot.decoding:
            continue
        take = min(chunk_size, slot.prompt_len - slot.prefilled)
        wider, start = max(width, take), max(furthest_start, slot.prefilled)
        if rows and (
            (len(rows) + 1) * wider > chunk_size
            or not padded_forward_fits(start + wider, wider, cache_len, window)
        ):
            break  # first come, first served: no younger prompt jumps this one
        rows.append((slot, take))
        width, furthest_start = wider, start
    return rows


def budget_rows(
    slots: list[Slot], budget: int, prompt_chunk: int | None = None, whole: int | None = None
) -> list[tuple[Slot, int]]:
    """Which prompts to prefill this step, and how many tokens of each, under a step's token
    `budget`. A long prompt takes at most `prompt_chunk` tokens a step (default: the budget); a
    short one, of at most `whole` tokens (default: `WHOLE_CHUNKS` chunks), goes whole. Rows in
    arrival order; each take is at most the budget, which the ring allows (see
    `kv_cache.cache_length`).

    While no stream decodes there is no step to keep short but a newcomer's wait: a long prompt
    then takes up to `whole` tokens a step (on a GPU, where the chunk is the budget, nothing
    changes; on a CPU, a lone long prompt goes in several times faster). While streams decode,
    a prompt already in chunks takes at most a chunk a step to its end: its short rest going
    whole would make one step of every stream that much longer.

    Every decoding slot spends one token of the budget first; the room left goes to prompts:
    1) the oldest prompt goes whole if short, else takes a chunk, at most a quarter of the room
       (at least one token): it always finishes, however many short prompts keep arriving;
    2) every other short prompt that fits the room left goes whole, in arrival order: a short
       chat's first token does not wait for a long prompt ahead of it;
    3) what room is still left goes to the unfinished long prompts, oldest first, each up to a
       chunk in all (a long prompt alone takes one chunk a step); a short prompt that did not
       fit waits to go whole in a later step rather than start in chunks.
    `prompt_chunk` bounds how long a step with a long prompt in it is, whatever the budget: a
    short chat arriving meanwhile waits for that step, then shares the next. A short prompt
    makes one step longer, once; a long one would make every step of a running stream longer.
    The budget bounds the step when many short prompts come at once.
    When more streams decode than the budget holds, prompts still get a quarter of it: a full
    house must not stop new requests from ever starting.
    """
    prompts = sorted((s for s in slots if not s.decoding), key=lambda s: s.handle.id)  # arrival order
    if not prompts:
        return []
    cap = min(budget, prompt_chunk or budget)
    short = min(budget, whole or WHOLE_CHUNKS * cap)  # a prompt with no more left than this goes whole
    decoding = sum(s.decoding for s in slots)
    if not decoding:
        cap = max(cap, short)
    room = max(budget - decoding, budget // 4, 1)
    takes = {slot.handle.id: 0 for slot in prompts}

    def rest(slot: Slot) -> int:
        return slot.prompt_len - slot.prefilled - takes[slot.handle.id]

    def goes_whole(slot: Slot, room: int) -> bool:
        return rest(slot) <= min(short, room) and not (decoding and slot.chunked)

    oldest = prompts[0]
    left = rest(oldest)
    takes[oldest.handle.id] = left if goes_whole(oldest, room) else min(left, cap, max(room // 4, 1))
    room -= takes[oldest.handle.id]
    for slot in prompts[1:]:
        if goes_whole(slot, room):
            left = rest(slot)
            takes[slot.handle.id] = left
            room -= left
    for slot in prompts:
        if not (takes[slot.handle.id] or slot.chunked) and rest(slot) <= short:
            continue  # a short prompt waits for the next step to go whole, not in chunks from here on
        more = max(0, min(rest(slot), room, cap - takes[slot.handle.id]))
        takes[slot.handle.id] += more
        room -= more
    return [(slot, takes[slot.handle.id]) for slot in prompts if takes[slot.handle.id] > 0]


def eager_shortcuts(params: list[SamplingParams]) -> tuple[bool, int | None]:
    """What the host knows about a step's rows that lets an eager step skip work: whether all
    are greedy, and a top-k bound when every sampling row has one (rank K, not the vocabulary).
    Rows not listed (idle ones) may come out wrong; their tokens are never read. A row that
    asks for log-probabilities needs the whole ranking: no shortcut then."""
    if any(p.logprobs is not None for p in params):
        return False, None
    sampling = [p for p in params if not p.greedy]
    bound = max((p.top_k for p in sampling), default=1) if all(p.top_k > 0 for p in sampling) else None
    return not sampling, bound
