"""Stress a running app on loopback: hostile inputs, concurrent sessions, cancels, queue overflow.

    python bench/stress.py --url http://127.0.0.1:7860 [--size small|large] [--out stress.json]
    python bench/stress.py --spawn --model DIR --app-arg=--rate-limit=0 [--size small|large]

With --spawn it starts `app.py` itself. All traffic comes from one address, so an app that
rate-limits per address must run with its limit off (`--rate-limit 0`) for the sessions,
cancels and overflow phases to mean anything; requests it refuses as "too many" are counted
as `rate_limited` (and as failures).

Traffic goes to loopback only (any other host is refused), every loop is bounded and the whole
run has a time budget, so it stops by itself. It prints figures and, with --out, writes them as
JSON. The exit status is 0 only when there were no crashes (the app died or stopped answering
/healthz), no failures (a request that should have worked did not, or a session saw another's
conversation) and no leaked requests (generation still running after its caller cancelled).

Phases, in order:
1) bad inputs: fuzzed /call/chat payloads (NaN, infinities, wrong types, wrong arity, huge and
   malformed bodies); each must end in an error event or a 4xx, and the app must stay up.
2) sessions: N gradio_client sessions chat a few greedy turns at once, each with its own token
   in every message; each reply must arrive, and equal a solo replay of that exact conversation.
3) cancels: start a long reply, cancel after its first chunk, many times in a row (and the same
   by closing a REST stream); /healthz must show the engine idle within 5 s.
4) overflow: with the engine busy, fill gradio's queue, then send a burst more; count the
   immediate "queue is full" answers and how fast they come; then the app must recover.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import random
import secrets
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.parse
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

# Before gradio_client is imported: no telemetry to huggingface.co, no proxies for loopback.
os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["NO_PROXY"] = os.environ["no_proxy"] = "127.0.0.1,localhost,::1"

import httpx  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
PARAMS = {"max_new_tokens": 8, "temperature": 0.0, "top_p": 0.95, "top_k": 40, "repetition_penalty": 1.0}
IDLE_DEADLINE_S = 5.0  # a cancelled generation must be gone from /healthz within this (a leaked
# 4,000-token reply runs far longer); how long it took is reported as idle_after_ms
ANSWER_DEADLINE_S = 60.0  # any single request must end within this
MAX_FILL = 512  # at most this many requests to find the queue's limit


@dataclass(frozen=True)
class Size:
    bad_inputs: int  # fuzzed payloads, on top of the fixed list
    sessions: int
    turns: int
    reply_tokens: int
    cancels: int
    disconnects: int
    burst: int  # requests sent at once into a full queue
    budget_s: float  # the whole run stops by then


SIZES = {
    "small": Size(
        bad_inputs=24, sessions=4, turns=2, reply_tokens=8, cancels=5, disconnects=3, burst=8, budget_s=90
    ),
    "large": Size(
        bad_inputs=200,
        sessions=16,
        turns=3,
        reply_tokens=16,
        cancels=20,
        disconnects=10,
        burst=32,
        budget_s=480,
    ),
}


# -- small helpers -------------------------------------------------------------------------------


def require_loopback(url: str) -> None:
    host = urllib.parse.urlsplit(url).hostname or ""
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(host, None)}
    except socket.gaierror as exc:
        raise SystemExit(f"cannot resolve {host!r}: {exc}") from None
    if not addresses or not all(ipaddress.ip_address(a.split("%")[0]).is_loopback for a in addresses):
        raise SystemExit(f"refusing to stress {url}: only loopback addresses are allowed")


def millis(seconds: float) -> float:
    return round(seconds * 1000, 1)


def summary_ms(samples: list[float]) -> dict:
    if not samples:
        return {"n": 0}
    ordered = sorted(samples)
    return {
        "n": len(ordered),
        "median": millis(statistics.median(ordered)),
        "p95": millis(ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))]),
        "max": millis(ordered[-1]),
    }


class Budget:
    def __init__(self, seconds: float) -> None:
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return self.end - time.monotonic()

    def deadline(self, seconds: float) -> float:
        """A deadline `seconds` from now, but never past the run's end."""
        return min(time.monotonic() + seconds, self.end)


