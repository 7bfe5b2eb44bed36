"""Integers too long for Python to read, refused by name before any JSON parser meets them.

Python reads no integer of more than 4,300 digits (`sys.get_int_max_str_digits`: longer ones
cost quadratic time) and raises ValueError, which JSON parsers' own error handling does not
expect: `/v1` answered a bare 500, gradio's routes "There was an error parsing the body", the
MCP server a 500 with a traceback in the log (issue #27). `OverlongIntegers` looks at every
request body once, before the app's routes do, and answers 400 naming the problem; digits inside
a JSON string (a message that quotes a long number) are text, and pass.
"""

from __future__ import annotations

import json
import re
import sys

# A JSON string (skipped whole, escapes included), or an integer literal outside one: digits that
# are no fraction or exponent (which Python reads as a float, of any length).
STRING_OR_DIGITS = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"|(?<![.eE0-9])(?<![eE][+-])([0-9]+)(?![.eE0-9])')


def overlong_integer(body: bytes, max_digits: int) -> int | None:
    """The length of the first integer literal in `body` over `max_digits` digits, else None."""
    if max_digits <= 0 or re.search(rb"[0-9]{%d}" % (max_digits + 1), body) is None:
        return None  # the usual case, found at C speed
    for match in STRING_OR_DIGITS.finditer(body):
        digits = match.group(1)
        if digits is not None and len(digits) > max_digits:
            return len(digits)
    return None


class OverlongIntegers:
    """ASGI middleware: a request body holding an integer Python cannot read is a named 400."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope.get("method") not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        messages, body = [], b""
        while True:  # the body is small: BodySizeLimit, outside this, caps it
            message = await receive()
            messages.append(message)
            if message["type"] != "http.request":
                break
            body += message.get("body", b"")
            if not message.get("more_body", False):
                break
        max_digits = sys.get_int_max_str_digits()
        if (digits := overlong_integer(body, max_digits)) is not None:
            return await refuse(
                send,
                f"the request body holds an integer of {digits:,} digits; at most {max_digits:,} are read",
            )

        async def replay():
            return messages.pop(0) if messages else await receive()

        return await self.app(scope, replay, send)


async def refuse(send, message: str) -> None:
    # Both shapes at once: OpenAI's error (what /v1 clients read) and FastAPI's `detail`.
    error = {"message": message, "type": "invalid_request_error", "param": None, "code": None}
    body = json.dumps({"error": error, "detail": message}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": 400, "headers": headers})
    await send({"type": "http.response.body", "body": body})
