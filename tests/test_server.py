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


def test_a_port_taken_after_the_start_up_check_is_one_sentence_and_exit_2(capsys):
    """app.py tries the port before loading (tests/test_cli.py); another program can still take it
    before gradio binds. gradio's own error then speaks of `server_port` and `launch()`: the app
    says it in one line naming --port, no traceback."""
    import socket

    import gradio as gr
    import pytest

    from orca_space.web.server import launch

    with gr.Blocks() as demo:
        gr.Markdown("page")
    runtime = ChatRuntime(model_name="m", context_length=8192)
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        with pytest.raises(SystemExit) as exited:
            launch(demo, runtime, parse_settings(["--port", str(port)], {}), quiet=True)
    err = capsys.readouterr().err
    assert exited.value.code == 2 and "Traceback" not in err, err
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"app.py: error: cannot listen on 127.0.0.1:{port}") and "--port" in last, last
    assert "server_port" not in last and "launch()" not in last, last


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