class App:
    """Raw HTTP to the app: /healthz, gradio's REST call API, and its cancel route."""

    def __init__(self, url: str) -> None:
        self.url = url.rstrip("/")
        self.http = httpx.Client(
            base_url=self.url,
            timeout=httpx.Timeout(30.0, connect=5.0),
            trust_env=False,
            limits=httpx.Limits(max_connections=128, max_keepalive_connections=32),
        )
        config = self.http.get("/config").json()
        self.chat_fn = next(d["id"] for d in config["dependencies"] if d.get("api_name") == "chat")

    def health(self, timeout: float = 5.0) -> dict | None:
        try:
            response = self.http.get("/healthz", timeout=timeout)
            return response.json() if response.status_code == 200 else None
        except (httpx.HTTPError, ValueError):
            return None

    def post_chat(self, body: str | bytes) -> httpx.Response:
        return self.http.post(
            "/gradio_api/call/chat", content=body, headers={"content-type": "application/json"}
        )

    def read_final(
        self, event_id: str, deadline: float, stop_after_first: bool = False
    ) -> tuple[str, object]:
        """Follow one call's event stream: ("complete"|"error"|"generating"|"timeout"|"closed", data)."""
        name = None
        try:
            timeout = httpx.Timeout(max(0.1, deadline - time.monotonic()), connect=5.0)
            with self.http.stream("GET", f"/gradio_api/call/chat/{event_id}", timeout=timeout) as stream:
                for line in stream.iter_lines():
                    if time.monotonic() > deadline:
                        return "timeout", None
                    if line.startswith("event:"):
                        name = line[6:].strip()
                    elif line.startswith("data:") and name in ("complete", "error", "generating"):
                        data = json.loads(line[5:])
                        if name != "generating" or stop_after_first:
                            return name, data  # leaving the block closes the stream
        except httpx.TimeoutException:
            return "timeout", None
        except httpx.HTTPError as exc:
            return "closed", str(exc)
        return "closed", None

    def cancel(self, event_id: str) -> None:
        # A REST call's session is its own event id.
        self.http.post(
            "/gradio_api/cancel",
            json={"event_id": event_id, "session_hash": event_id, "fn_index": self.chat_fn},
        )

    def wait_idle(self, deadline: float) -> dict | None:
        """Poll /healthz until nothing is active or queued; the last body (None if it stopped answering)."""
        body = self.health()
        while body is not None and (body["active"] or body["queued"]) and time.monotonic() < deadline:
            time.sleep(0.05)
            body = self.health()
        return body


def chat_body(message: object = "hi", system: object = "You are a test.", **params) -> str:
    values = [message, system, *{**PARAMS, **params}.values()]
    return json.dumps({"data": values})


class Watchdog:
    """Polls /healthz in the background; an incident is each time it stops answering "ok"."""

    def __init__(self, app: App, proc: subprocess.Popen | None, interval: float = 0.25) -> None:
        self.app, self.proc, self.interval = app, proc, interval
        self.polls = self.down_polls = self.incidents = 0
        self.slowest = 0.0
        self.notes: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="watchdog", daemon=True)

    def __enter__(self) -> Watchdog:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(10)

    def _run(self) -> None:
        down = False
        while not self._stop.wait(self.interval):
            started = time.monotonic()
            body = self.app.health(timeout=5.0)
            self.slowest = max(self.slowest, time.monotonic() - started)
            self.polls += 1
            dead = self.proc is not None and self.proc.poll() is not None
            ok = body is not None and body.get("status") == "ok" and not dead
            if not ok:
                self.down_polls += 1
                if not down:
                    self.incidents += 1
                    self.notes.append(f"at {time.strftime('%H:%M:%S')}: {'exited' if dead else body}")
            down = not ok
            if dead:
                return

    def figures(self) -> dict:
        return {
            "polls": self.polls,
            "down_polls": self.down_polls,
            "incidents": self.incidents,
            "slowest_healthz_ms": millis(self.slowest),
            "notes": self.notes[:5],
        }


