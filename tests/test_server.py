from __future__ import annotations

from orca_space.engines.requests import EngineStats
from orca_space.runtime import ChatRuntime
from orca_space.settings import parse_settings
from orca_space.web.server import health, public_link_warning


def test_public_link_without_login_warns():
    assert "--auth" in public_link_warning(parse_settings(["--share"], {}))
    assert public_link_warning(parse_settings(["--share", "--auth", "a:b"], {})) is None
    assert public_link_warning(parse_settings([], {})) is None


class DeadEngine:
    def stats(self):
        return EngineStats(alive=False, active=0, queued=0, capacity=4, failure="the engine stopped: boom")


def test_health_reports_loading_ready_and_a_dead_engine():
    runtime = ChatRuntime(model_name="m", context_length=8192)
    assert health(runtime)["status"] == "loading"
    runtime.status.update("ready", "Ready.")
    runtime.engine = DeadEngine()
    body = health(runtime)
    assert body["status"] == "error" and "engine stopped" in body["message"], "a dead engine is never 'ok'"
    assert {"active", "queued", "capacity"} <= set(body)


def test_a_port_in_use_is_one_sentence_and_exit_2(tiny_dir):
    """A new user's second `python app.py` while the first still runs: one line naming --port, no
    traceback (gradio's own error speaks of `server_port` and `launch()`)."""
    import socket
    import subprocess
    import sys

    from tests.helpers import ROOT

    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        done = subprocess.run(
            [sys.executable, "app.py", "--model", str(tiny_dir), "--port", str(port)],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
    assert done.returncode == 2, done.stderr[-2000:]
    assert "Traceback" not in done.stderr, done.stderr[-2000:]
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith(f"app.py: error: cannot listen on 127.0.0.1:{port}") and "--port" in last, last


def test_a_launch_failure_not_about_the_address_keeps_its_own_error(monkeypatch):
    """Only gradio's failure to bind becomes "cannot listen on ..."; another OSError (a folder
    gradio cannot write, say) is not reported as a port in use."""
    import gradio as gr
    import pytest

    from orca_space.web.server import launch

    def unwritable(*args, **kwargs):
        raise PermissionError(13, "Permission denied", "/tmp/gradio")

    monkeypatch.setattr(gr.Blocks, "launch", unwritable)
    with gr.Blocks() as demo:
        gr.Markdown("page")
    runtime = ChatRuntime(model_name="m", context_length=8192)
    with pytest.raises(PermissionError, match="Permission denied"):
        launch(demo, runtime, parse_settings([], {}))
