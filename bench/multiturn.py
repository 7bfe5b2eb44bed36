"""Each turn of a conversation against a fresh prompt: what reusing the conversation's KV cache buys.

    python bench/multiturn.py [--out bench/results/DATE-multiturn-cpu.json]

CPU, a live app (`python app.py` in a child process, the eager engine) serving a random-weight
Mistral of `small_model.py` (`--size small`: hidden 256, 6 layers; `--size wide`: hidden 1024, 2
layers, whose attention weighs nearer the real model's: see there), greedy.

1) Through `/v1/chat/completions`, streamed: a conversation of `--turns` turns (user messages of
   about 290 tokens, replies of at most 48), growing past 3,000 tokens. For each turn, the time to
   its first streamed text, and the same for a fresh conversation whose one message makes a prompt
   of the same length. Before (`--prefix-cache off`) and after (`private`), each on its own app,
   both up at once and their conversations interleaved (`--repeats` each; per-turn medians).
2) Through the chat service the page uses (history fitting, ChatML, the engine; in process), a
   40-turn conversation in a 2,048-token context, so that history is dropped: per turn, the share
   of the prompt's tokens the engine reused. With history dropped in steps (the app's rule) and,
   for comparison, one turn at a time (`HEADROOM` 0, the rule before), both with the cache. (In
   process, not through `/chat`, so that the rule before can be switched back on for the
   comparison; tests/test_long_sessions.py holds such conversations through the page itself.)
"""

from __future__ import annotations

import argparse
import datetime
import json
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

GREEDY = {"temperature": 0.0, "top_p": 1.0, "top_k": 0, "repetition_penalty": 1.0}
REPLY_TOKENS = 48
WORDS = (
    "orca whale pod ocean salmon seal wave current fin dorsal tail hunt call song echo family calf "
    "mother river coast ice arctic deep dive breath surface swim travel north south island rock kelp "
    "school herring tide storm calm morning evening light dark cold warm water salt shore boat watch"
).split()


def words(rng: random.Random, count: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(count))


# -- the app, in a child process --


def serve(argv: list[str]) -> None:
    import app

    app.main(argv)


class App:
    def __init__(self, checkpoint: Path, *args: str, log: Path) -> None:
        from tests.helpers import free_port, wait_until_ready

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        command = [sys.executable, __file__, "--serve"]
        command += ["--model", str(checkpoint), "--engine", "eager", "--rate-limit", "0"]
        # A fresh prompt as long as turn 12's is one message of 15,000 words.
        command += ["--max-message-chars", "200000", "--max-input-tokens", "8000"]
        command += ["--port", str(self.port), *args]
        self.log = open(log, "w")
        self.process = subprocess.Popen(command, cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT)
        body = wait_until_ready(self.url, timeout=180)
        assert body["status"] == "ok", body
        self.http = httpx.Client(base_url=self.url, timeout=300)

    def close(self) -> None:
        self.http.close()
        self.process.terminate()
        self.process.wait(20)
        self.log.close()

    def prompt_tokens(self) -> tuple[float, float]:
        """(prefilled, reused) prompt tokens so far, from /metrics."""
        from prometheus_client.parser import text_string_to_metric_families

        values = {}
        for family in text_string_to_metric_families(self.http.get("/metrics").text):
            for sample in family.samples:
                values[sample.name] = sample.value
        return values["orca_space_prompt_tokens_prefilled_total"], values[
            "orca_space_prompt_tokens_reused_total"
        ]

    def first_token(self, messages: list[dict], model: str) -> tuple[float, str, int]:
        """(ms to the first streamed text, the whole reply, prompt tokens) of one streamed request."""
        body = {
            "model": model, "messages": messages, "max_tokens": REPLY_TOKENS, "stream": True,
            "stream_options": {"include_usage": True}, **GREEDY,
        }  # fmt: skip
        started, first, text, prompt = time.perf_counter(), None, [], 0
        with self.http.stream("POST", "/v1/chat/completions", json=body) as response:
            assert response.status_code == 200, response.read()
            for line in response.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if chunk.get("usage"):
                    prompt = chunk["usage"]["prompt_tokens"]
                for choice in chunk.get("choices", []):
                    if choice["delta"].get("content"):
                        first = first or time.perf_counter()
                        text.append(choice["delta"]["content"])
        assert first is not None, "the reply had no text"
        return (first - started) * 1e3, "".join(text), prompt


# -- 1) first token per turn, through /v1 --


def fresh_message(encoder, rng: random.Random, prompt_tokens: int) -> str:
    """A one-message conversation whose prompt has about `prompt_tokens` tokens."""
    text = ""
    while len(encoder.encode_chat([{"role": "user", "content": text}])) < prompt_tokens:
        text += " " + words(rng, 10)
    return text.strip()


def conversation_turns(app: App, encoder, model: str, turns: int, seed: int = 0) -> list[dict]:
    rng, fresh_rng = random.Random(1 + 10 * seed), random.Random(2 + 10 * seed)
    messages: list[dict] = []
    app.first_token([{"role": "user", "content": words(rng, 50)}], model)  # warm-up
    rows = []
    for turn in range(1, turns + 1):
        messages.append({"role": "user", "content": words(rng, 220)})
        before = app.prompt_tokens()
        continued_ms, reply, prompt = app.first_token(messages, model)
        after = app.prompt_tokens()
        messages.append({"role": "assistant", "content": reply})
        fresh = [{"role": "user", "content": fresh_message(encoder, fresh_rng, prompt)}]
        fresh_ms, _, fresh_prompt = app.first_token(fresh, model)
        rows.append(
            {
                "turn": turn,
                "prompt_tokens": prompt,
                "reused_tokens": after[1] - before[1],
                "continued_first_token_ms": round(continued_ms, 1),
                "fresh_prompt_tokens": fresh_prompt,
                "fresh_first_token_ms": round(fresh_ms, 1),
            }
        )
        print(rows[-1], flush=True)
    return rows