# -- 1) bad inputs ---------------------------------------------------------------------------------

# Raw JSON fragments that are wrong for a number slot and for a text slot.
BAD_NUMBERS = (
    'NaN Infinity -Infinity 1e400 -1e308 1e308 -1 "0.5" "" null true false [] [1] {} {"value":1}'.split()
)
BAD_NUMBERS.append("1" + "0" * 400)  # no float holds it
BAD_TEXTS = [
    '""',
    '"   "',
    '"a\\u0000b"',
    "null",
    json.dumps("x" * 16_001),
    json.dumps("y" * (1 << 20)),
    "5",
    '{"text": "hi"}',
    '["hi"]',
]  # the last three: not text at all
BAD_BY_SLOT = {
    "max_new_tokens": BAD_NUMBERS + ["0", "4097", "2.5"],
    "temperature": BAD_NUMBERS + ["2.01", "-0.01"],
    "top_p": BAD_NUMBERS + ["0", "1.01"],
    "top_k": BAD_NUMBERS + ["0.5", "1001"],
    "repetition_penalty": BAD_NUMBERS + ["0.99", "2.5"],
    "message": BAD_TEXTS,
    "system": ['"a\\u0000b"', "null", json.dumps("z" * 8_001)],
}
SLOTS = ["message", "system", *PARAMS]
GOOD_FRAGMENTS = dict(zip(SLOTS, [json.dumps(v) for v in ["hi", "You are a test.", *PARAMS.values()]]))
FIXED_BAD_BODIES = [
    "not json",
    "{}",
    '{"data": "hi"}',
    '{"data": [1, 2',
    '{"data": []}',
    '{"data": null}',
    "[" * 10_000 + "]" * 10_000,  # deep nesting
    '{"data": ["hi", "sys", 4, 0.0, 0.95, 40]}',  # one short
    '{"data": ["hi", "sys", 4, 0.0, 0.95, 40, 1.0, 5, 6, 7]}',  # three extra
]


def fuzzed_bodies(count: int, rng: random.Random) -> list[str]:
    bodies = []
    for _ in range(count):
        fragments = dict(GOOD_FRAGMENTS)
        for slot in rng.sample(SLOTS, rng.randint(1, 3)):
            fragments[slot] = rng.choice(BAD_BY_SLOT[slot])
        bodies.append('{"data": [' + ", ".join(fragments[s] for s in SLOTS) + "]}")
    return bodies


def run_bad_inputs(app: App, size: Size, budget: Budget, rng: random.Random) -> dict:
    bodies = FIXED_BAD_BODIES + fuzzed_bodies(size.bad_inputs, rng)
    counts = {
        "tried": 0,
        "skipped": 0,
        "refused_4xx": 0,
        "error_events": 0,
        "unnamed_errors": 0,
        "accepted": 0,
        "unanswered": 0,
        "server_errors": 0,
    }
    examples: dict[str, list[str]] = {"accepted": [], "unnamed_errors": []}

    def one(body: str) -> tuple[str, str]:
        if budget.left() < 5:
            return "skipped", ""
        deadline = budget.deadline(ANSWER_DEADLINE_S)
        try:
            response = app.post_chat(body)
        except httpx.HTTPError as exc:
            return "unanswered", str(exc)
        if 400 <= response.status_code < 500:
            return "refused_4xx", ""
        if response.status_code != 200:
            return "server_errors", response.text[:100]
        name, data = app.read_final(response.json()["event_id"], deadline)
        if name == "error":
            named = isinstance(data, dict) and data.get("error")
            return ("error_events", "") if named else ("unnamed_errors", body[:160])
        if name == "complete":
            return "accepted", body[:160]
        return "unanswered", name

    with ThreadPoolExecutor(max_workers=8) as pool:
        for kind, detail in pool.map(one, bodies):
            counts[kind] += 1
            counts["tried"] += kind != "skipped"
            if kind in ("accepted", "unnamed_errors"):
                examples[kind].append(detail)
    # Every bad input must fail visibly; one taken as text, or failing without saying why, is a
    # finding (listed) but not a failure.
    return {
        **counts,
        "accepted_examples": sorted(set(examples["accepted"]))[:8],
        "unnamed_examples": sorted(set(examples["unnamed_errors"]), key=len)[:8],
        "failures": counts["unanswered"] + counts["server_errors"],
    }


