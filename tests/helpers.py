"""Helpers for tests that run the real app on loopback."""

from __future__ import annotations

import contextlib
import http.server
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

API_ORDER = ("max_new_tokens", "temperature", "top_p", "top_k", "repetition_penalty")
API_GREEDY = dict(max_new_tokens=8, temperature=0.0, top_p=0.95, top_k=40, repetition_penalty=1.0)

ROOT = Path(__file__).resolve().parent.parent
START_TIMEOUT_S = 300.0  # for an app started by a test to answer, and for its model to load


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_url(url: str, timeout: float = 60.0, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before {url} answered")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.25)
    raise TimeoutError(f"{url} did not answer within {timeout:.0f}s")


def wait_until_ready(base_url: str, timeout: float = 120.0) -> dict:
    """Poll /healthz until the model is loaded; returns the last health body."""
    import json

    deadline = time.monotonic() + timeout
    body: dict = {}
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{base_url}/healthz", timeout=2) as response:
                body = json.load(response)
            if body.get("status") in ("ok", "error"):
                return body
        except OSError:
            pass
        time.sleep(0.25)
    raise TimeoutError(f"{base_url} not ready within {timeout:.0f}s: {body}")


@contextlib.contextmanager
def running_app(
    *args: str,
    env: dict[str, str] | None = None,
    log_path: Path | None = None,
    script: Path = ROOT / "app.py",
    wait_ready: bool = True,
):
    """Run `python app.py ARGS` (or another `script`) on a free loopback port; yields its base URL
    once the model is ready, or once the page answers if not `wait_ready`."""
    port = free_port()
    # Tests send many messages from one address: no rate limit unless a test asks for one.
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", "ORCA_RATE_LIMIT": "0", **(env or {})}
    log = open(log_path, "w") if log_path else subprocess.DEVNULL
    proc = subprocess.Popen(
        [sys.executable, str(script), "--host", "127.0.0.1", "--port", str(port), *args],
        cwd=ROOT,
        env=full_env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    base_url = f"http://127.0.0.1:{port}"
    try:
        # Generous: on a machine kept busy by other work (load 10 on 2 cores) the app took over 60 s
        # to answer; an app that dies is seen at once (`proc`), so this only waits on a slow one.
        wait_for_url(f"{base_url}/healthz", timeout=START_TIMEOUT_S, proc=proc)
        if wait_ready:
            wait_until_ready(base_url, timeout=START_TIMEOUT_S)
        yield base_url
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
        if log_path:
            log.close()


def demo_home(tiny_dir: Path, home: Path) -> Path:
    """A HOME for `app.py --demo` whose demo cache is the session's tiny checkpoint: nothing is
    built twice, the real home is left alone, and the page names the demo model, not a path."""
    from orca_space.startup import DEMO_DIR

    demo_dir = home / DEMO_DIR.relative_to(Path.home())
    demo_dir.parent.mkdir(parents=True)
    demo_dir.symlink_to(tiny_dir, target_is_directory=True)
    return home


def metric(app_url: str, name: str, **labels: str) -> float:
    """One sample of GET /metrics."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    response = httpx.get(f"{app_url}/metrics", timeout=5)
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return sample.value
    raise AssertionError(f"{name} is not in /metrics")


def chat_and_sync_ids(http) -> dict[str, int]:
    """fn ids of the page's /chat and of the chatbot -> history sync that the page calls after
    every turn (what a client can post to directly, forging a history)."""
    config = http.get("/config").json()
    kinds = {c["id"]: c["type"] for c in config["components"]}
    deps = config["dependencies"]
    chat = next(d for d in deps if d.get("api_name") == "chat")
    sync = next(
        d
        for d in deps
        if [kinds[i] for i in d["inputs"]] == ["chatbot"]
        and [kinds[i] for i in d["outputs"]] == ["state", "state"]
    )
    return {"chat": chat["id"], "sync": sync["id"]}


def wait_until_idle(engine, timeout: float = 5.0) -> bool:
    """True once the engine reports nothing generating or queued."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        stats = engine.stats()
        if stats.active == 0 and stats.queued == 0:
            return True
        time.sleep(0.02)
    return False


@contextlib.contextmanager
def app_in_process(*args: str):
    """`python app.py ARGS` without the subprocess: monkeypatches reach its engine."""
    with page_in_process(*args) as (url, runtime, _):
        yield url, runtime


@contextlib.contextmanager
def page_in_process(*args: str):
    """As `app_in_process`, also yielding the gr.Blocks page (whose sessions' states a test reads)."""
    from orca_space.settings import parse_settings
    from orca_space.startup import start_runtime
    from orca_space.web.page.ui import build_ui
    from orca_space.web.server import launch

    settings = parse_settings(["--port", str(free_port()), "--rate-limit", "0", *args], {})
    runtime = start_runtime(settings)
    demo = build_ui(runtime)
    launch(demo, runtime, settings, prevent_thread_lock=True, quiet=True)
    url = f"http://127.0.0.1:{settings.port}"
    try:
        body = wait_until_ready(url, timeout=60)
        assert body["status"] == "ok", body
        yield url, runtime, demo
    finally:
        demo.close()
        if runtime.engine is not None:
            runtime.engine.close()


def chat_through_api(url: str, message: str, **params) -> list[str]:
    """One greedy chat through gradio_client's /chat, in a fresh session; its streamed outputs."""
    from gradio_client import Client

    client = Client(url, verbose=False)
    values = {**API_GREEDY, **params}
    job = client.submit(message, "You are a test.", *(values[k] for k in API_ORDER), api_name="/chat")
    deadline = time.monotonic() + 60
    while not job.done():
        assert time.monotonic() < deadline, "the chat did not finish"
        time.sleep(0.05)
    assert job.status().success, "the chat succeeded"
    return job.outputs()


@contextlib.contextmanager
def another_origin():
    """An HTTP server on another port (another origin) that notes every path asked of it."""
    hits: list[str] = []

    class Note(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (http.server's name)
            hits.append(self.path)
            self.send_response(404)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Note)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", hits
    finally:
        server.shutdown()
        server.server_close()
