"""Can the app listen on --host and --port? Asked before anything loads.

A port in use was found only when gradio started, after the weights had loaded (34 s for the
demo, minutes for the real model), and an address that is no address (`--host 999.1.1.1`)
printed uvicorn's raw error and then "in use". This binds a socket to the address once, at
start-up, and says what is wrong in the user's terms. (Another program can still take the port
between this check and gradio's own bind: `web/server.py` says so in the same words.)
Imports nothing heavy: `app.py` calls it right after the flags are read.
"""

from __future__ import annotations

import errno
import socket

HOST_ADVICE = "use 127.0.0.1 (this machine only) or 0.0.0.0 (every address)"


def listening_problem(host: str, port: int) -> str | None:
    """Why the app could not listen on `host`:`port`, as one sentence; None if it can."""
    try:
        addresses = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (socket.gaierror, UnicodeError):
        return f"--host {host} is neither an IP address nor a name this machine can look up; {HOST_ADVICE}"
    family, kind, proto, _, address = addresses[0]
    with socket.socket(family, kind, proto) as probe:
        # As uvicorn binds: a port left in TIME_WAIT by a server just stopped is free to use.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as exc:
            return bind_failure(host, port, exc)
    return None


def bind_failure(host: str, port: int, exc: OSError) -> str:
    """What a failed bind to `host`:`port` means, in the user's terms."""
    if exc.errno == errno.EADDRINUSE:
        return f"port {port} is in use on {host}: another program (or another copy of the app) holds it; choose another with --port"
    if exc.errno == errno.EADDRNOTAVAIL:
        return f"--host {host} is not an address of this machine; {HOST_ADVICE}"
    if exc.errno == errno.EACCES:
        return f"port {port} needs administrator rights on this system; use a port above 1023 such as 7860"
    why = exc.strerror or "another program may have just taken it"  # gradio's own error has no errno
    return f"cannot listen on {host}:{port} ({why}); choose another --port, or {HOST_ADVICE}"