# -- 2) concurrent sessions -------------------------------------------------------------------------


@dataclass
class Session:
    token: str
    system: str
    messages: list[str]
    replies: list[str] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)
    error: str | None = None


def new_client(url: str):
    from gradio_client import Client

    return Client(url, verbose=False, download_files=False, httpx_kwargs={"trust_env": False})


def is_rate_limited(error: object) -> bool:
    return "too many" in str(error).lower()


def wait_job(job, deadline: float) -> bool:
    """Poll with a deadline: a gradio_client job can hang on values it cannot send."""
    while not job.done():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def chat_turns(url: str, session: Session, reply_tokens: int, budget: Budget, clients: list) -> Session:
    """Chat the session's turns in one gradio_client session (server-side history)."""
    try:
        client = new_client(url)
        clients.append(client)
        for message in session.messages:
            started = time.monotonic()
            job = client.submit(
                message, session.system, reply_tokens, *list(PARAMS.values())[1:], api_name="/chat"
            )
            if not wait_job(job, budget.deadline(ANSWER_DEADLINE_S)):
                job.cancel()
                session.error = f"turn {len(session.replies) + 1} got no answer in time"
                return session
            status = job.status()
            if not status.success:
                session.error = f"turn {len(session.replies) + 1} failed: {job.exception() or status}"
                return session
            outputs = job.outputs()
            session.replies.append(outputs[-1] if outputs else "")
            session.latencies.append(time.monotonic() - started)
    except Exception as exc:  # a client-side failure is a failed session, not a crashed run
        session.error = f"{type(exc).__name__}: {exc}"
    return session


def run_sessions(app: App, size: Size, budget: Budget) -> dict:
    sessions = []
    for _ in range(size.sessions):
        token = secrets.token_hex(4)
        sessions.append(
            Session(
                token=token,
                system=f"You are assistant {token}. Only session {token} may see this.",
                messages=[
                    f"Session {token}, turn {t}: what does {token} mean?" for t in range(1, size.turns + 1)
                ],
            )
        )
    clients: list = []
    started = time.monotonic()
    with ThreadPoolExecutor(max_workers=size.sessions) as pool:
        done = list(pool.map(lambda s: chat_turns(app.url, s, size.reply_tokens, budget, clients), sessions))
    concurrent_s = time.monotonic() - started
    # Solo replays, one at a time: a greedy reply depends only on its own conversation, so any
    # difference means a session's prompt held something else (another session's turns).
    mismatches, compared, replay_errors = [], 0, 0
    for session in done:
        if session.error or budget.left() < 10:
            continue
        solo = chat_turns(
            app.url,
            Session(session.token, session.system, session.messages),
            size.reply_tokens,
            budget,
            clients,
        )
        if solo.error:
            replay_errors += 1
            continue
        for turn, (seen, alone) in enumerate(zip(session.replies, solo.replies), start=1):
            compared += 1
            if seen != alone:
                mismatches.append(
                    {"session": session.token, "turn": turn, "concurrent": seen[:80], "solo": alone[:80]}
                )
    with ThreadPoolExecutor(max_workers=max(1, len(clients))) as pool:  # each close waits ~1 s
        list(pool.map(lambda c: c.close(), clients))
    failed = [s for s in done if s.error]
    latencies = [x for s in done for x in s.latencies]
    return {
        "sessions": size.sessions,
        "turns": size.turns,
        "requests": sum(len(s.replies) for s in done) + len(failed),
        "succeeded": sum(len(s.replies) for s in done),
        "failed": len(failed),
        "errors": [f"{s.token}: {s.error}" for s in failed][:5],
        "empty_replies": sum(r == "" for s in done for r in s.replies),
        "compared_with_solo": compared,
        "mismatches": len(mismatches),
        "mismatch_examples": mismatches[:3],
        "replay_errors": replay_errors,
        "latency_ms": summary_ms(latencies),
        "concurrent_wall_s": round(concurrent_s, 2),
        "rate_limited": sum(is_rate_limited(s.error) for s in failed),
        "failures": len(failed) + len(mismatches) + replay_errors,
    }


