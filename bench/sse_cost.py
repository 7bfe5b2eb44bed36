"""What one server-sent event of /v1/chat/completions costs the server, in CPU.

Serves the real OpenAI route (uvicorn, in a child process) over a backend that yields tokens as
fast as it can, and streams the same replies twice: with the chat's coalescing (at most one
event per 50 ms) and with none (one event per token). The difference in the server process's
CPU time, over the difference in events, is the cost of an event: what coalescing saves.

    python bench/sse_cost.py [--tokens 2000] [--requests 20]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def serve(port: int, interval: float, checkpoint: str) -> None:
    import uvicorn
    from fastapi import FastAPI

    from orca_space.chat import ChatLimits, ChatService
    from orca_space.chatml import ChatEncoder
    from orca_space.loading import load_tokenizer
    from orca_space.replies import ReplyDelta
    from orca_space.runtime import ChatRuntime
    from orca_space.web.admission import Admission
    from orca_space.web.api.openai_api import OpenAIApi

    class FastBackend:
        async def stream_reply(self, messages, params, notify=None, cache_scope=None):
            for _ in range(params.max_new_tokens):
                yield ReplyDelta(" tok", tokens=1)
                await asyncio.sleep(0)  # let the event loop write, as the engine's queue does
            yield ReplyDelta(finish_reason="length")

    runtime = ChatRuntime(model_name="m", context_length=8192)
    encoder = ChatEncoder(load_tokenizer(checkpoint))
    runtime.service = ChatService(FastBackend(), encoder, ChatLimits(update_interval_s=interval))
    runtime.status.update("ready", "Ready.")
    app = FastAPI(routes=OpenAIApi(Admission(runtime, max_queue=64), "m").routes())
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def measure(interval: float, tokens: int, requests: int, checkpoint: str, port: int) -> dict:
    args = [
        sys.executable,
        __file__,
        "--serve",
        str(port),
        "--interval",
        str(interval),
        "--checkpoint",
        checkpoint,
    ]
    server = subprocess.Popen(args)
    try:
        url = f"http://127.0.0.1:{port}/v1/chat/completions"
        for _ in range(100):
            try:
                httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=1)
                break
            except httpx.HTTPError:
                time.sleep(0.1)
        body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": tokens, "stream": True}
        events, started, wall = 0, cpu_seconds(server.pid), time.perf_counter()
        for _ in range(requests):
            with httpx.stream("POST", url, json=body, timeout=60) as response:
                events += sum(1 for line in response.iter_lines() if line.startswith("data: {"))
        return {
            "interval_s": interval,
            "events": events,
            "server_cpu_s": round(cpu_seconds(server.pid) - started, 3),
            "wall_s": round(time.perf_counter() - wall, 3),
        }
    finally:
        server.terminate()
        server.wait(10)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=2000)
    parser.add_argument("--requests", type=int, default=20)
    parser.add_argument("--serve", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--interval", type=float, default=0.05, help=argparse.SUPPRESS)
    parser.add_argument("--checkpoint", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        return serve(args.serve, args.interval, args.checkpoint)
    from orca_space.tiny import write_tiny_checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = str(write_tiny_checkpoint(Path(tmp) / "tiny"))
        runs = [
            measure(i, args.tokens, args.requests, checkpoint, 7990 + n) for n, i in enumerate((0.05, 0.0))
        ]
    coalesced, every = runs
    per_event = (every["server_cpu_s"] - coalesced["server_cpu_s"]) / (every["events"] - coalesced["events"])
    print(json.dumps({"runs": runs, "server_cpu_us_per_event": round(per_event * 1e6, 1)}, indent=2))


if __name__ == "__main__":
    main()