# -- 2) a conversation past the context, through the chat service --


def long_conversation(checkpoint: Path, turns: int, headroom: float) -> list[dict]:
    """The page's path without the browser: `ChatService.prepare` (history fitting, unanswered
    turns left out) and `stream`, scoped to one visitor, on the eager engine in this process."""
    import asyncio

    from orca_space import history
    from orca_space.settings import parse_settings
    from orca_space.startup import start_runtime

    settings = parse_settings(
        ["--model", str(checkpoint), "--engine", "eager", "--context-length", "2048"], {}
    )
    runtime = start_runtime(settings)
    while runtime.service is None:
        assert not runtime.status.failed, runtime.status.message
        time.sleep(0.1)
    saved, history.HEADROOM = history.HEADROOM, headroom
    rng, past, rows = random.Random(3), [], []
    raw = {"max_new_tokens": REPLY_TOKENS, **GREEDY}
    try:
        for turn in range(1, turns + 1):
            message = words(rng, 70)
            chat = runtime.service.prepare(message, past, "", raw)
            before = runtime.engine.stats()

            async def reply() -> str:
                return [r async for r in runtime.service.stream(chat, cache_scope="visitor")][-1].text

            text = asyncio.run(reply())
            after = runtime.engine.stats()
            reused = after.prompt_tokens_reused - before.prompt_tokens_reused
            prompt = reused + after.prompt_tokens_prefilled - before.prompt_tokens_prefilled
            rows.append(
                {
                    "turn": turn,
                    "prompt_tokens": prompt,
                    "dropped_turns": chat.dropped_turns,
                    "reused_share": reused / prompt,
                }
            )
            past += [{"role": "user", "content": message}, {"role": "assistant", "content": text}]
    finally:
        history.HEADROOM = saved
        runtime.engine.close()
    return rows


def per_turn_medians(runs: list[list[dict]]) -> list[dict]:
    """Each turn's figures, the median over conversations (the machine's noise is large)."""
    return [
        {key: statistics.median(run[index][key] for run in runs) for key in runs[0][index]}
        for index in range(len(runs[0]))
    ]


def summary(rows: list[dict]) -> dict:
    shares = [row["reused_share"] for row in rows]
    full = [row for row in rows if row["turn"] > 15] or rows  # past the context by then
    return {
        "median_reused_share": statistics.median(shares),
        "turns_reusing_over_half": sum(share > 0.5 for share in shares),
        "median_reused_share_past_the_context": statistics.median(r["reused_share"] for r in full),
        "prompt_tokens_reused_share": sum(r["reused_share"] * r["prompt_tokens"] for r in rows)
        / sum(r["prompt_tokens"] for r in rows),
    }


def main() -> None:
    if sys.argv[1:2] == ["--serve"]:
        return serve(sys.argv[2:])
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    today = datetime.date.today().isoformat()
    parser.add_argument(
        "--out", type=Path, default=ROOT / "bench" / "results" / f"{today}-multiturn-cpu.json"
    )
    parser.add_argument("--turns", type=int, default=12)
    parser.add_argument("--long-turns", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=3, help="conversations per mode through /v1")
    parser.add_argument("--parts", nargs="+", default=["v1", "chat"], choices=["v1", "chat"])
    parser.add_argument("--size", default="small", choices=["small", "wide"], help="see small_model.py")
    args = parser.parse_args()
    from small_model import write_small_checkpoint

    from orca_space.chatml import ChatEncoder
    from orca_space.loading import load_tokenizer

    work = Path(tempfile.mkdtemp(prefix="multiturn-"))
    checkpoint = write_small_checkpoint(work / args.size, size=args.size)
    encoder = ChatEncoder(load_tokenizer(checkpoint))
    model = str(checkpoint)
    results: dict = {
        "date": today,
        "device": "cpu",
        "model": f"{args.size} random-weight Mistral (bench/small_model.py)",
    }
    modes = ("off", "private") if "v1" in args.parts else ()
    apps = {mode: App(checkpoint, "--prefix-cache", mode, log=work / f"v1-{mode}.log") for mode in modes}
    try:  # both apps up at once, their conversations interleaved: the machine's load hits both alike
        runs: dict[str, list] = {mode: [] for mode in modes}
        for seed in range(args.repeats):
            for mode in modes:
                runs[mode].append(conversation_turns(apps[mode], encoder, model, args.turns, seed))
        for mode in modes:
            results[f"v1_prefix_cache_{mode}"] = {
                "median_per_turn": per_turn_medians(runs[mode]),
                "runs": runs[mode],
            }
        args.out.write_text(json.dumps(results, indent=2) + "\n")
    finally:
        for app in apps.values():
            app.close()
    from orca_space.history import HEADROOM

    for name, headroom in (("steps", HEADROOM), ("one_turn_at_a_time", 0.0)) if "chat" in args.parts else ():
        rows = long_conversation(checkpoint, args.long_turns, headroom)
        results[f"chat_2048_context_{name}"] = {"summary": summary(rows), "turns": rows}
        print(name, results[f"chat_2048_context_{name}"]["summary"], flush=True)
        args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