# -- 3) cancels -----------------------------------------------------------------------------------

LONG = {"max_new_tokens": 4000, "temperature": 1.0, "top_p": 1.0, "top_k": 0, "repetition_penalty": 1.0}
# Greedy: a sampled reply can meet <|im_end|> early (a few percent of runs lose a blocker that
# way). Greedy decoding of the blockers' prompt on the tiny model runs all 4,000 tokens.
HOLD = {**LONG, "temperature": 0.0}


def run_cancels(app: App, size: Size, budget: Budget) -> dict:
    figures = {
        "cancels": 0,
        "ended_before_first_chunk": 0,
        "hung": 0,
        "disconnects": 0,
        "first_chunk_ms": [],
        "errors": [],
    }
    client = new_client(app.url)
    try:
        # 1) gradio_client: the page's stop button takes the same route (POST /cancel).
        for _ in range(size.cancels):
            if budget.left() < 15:
                break
            started = time.monotonic()
            job = client.submit(
                "Write a very long story about the sea.",
                "You are a storyteller.",
                *LONG.values(),
                api_name="/chat",
            )
            deadline = budget.deadline(30)
            while not job.outputs() and not job.done() and time.monotonic() < deadline:
                time.sleep(0.01)
            if not job.outputs():
                figures["ended_before_first_chunk"] += 1
                if not job.done():
                    figures["errors"].append("no first chunk within 30 s")
                elif not job.status().success:
                    figures["errors"].append(f"failed before its first chunk: {job.exception()}")
                job.cancel()
                continue
            figures["first_chunk_ms"].append(time.monotonic() - started)
            job.cancel()
            figures["cancels"] += 1
            if not wait_job(job, budget.deadline(10)):
                figures["hung"] += 1
        # 2) REST: close the event stream after the first chunk (a closed tab, a dropped client).
        for _ in range(size.disconnects):
            if budget.left() < 15:
                break
            response = app.post_chat(chat_body("Write a very long story.", **LONG))
            name, data = app.read_final(
                response.json()["event_id"], budget.deadline(30), stop_after_first=True
            )
            if name != "generating":
                figures["errors"].append(f"disconnect: first event was {name}: {str(data)[:100]}")
            figures["disconnects"] += 1
        # 3) everything cancelled must be gone from the engine within IDLE_DEADLINE_S.
        stopped = time.monotonic()
        body = app.wait_idle(stopped + IDLE_DEADLINE_S)
        figures["idle_after_ms"] = millis(time.monotonic() - stopped)
        leaked = 1 if body is None else body["active"] + body["queued"]
        # 4) and the next request works.
        job = client.submit("Still there?", "You are a test.", *PARAMS.values(), api_name="/chat")
        next_ok = wait_job(job, budget.deadline(ANSWER_DEADLINE_S)) and job.status().success
    finally:
        client.close()
    first = summary_ms(figures.pop("first_chunk_ms"))
    return {
        **figures,
        "first_chunk_ms": first,
        "leaked": leaked,
        "next_request_ok": bool(next_ok),
        "failures": figures["hung"] + len(figures["errors"]) + (not next_ok),
    }


# -- 4) overflow -------------------------------------------------------------------------------------


def classify_rejection(response: httpx.Response) -> str:
    text = response.text.lower()
    if response.status_code == 503 and "queue is full" in text:
        return "busy"
    return f"other:{response.status_code}:{response.text[:80]}"


