"""Forge many gradio sessions, each sent the largest history the page accepts, and watch the
server's memory (issue #27, item 2).

    python bench/forged_sessions.py [--model DIR] [--sessions 500] [--out result.json]

It starts `app.py` itself (`--demo`, or `--model DIR`) on loopback with `--trusted-proxy-hops 1`
and gives every forged session an X-Forwarded-For address of its own: the attacker of the issue,
with many addresses, so that the per-address limit on new sessions does not stop it and what is
measured is the memory bound alone. (A last phase sends 40 new sessions from one address
and counts those accepted: at most `--rate-limit`, 30, a minute.) Each forged session posts one history to the chatbot -> history sync that the page
calls after every turn (`/gradio_api/run/predict`, the step that keeps the chat in gr.State):
the largest one accepted, found first by growing it until the app refuses. A real chat (through
`gradio_client`'s /chat, from its own address) must answer before, every 100 sessions, and after.

It prints the app's resident memory (RSS, from /proc) after a first real chat and after the
forged sessions, and the growth, which must stay under 300 MB; the exit status is 0 only then
and if every real chat answered.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["NO_PROXY"] = os.environ["no_proxy"] = "127.0.0.1,localhost,::1"

import httpx  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from tests.helpers import chat_and_sync_ids, free_port, wait_until_ready  # noqa: E402

GROWTH_LIMIT_MB = 300
BODY_LIMIT = 4 << 20  # web/server.py's MAX_BODY_BYTES
PARAMS = (8, 0.0, 0.95, 40, 1.0)


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def history(messages: int, body_bytes: int) -> list[dict]:
    """`messages` alternating turns whose JSON is about `body_bytes`."""
    text = "x" * max(1, body_bytes // messages - 60)
    return [
        {"role": ("user", "assistant")[i % 2], "content": [{"type": "text", "text": text}]}
        for i in range(messages)
    ]


def post_sync(http: httpx.Client, sync_id: int, value: list, session: str, address: str) -> httpx.Response:
    body = {"data": [value], "fn_index": sync_id, "session_hash": session}
    return http.post("/gradio_api/run/predict", json=body, headers={"x-forwarded-for": address})


def largest_accepted(http: httpx.Client, sync_id: int) -> tuple[int, str]:
    """The most messages (under the body limit) the sync takes, and the refusal past it."""
    low, high, refusal = 1, 100_000, ""
    while low < high:  # the largest accepted count: accepted(low), refused(high + 1)
        middle = (low + high + 1) // 2
        answer = post_sync(http, sync_id, history(middle, BODY_LIMIT - 4096), f"probe-{middle}", "10.255.0.1")
        if answer.status_code == 200:
            low = middle
        else:
            high, refusal = middle - 1, answer.text[:300]
    return low, refusal


def real_chat(url: str, address: str) -> bool:
    from gradio_client import Client

    client = Client(url, verbose=False, headers={"x-forwarded-for": address})
    job = client.submit("Hello there", "You are a test.", *PARAMS, api_name="/chat")
    deadline = time.monotonic() + 120
    while not job.done():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return bool(job.status().success and job.outputs())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="a checkpoint directory (default: --demo)")
    parser.add_argument("--sessions", type=int, default=500)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)

    port = free_port()
    model = ["--model", args.model] if args.model else ["--demo"]
    command = [sys.executable, "app.py", *model, "--host", "127.0.0.1", "--port", str(port)]
    command += ["--trusted-proxy-hops", "1"]
    app = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    result: dict = {"command": " ".join(command), "sessions": args.sessions}
    try:
        wait_until_ready(url, timeout=600)
        with httpx.Client(base_url=url, timeout=120) as http:
            sync_id = chat_and_sync_ids(http)["sync"]
            chats = [real_chat(url, "10.254.0.1")]
            before = rss_mb(app.pid)
            messages, refusal = largest_accepted(http, sync_id)
            largest = history(messages, BODY_LIMIT - 4096)
            result.update(
                largest_messages=messages, largest_json_bytes=len(json.dumps(largest)), refusal=refusal
            )
            print(
                f"largest history accepted: {messages:,} messages, {result['largest_json_bytes']:,} bytes of JSON"
            )
            print(f"past it: {refusal}")
            print(f"RSS after a first real chat: {before:.0f} MB")

            def forge(index: int) -> int:
                address = f"10.{index >> 16 & 255}.{index >> 8 & 255}.{index & 255}"
                return post_sync(
                    http, sync_id, largest, f"forged-{secrets.token_hex(8)}", address
                ).status_code

            statuses: list[int] = []
            peak = before
            with ThreadPoolExecutor(args.workers) as pool:
                for start in range(0, args.sessions, 100):
                    statuses += pool.map(forge, range(start + 1, min(start + 100, args.sessions) + 1))
                    peak = max(peak, rss_mb(app.pid))
                    chats.append(real_chat(url, "10.254.0.2"))
                    print(
                        f"  {len(statuses)} sessions: RSS {rss_mb(app.pid):.0f} MB, real chat ok: {chats[-1]}"
                    )
            time.sleep(2)
            after = rss_mb(app.pid)
            chats.append(real_chat(url, "10.254.0.3"))
            # Small histories, so that the 40 fit in the limiter's minute even on a slow machine.
            small = history(2, 200)
            one_address = [
                post_sync(http, sync_id, small, f"same-{i}", "10.253.0.1").status_code for i in range(40)
            ]
        result.update(
            rss_before_mb=round(before),
            rss_after_mb=round(after),
            rss_peak_mb=round(peak),
            growth_mb=round(after - before),
            accepted=statuses.count(200),
            refused=len(statuses) - statuses.count(200),
            real_chats_answered=f"{sum(chats)}/{len(chats)}",
            one_address_accepted_of_40=one_address.count(200),
        )
    finally:
        app.terminate()
        app.wait(20)
    print(json.dumps(result, indent=2))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    ok = result["growth_mb"] < GROWTH_LIMIT_MB and all(chats)
    print(
        f"growth {result['growth_mb']} MB ({'under' if ok else 'NOT under'} {GROWTH_LIMIT_MB} MB or a chat failed)"
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
