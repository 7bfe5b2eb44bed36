"""Chat with Open-Orca/Mistral-7B-OpenOrca in the browser.

python app.py                 # the real model, fp16 on a CUDA GPU
python app.py --demo          # offline preview with a tiny random-weight model
python app.py --help          # every option (each also an environment variable)
"""

from __future__ import annotations

import logging
import os
import signal
import sys

from orca_space.listening import listening_problem
from orca_space.settings import on_zerogpu, parse_settings

if on_zerogpu(os.environ):
    import spaces  # noqa: F401  (ZeroGPU: before anything that may start CUDA; see orca_space/zerogpu.py)

# Libraries whose INFO lines say nothing a person running the app needs: httpx logs each of
# gradio's start-up requests to itself; the MCP server says "Terminating session: None" per call.
QUIET_LOGGERS = ("httpx", "mcp.server.streamable_http")


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for chatty in QUIET_LOGGERS:  # a line per request of gradio's start-up checks, per MCP call
        logging.getLogger(chatty).setLevel(logging.WARNING)
    settings = parse_settings(argv, os.environ)
    if problem := listening_problem(settings.host, settings.port):  # before minutes of loading
        print(f"app.py: error: {problem}", file=sys.stderr, flush=True)
        raise SystemExit(2)
    # Imported once the flags are read: --help and a refused flag need neither torch nor gradio.
    from orca_space.startup import start_runtime
    from orca_space.web.page.ui import build_ui
    from orca_space.web.server import launch

    runtime = start_runtime(settings)
    close_engine_on_ctrl_c(runtime)
    launch(build_ui(runtime), runtime, settings)


def close_engine_on_ctrl_c(runtime) -> None:
    """Ctrl-C stops the engine first, so that each reply it is writing ends at once with "the
    server is shutting down" while the server can still send that; then gradio closes the
    server as before. (Left to gradio, the server waited for the open streams, and the engine
    closed last, at exit, under replies that then ended without a reason.)"""

    def on_interrupt(signum, frame):
        if runtime.engine is not None:
            runtime.engine.close()
        signal.default_int_handler(signum, frame)

    signal.signal(signal.SIGINT, on_interrupt)


if __name__ == "__main__":
    main(sys.argv[1:])