def run_overflow(app: App, size: Size, budget: Budget) -> dict:
    figures: dict = {
        "queue_accepted": 0,
        "burst": 0,
        "busy": 0,
        "accepted_in_burst": 0,
        "other_rejections": {},
    }
    accepted: list[str] = []
    stop_blocker = threading.Event()

    def block() -> None:
        # A long generation that holds a slot while the queue fills; leaving closes the stream.
        response = app.post_chat(chat_body("Write a very long story.", **HOLD))
        if response.status_code != 200:
            return
        deadline = budget.deadline(120)
        try:
            with app.http.stream(
                "GET", f"/gradio_api/call/chat/{response.json()['event_id']}", timeout=httpx.Timeout(5.0)
            ) as stream:
                for _ in stream.iter_lines():
                    if stop_blocker.is_set() or time.monotonic() > deadline:
                        return
        except httpx.HTTPError:
            return

    # One blocker per slot the engine has, so that every further request has to wait in the queue.
    capacity = min(max(1, (app.health() or {}).get("capacity", 1)), 64)
    blockers = [threading.Thread(target=block, name=f"blocker-{i}", daemon=True) for i in range(capacity)]
    for blocker in blockers:
        blocker.start()
    figures["blockers"] = capacity
    try:
        deadline = budget.deadline(30)
        while (app.health() or {}).get("active", 0) < capacity and time.monotonic() < deadline:
            time.sleep(0.02)
        # 1) fill the queue one request at a time (1 new token each, should any run).
        first_rejection = None
        for _ in range(MAX_FILL):
            response = app.post_chat(chat_body("x", max_new_tokens=1))
            if response.status_code != 200:
                first_rejection = classify_rejection(response)
                break
            accepted.append(response.json()["event_id"])
        figures["queue_accepted"] = len(accepted)
        figures["first_rejection"] = first_rejection
        figures["queue_limit_found"] = first_rejection is not None

        # 2) a burst into the full queue: each should be refused at once.
        def one(_: int) -> tuple[float, httpx.Response]:
            started = time.monotonic()
            response = app.post_chat(chat_body("x", max_new_tokens=1))
            return time.monotonic() - started, response

        busy_times, refused_times = [], []
        with ThreadPoolExecutor(max_workers=8) as pool:
            for elapsed, response in pool.map(one, range(size.burst)):
                figures["burst"] += 1
                if response.status_code == 200:
                    figures["accepted_in_burst"] += 1
                    accepted.append(response.json()["event_id"])
                    continue
                refused_times.append(elapsed)
                if (kind := classify_rejection(response)) == "busy":
                    figures["busy"] += 1
                    busy_times.append(elapsed)
                else:  # e.g. a rate limit: still an immediate answer, counted apart
                    figures["other_rejections"][kind] = figures["other_rejections"].get(kind, 0) + 1
        figures["busy_ms"] = summary_ms(busy_times)
        figures["refused_ms"] = summary_ms(refused_times)
    finally:
        # 3) clean up: drop what waits, stop the blocker, and the app must serve again.
        started = time.monotonic()
        for event_id in accepted:
            try:
                app.cancel(event_id)
            except httpx.HTTPError:
                pass
        stop_blocker.set()
        for blocker in blockers:
            blocker.join(10)
    body = app.wait_idle(budget.deadline(30))
    response = app.post_chat(chat_body("Back to normal?"))
    name = (
        app.read_final(response.json()["event_id"], budget.deadline(ANSWER_DEADLINE_S))[0]
        if response.status_code == 200
        else f"http {response.status_code}"
    )
    figures["recovered_s"] = round(time.monotonic() - started, 2)
    figures["next_request_ok"] = name == "complete"
    figures["failures"] = (name != "complete") + (body is None) + (not figures["queue_limit_found"])
    return figures


# -- running it ----------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn_app(model: str | None, extra: list[str], log_path: Path | None) -> tuple[subprocess.Popen, str]:
    port = free_port()
    args = ["--model", model] if model else ["--demo"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    log = open(log_path, "w") if log_path else subprocess.DEVNULL
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "app.py"), "--host", "127.0.0.1", "--port", str(port), *args, *extra],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    return proc, f"http://127.0.0.1:{port}"


