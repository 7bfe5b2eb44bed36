"""Who may use the machine-facing routes: the OpenAI-compatible API, gradio's MCP server and the
Prometheus metrics.

gradio's login (`--auth`) guards the page and gradio's own API with a cookie, but not routes
added beside them (`/v1/...`, `/metrics`) nor gradio's MCP mount (`/gradio_api/mcp/...`), which
would otherwise be a way around the login. So `AccessGate` guards those paths itself:

- access keys given (`--access-key`): only `Authorization: Bearer <one of them>` gets through,
  with or without `--auth`;
- no keys, but a login required: those routes are off (403, telling the operator what to set);
- neither: they are as open as the page (and as rate limited).
"""

from __future__ import annotations

import hmac
import json
from collections.abc import Sequence

# Path prefixes of the routes guarded here ("/v1" itself and everything under it, and so on).
GUARDED_PREFIXES = ("/v1", "/gradio_api/mcp", "/metrics")
KEY_NEEDED = "This endpoint needs an access key: send `Authorization: Bearer <key>`."
KEY_WRONG = "The access key is not valid."
API_OFF = (
    "This app requires a login, so its API, MCP server and metrics are off until the operator sets "
    "--access-key (or ORCA_ACCESS_KEY) and gives clients one of those keys."
)


def is_guarded(path: str) -> bool:
    return any(path == prefix or path.startswith(prefix + "/") for prefix in GUARDED_PREFIXES)


def bearer_token(authorization: str | None) -> str | None:
    scheme, _, token = (authorization or "").strip().partition(" ")
    if scheme.lower() != "bearer":
        return None
    return token.strip() or None


def matching_key(authorization: str | None, keys: Sequence[str]) -> int | None:
    """The index of the key the header carries, or None. Every key is compared, in constant
    time each, so the time taken says nothing about how close a guess came."""
    token = bearer_token(authorization)
    if token is None:
        return None
    found = None
    for index, key in enumerate(keys):
        if hmac.compare_digest(token.encode(), key.encode()) and found is None:
            found = index
    return found


class AccessGate:
    """ASGI middleware: answers 401/403 on a guarded path, as described in the module docstring."""

    def __init__(self, app, keys: Sequence[str], login_required: bool) -> None:
        self.app = app
        self.keys = tuple(keys)
        self.login_required = login_required

    async def __call__(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket") or not is_guarded(scope.get("path", "")):
            return await self.app(scope, receive, send)
        refusal = self.refusal(_header(scope, b"authorization"))
        if refusal is None:
            return await self.app(scope, receive, send)
        if scope["type"] == "websocket":  # nothing here serves websockets; close without a word
            return await send({"type": "websocket.close", "code": 1008})
        await _send_error(send, *refusal)

    def refusal(self, authorization: str | None) -> tuple[int, str, str] | None:
        """(status, error type, message) for a request that may not pass, else None."""
        if self.keys:
            if matching_key(authorization, self.keys) is not None:
                return None
            message = KEY_WRONG if bearer_token(authorization) else KEY_NEEDED
            return 401, "authentication_error", message
        if self.login_required:
            return 403, "permission_error", API_OFF
        return None


def _header(scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key.lower() == name:
            return value.decode("latin-1")
    return None


async def _send_error(send, status: int, kind: str, message: str) -> None:
    # OpenAI's error shape, which OpenAI clients show as is; MCP clients read the status.
    body = json.dumps({"error": {"message": message, "type": kind, "param": None, "code": None}}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if status == 401:
        headers.append((b"www-authenticate", b'Bearer realm="orca-space"'))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
