"""Cross-origin reads: only the app's own origin may make credentialed requests and read the answers.

gradio 6.31's CORS middleware (`route_utils.CustomCORSMiddleware`) restricts origins only while
the app is addressed as localhost; under any other host name (a Space, a server on the network)
it echoes whatever `Origin` a request carries in `Access-Control-Allow-Origin`, with
`Access-Control-Allow-Credentials: true`. With `--auth`, whose login cookie is `SameSite=None`,
any web site a logged-in visitor opens could then post a chat in their name and read the reply.

`OwnOriginCORS` keeps gradio's middleware and changes its one decision: an origin is allowed when
it *is* the address the request was sent to (its host and port equal the `Host` header), which a
page on another site cannot forge: the browser writes both. The page itself (also inside the
Hugging Face iframe, which loads the app from its own `*.hf.space` address) is same-origin and
needs no CORS at all; every other origin gets no CORS headers, so its scripts can send nothing
with the cookie whose answer they may read. Requests without an `Origin` (curl, `gradio_client`,
the OpenAI SDK) are not browsers' and pass as before.
"""

from __future__ import annotations

from urllib.parse import urlsplit

from gradio import routes
from gradio.route_utils import CustomCORSMiddleware

DEFAULT_PORTS = {"http": 80, "https": 443}


def origin_address(origin: str) -> tuple[str, int | None] | None:
    """(host, port) of an `Origin` header (`scheme://host[:port]`), or None for "null" and junk."""
    try:
        parts = urlsplit(origin)
        port = parts.port
    except ValueError:
        return None
    if parts.scheme not in DEFAULT_PORTS or not parts.hostname:
        return None
    return parts.hostname.lower(), port or DEFAULT_PORTS[parts.scheme]


def host_address(host: str, scheme_of_origin: str) -> tuple[str, int | None] | None:
    """(host, port) of a `Host` header, its port defaulting as the origin's scheme does."""
    try:
        parts = urlsplit(f"//{host}")
        port = parts.port
    except ValueError:
        return None
    if not parts.hostname:
        return None
    return parts.hostname.lower(), port or DEFAULT_PORTS.get(scheme_of_origin)


def is_own_origin(origin: str | None, host: str | None) -> bool:
    """Whether a request's `Origin` is the address it was sent to (`Host`)."""
    if not origin or not host:
        return False
    address = origin_address(origin)
    if address is None:
        return False
    return address == host_address(host, urlsplit(origin).scheme)


class OwnOriginCORS(CustomCORSMiddleware):
    """gradio's CORS middleware, allowing the request's own origin only (see the module docstring)."""

    def is_valid_origin(self, request_headers) -> bool:
        return is_own_origin(request_headers.get("origin"), request_headers.get("host"))

    def preflight_response(self, request_headers):
        response = super().preflight_response(request_headers)
        if not self.is_valid_origin(request_headers):
            # gradio answers every preflight with "credentials: true": another origin is told
            # nothing it could act on.
            for name in ("access-control-allow-credentials", "access-control-allow-headers"):
                if name in response.headers:
                    del response.headers[name]
        return response

    async def _send(self, message, send, request_headers) -> None:
        if message["type"] == "http.response.start" and not self.is_valid_origin(request_headers):
            return await send(message)  # gradio would add "credentials: true"; another origin gets nothing
        return await super()._send(message, send, request_headers)


def install_own_origin_cors() -> None:
    """Make the app gradio creates at launch use `OwnOriginCORS` in place of gradio's own CORS
    middleware (looked up by name in `gradio.routes` when the app is made); call before launch."""
    current = getattr(routes, "CustomCORSMiddleware", None)
    if current is not OwnOriginCORS and current is not CustomCORSMiddleware:
        raise RuntimeError(
            "gradio.routes.CustomCORSMiddleware has changed (a gradio upgrade?): check how this gradio "
            "answers cross-origin requests and update own_origin_cors.py"
        )
    routes.CustomCORSMiddleware = OwnOriginCORS