def wait_ready(url: str, proc: subprocess.Popen | None, timeout: float = 180.0) -> None:
    deadline = time.monotonic() + timeout
    with httpx.Client(trust_env=False, timeout=2.0) as http:
        while time.monotonic() < deadline:
            if proc is not None and proc.poll() is not None:
                raise SystemExit(f"the app exited with {proc.returncode} before it was ready")
            try:
                body = http.get(f"{url}/healthz").json()
                if body.get("status") == "ok":
                    return
                if body.get("status") == "error":
                    raise SystemExit(f"the app failed to start: {body}")
            except (httpx.HTTPError, ValueError):
                pass
            time.sleep(0.25)
    raise SystemExit(f"{url} was not ready within {timeout:.0f}s")


PHASES = ("bad_inputs", "sessions", "cancels", "overflow")


def run(url: str, size: Size, proc: subprocess.Popen | None, seed: int, phases=PHASES) -> dict:
    require_loopback(url)
    budget = Budget(size.budget_s)
    app = App(url)
    started = time.monotonic()
    results: dict = {"url": url, "size": asdict(size), "seed": seed}
    with Watchdog(app, proc) as watchdog:
        steps = {
            "bad_inputs": lambda: run_bad_inputs(app, size, budget, random.Random(seed)),
            "sessions": lambda: run_sessions(app, size, budget),
            "cancels": lambda: run_cancels(app, size, budget),
            "overflow": lambda: run_overflow(app, size, budget),
        }
        skipped = []
        for name in phases:
            if budget.left() < 15:
                skipped.append(name)
                continue
            phase_started = time.monotonic()
            results[name] = steps[name]()
            results[name]["wall_s"] = round(time.monotonic() - phase_started, 2)
            print_phase(name, results[name])
        final = app.health()
    results["watchdog"] = watchdog.figures()
    results["skipped_phases"] = skipped
    results["crashes"] = watchdog.incidents + (final is None or final.get("status") != "ok")
    results["failures"] = sum(results[p]["failures"] for p in phases if p in results) + len(skipped)
    results["leaked"] = results.get("cancels", {}).get("leaked", 0)
    results["duration_s"] = round(time.monotonic() - started, 2)
    return results


def print_phase(name: str, figures: dict) -> None:
    shown = {k: v for k, v in figures.items() if not k.endswith("examples") and k != "errors"}
    print(f"{name:>10}: " + ", ".join(f"{k}={v}" for k, v in shown.items()), flush=True)
    for key in ("errors", "accepted_examples", "unnamed_examples", "mismatch_examples"):
        for item in figures.get(key) or []:
            print(f"{'':>12}{key[:-1] if key.endswith('s') else key}: {str(item)[:160]}", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--url", help="base URL of a running app (loopback only)")
    target.add_argument("--spawn", action="store_true", help="start app.py on a free loopback port")
    parser.add_argument("--model", help="with --spawn: checkpoint directory (default: --demo)")
    parser.add_argument("--app-arg", action="append", default=[], help="with --spawn: extra app.py argument")
    parser.add_argument("--app-log", type=Path, help="with --spawn: write the app's output here")
    parser.add_argument("--size", choices=sorted(SIZES), default="small")
    parser.add_argument("--phase", action="append", choices=PHASES, help="run only these phases")
    parser.add_argument("--seed", type=int, default=0, help="seed for the fuzzed payloads")
    parser.add_argument("--out", type=Path, help="write the figures here as JSON")
    args = parser.parse_args(argv)
    size = SIZES[args.size]
    proc = None
    url = args.url
    if args.spawn:
        proc, url = spawn_app(args.model, args.app_arg, args.app_log)
    try:
        wait_ready(url, proc)
        results = run(url, size, proc, args.seed, tuple(args.phase or PHASES))
    finally:
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
    print(
        f"crashes={results['crashes']} failures={results['failures']} leaked={results['leaked']} "
        f"in {results['duration_s']}s",
        flush=True,
    )
    if "too many" in json.dumps(results).lower():
        print("note: the app rate-limited this run; start it with --rate-limit 0 to stress it", flush=True)
    if args.out:
        args.out.write_text(json.dumps(results, indent=2))
    return 0 if results["crashes"] == results["failures"] == results["leaked"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
