"""`python app.py` as a person runs it: mistakes in the address said before anything loads, in
the user's terms, and Ctrl-C during a reply said to the client as a shutdown."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys

import pytest

from orca_space.listening import listening_problem
from tests.helpers import ROOT, START_TIMEOUT_S, demo_home, free_port, wait_until_ready

LOADING = ("Loading", "weights", "Building")  # what the log says once a model starts to load


@contextlib.contextmanager
def busy_port():
    """A port another program listens on."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        yield holder.getsockname()[1]


def run_app(*args: str, home) -> subprocess.CompletedProcess:
    env = {**os.environ, "HOME": str(home), "PYTHONUNBUFFERED": "1"}
    return subprocess.run(
        [sys.executable, "app.py", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )


def test_listening_problems_in_the_users_terms():
    assert listening_problem("127.0.0.1", free_port()) is None
    with busy_port() as port:
        assert listening_problem("127.0.0.1", port) == (
            f"port {port} is in use on 127.0.0.1: another program (or another copy of the app) holds it; "
            "choose another with --port"
        )
    assert listening_problem("999.1.1.1", 7860).startswith(
        "--host 999.1.1.1 is neither an IP address nor a name this machine can look up"
    )
    # TEST-NET-1 (RFC 5737): a real address, never this machine's.
    assert listening_problem("192.0.2.1", free_port()).startswith(
        "--host 192.0.2.1 is not an address of this machine"
    )


@pytest.mark.parametrize("where", ["busy port", "no such address"])
def test_the_app_refuses_an_address_it_cannot_listen_on_before_loading_the_model(where, tiny_dir, tmp_path):
    """The log shows no loading at all: the refusal comes first (the old app loaded the weights,
    then found the port in use, and for a bad --host printed uvicorn's raw error, then "in use")."""
    home = demo_home(tiny_dir, tmp_path / "home")
    with busy_port() as port:
        address = ["--port", str(port)] if where == "busy port" else ["--host", "999.1.1.1", "--port", "7860"]
        done = run_app("--demo", *address, home=home)
    output = done.stdout + done.stderr
    assert done.returncode == 2 and "Traceback" not in output, output[-2000:]
    last = done.stderr.strip().splitlines()[-1]
    expected = (
        f"port {port} is in use" if where == "busy port" else "--host 999.1.1.1 is neither an IP address"
    )
    assert last.startswith(f"app.py: error: {expected}"), last
    assert not any(word in output for word in LOADING), f"the model began to load first:\n{output[-2000:]}"


def test_ctrl_c_during_a_reply_tells_the_client_the_server_is_shutting_down(tiny_dir, tmp_path):
    """Through the real `openai` client: a reply streaming when the server gets SIGINT ends with an
    error that says so (it said "the reply ended without a finish reason; try again"). The console
    along the way says when the app is ready, without gradio's and httpx's lines."""
    import openai

    home, port = demo_home(tiny_dir, tmp_path / "home"), free_port()
    env = {**os.environ, "HOME": str(home), "PYTHONUNBUFFERED": "1", "ORCA_RATE_LIMIT": "0"}
    log = tmp_path / "app.log"
    with open(log, "w") as out:
        app = subprocess.Popen(
            [sys.executable, "app.py", "--demo", "--port", str(port)],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=out,
        )
    try:
        url = f"http://127.0.0.1:{port}"
        wait_until_ready(url, timeout=START_TIMEOUT_S)
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        stream = client.chat.completions.create(
            model="Open-Orca/Mistral-7B-OpenOrca",
            messages=[{"role": "user", "content": "Tell me a very long story."}],
            max_tokens=4000,  # greedy on the tiny model: still streaming when the signal comes
            temperature=0,
            stream=True,
        )
        chunks, error = 0, None
        try:
            for chunk in stream:
                chunks += 1
                if chunks == 3:
                    app.send_signal(signal.SIGINT)
                assert chunk.choices[0].finish_reason is None, "the reply finished before the signal"
        except openai.APIError as exc:
            error = str(exc)
        assert error is not None, f"the stream ended after {chunks} chunks without saying why"
        assert "shutting down" in error, error
        app.wait(60)
        console = log.read_text()
        assert f"Ready to chat: open {url}" in console, "the console says when the page can answer"
        for noise in ("set `share=True`", "httpx", "Running on local URL"):
            assert noise not in console, f"the console still says {noise!r}"
    finally:
        if app.poll() is None:
            app.kill()
            app.wait()
