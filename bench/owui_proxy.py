"""A loopback HTTP proxy that forwards to the Space and notes every request Open WebUI sends it.

The Space logs only refusals and ignored fields; what a client sent that was accepted, and the
status of each request, are seen here: method, path, status, the body's fields (which keys, whether
`max_tokens` is there, how many `tools`, the last message's role) and, for a 4xx/5xx, the answer.
Responses are passed through as they arrive (a streamed reply stays streamed); each response ends
by closing the connection, which every HTTP client reads as the end of the body.
"""

from __future__ import annotations

import http.client
import http.server
import json
import threading
import time
from dataclasses import dataclass, field

HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "content-length", "host"}
# Open WebUI's background tasks, told apart by the first line of their prompts' "### Task:"
TASK_MARKERS = {"title": "title", "tags": "tags", "follow_ups": "messages this user might"}


def classify(body: dict) -> str:
    messages = body.get("messages") or []
    last = messages[-1] if messages else {}
    if last.get("role") == "assistant":
        return "continue"
    text = last.get("content") if isinstance(last.get("content"), str) else ""
    if "### Task:" in (text or ""):
        task = text.split("### Task:", 1)[1].strip().splitlines()[0].lower()
        for kind, marker in TASK_MARKERS.items():
            if marker in task:
                return kind
        return "task: " + task[:60]
    return "chat"


def summarize(raw: bytes) -> dict:
    try:
        body = json.loads(raw)
    except ValueError:
        return {"body": raw[:200].decode("utf-8", "replace")}
    if not isinstance(body, dict):
        return {"body": str(body)[:200]}
    messages = body.get("messages") or []
    return {
        "kind": classify(body) if messages else "other",
        "fields": sorted(body),
        "max_tokens": body.get("max_tokens", body.get("max_completion_tokens", "absent")),
        "stream": body.get("stream"),
        "tools": len(body.get("tools") or []),
        "roles": [m.get("role") for m in messages if isinstance(m, dict)],
    }


def answer_content(raw: bytes) -> str:
    """The message text of a (non-streamed) chat completion, or the raw start if it is not one."""
    try:
        return json.loads(raw)["choices"][0]["message"]["content"][:300]
    except (ValueError, KeyError, IndexError, TypeError):
        return raw[:300].decode("utf-8", "replace")


class StreamTally:
    """What a streamed chat answer held: its content deltas, their characters, tool-call deltas
    and the finish reason, read from the SSE lines as they pass."""

    def __init__(self) -> None:
        self.pending = b""
        self.tally = {"content_deltas": 0, "content_chars": 0, "tool_call_deltas": 0, "finish_reason": None}

    def feed(self, chunk: bytes) -> None:
        self.pending += chunk
        *lines, self.pending = self.pending.split(b"\n")
        for line in lines:
            if not line.startswith(b"data: {"):
                continue
            try:
                choice = json.loads(line[6:])["choices"][0]
            except (ValueError, KeyError, IndexError):
                continue
            delta = choice.get("delta") or {}
            if delta.get("content"):
                self.tally["content_deltas"] += 1
                self.tally["content_chars"] += len(delta["content"])
            if delta.get("tool_calls"):
                self.tally["tool_call_deltas"] += 1
            self.tally["finish_reason"] = choice.get("finish_reason") or self.tally["finish_reason"]


@dataclass
class Seen:
    """The requests that went through, in order."""

    requests: list[dict] = field(default_factory=list)
    bodies: dict[str, bytes] = field(default_factory=dict)  # the last chat and continue request
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, entry: dict) -> None:
        with self.lock:
            self.requests.append(entry)

    def snapshot(self) -> list[dict]:
        with self.lock:
            return [dict(r) for r in self.requests]

    def finished(self, kind: str) -> list[dict]:
        return [r for r in self.snapshot() if r.get("kind") == kind and r["status"] is not None]

    def in_flight(self) -> list[dict]:
        return [r for r in self.snapshot() if r["status"] is None]


def make_handler(upstream_port: int, seen: Seen):
    class Forward(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:  # the entries in `seen` are the log
            pass

        def _forward(self) -> None:
            length = int(self.headers.get("content-length") or 0)
            raw = self.rfile.read(length) if length else b""
            entry = {"method": self.command, "path": self.path, "status": None}
            entry.update(summarize(raw) if raw else {})
            if entry.get("kind") in ("chat", "continue"):
                seen.bodies[entry["kind"]] = raw
            seen.add(entry)  # in flight until its status is set
            started = time.monotonic()
            try:
                self._relay(raw, entry)
            except Exception as error:  # noted, not raised: the run goes on and reports it
                entry["status"] = entry["status"] or "no answer"
                entry["error"] = f"{type(error).__name__}: {error}"[:300]
            entry["seconds"] = round(time.monotonic() - started, 2)

        def _relay(self, raw: bytes, entry: dict) -> None:
            headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
            upstream = http.client.HTTPConnection("127.0.0.1", upstream_port, timeout=600)
            upstream.request(self.command, self.path, body=raw or None, headers=headers)
            response = upstream.getresponse()
            self.send_response(response.status)
            for key, value in response.getheaders():
                if key.lower() not in HOP_BY_HOP:
                    self.send_header(key, value)
            self.send_header("Connection", "close")
            self.end_headers()
            kept = bytearray()  # the answer's start (all of an error's)
            stream = StreamTally() if entry.get("stream") else None
            try:
                while chunk := response.read1(65536):
                    kept += chunk[: max(0, 8192 - len(kept))]
                    if stream:
                        stream.feed(chunk)
                    self.wfile.write(chunk)
                    self.wfile.flush()
            finally:
                upstream.close()
                entry["status"] = response.status
                if stream and response.status == 200:
                    entry.update(stream.tally)
                if response.status >= 400:
                    entry["answer"] = kept.decode("utf-8", "replace")[:1000]
                    entry["request_body"] = raw.decode("utf-8", "replace")[:4000]
                elif entry.get("kind") in TASK_MARKERS:
                    entry["answer_content"] = answer_content(bytes(kept))

        do_GET = do_POST = do_PUT = do_DELETE = _forward

    return Forward


def start_proxy(upstream_port: int) -> tuple[http.server.ThreadingHTTPServer, Seen]:
    seen = Seen()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), make_handler(upstream_port, seen))
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, seen
