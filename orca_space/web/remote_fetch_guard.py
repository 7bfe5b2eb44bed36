"""The server fetches nothing from another server on a client's word: a public Space is no proxy.

gradio 6.31 fetches remote bytes for whoever asks, in ways this app never needs (the chat takes no
files, its assets are local, it loads no other Space):

1. `GET /gradio_api/file=<http(s) URL>` (and the older `/gradio_api/file/<URL>`) fetches any
   public URL on the server and streams it back, with no size limit and no read timeout
   (`route_utils.secure_url_stream_response`, which replaced an open redirect in gradio #13593).
2. `GET /gradio_api/proxy=<URL>` relays Spaces loaded with `gr.load`. None is loaded here, so
   gradio refuses every URL today; refusing the route outright keeps it so.
3. Any input of any endpoint (the page's events, the REST API, the MCP tool) that holds a FileData
   (`{"path": <URL>, "meta": {"_type": "gradio.FileData"}}`, wherever text or a number belongs)
   is downloaded into gradio's cache before the app's function sees it, with no size limit
   (`processing_utils.async_ssrf_protected_get`, under every download gradio makes).

`RemoteFetchGuard` answers 1 and 2 with a plain 403 before gradio routes them;
`refuse_remote_downloads` replaces gradio's download primitive for 3 with a refusal. (`launch`
also turns off gradio's run history and static file workers: see server.py.)
"""

from __future__ import annotations

import re
from urllib.parse import unquote

import gradio as gr
from fastapi.responses import PlainTextResponse

NO_REMOTE_FILES = "This app serves no remote files: its file and proxy routes take no URLs."
NO_REMOTE_DOWNLOADS = "This app downloads no files: send text, not a file or a link to one."
# gradio's routes that take a file's path or URL after these (under any prefix: a root path,
# doubled slashes), and its proxy, which takes nothing but URLs.
FILE_ROUTE_MARKERS = ("/file=", "/file/")
PROXY_ROUTE_MARKER = "/proxy="
# Any scheme (http, HTTPS, ftp, file, data, ...) once leading slashes are gone, so that `https:/x`
# (one slash) and `/https://x` count too; and `//host`, a URL relative to the page's scheme.
URL_LIKE = re.compile(r"^/*[a-z][a-z0-9+.-]*:|^//")
# Enough rounds of percent-decoding for any encoding a front proxy or gradio might undo.
MAX_DECODES = 8
BLANKS = "".join(map(chr, range(33)))  # control characters and the space, which clients trim


def normalized(path: str) -> str:
    """The path fully percent-decoded, backslashes as slashes, lower case: the most that any
    server or proxy in front of gradio could make of it."""
    for _ in range(MAX_DECODES):
        decoded = unquote(path)
        if decoded == path:
            break
        path = decoded
    return path.replace("\\", "/").lower()


def fetches_remote(path: str) -> bool:
    """Whether `path` asks a file route for a URL, or asks for the proxy at all."""
    path = normalized(path)
    if PROXY_ROUTE_MARKER in path:
        return True
    for marker in FILE_ROUTE_MARKERS:
        start = path.find(marker)
        while start != -1:
            target = path[start + len(marker) :].lstrip(BLANKS)
            if URL_LIKE.match(target):
                return True
            start = path.find(marker, start + 1)
    return False


class RemoteFetchGuard:
    """ASGI middleware: a plain 403 for any request whose path asks gradio to fetch a URL."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send):
        # gradio serves files over plain HTTP only; its websockets (none in 6.31) carry no paths.
        if scope["type"] == "http" and self.refused(scope):
            response = PlainTextResponse(NO_REMOTE_FILES, status_code=403)
            return await response(scope, receive, send)
        return await self.app(scope, receive, send)

    @staticmethod
    def refused(scope) -> bool:
        # The decoded path is what gradio routes on; the raw one is what a front proxy may decode
        # differently (both are checked so that neither reading slips through).
        raw = scope.get("raw_path") or b""
        return fetches_remote(scope.get("path", "")) or fetches_remote(raw.decode("latin-1"))


async def _refuse_download(url, *args, **kwargs):
    raise gr.Error(NO_REMOTE_DOWNLOADS)


def refuse_remote_downloads() -> None:
    """Make gradio's one download primitive refuse, so that no input makes the server fetch a URL.

    gradio downloads a FileData URL (`async_ssrf_protected_download`, and the sync
    `ssrf_protected_download` / `save_url_to_cache` through it) and a remote image or audio value
    through `processing_utils.async_ssrf_protected_get`, looked up on the module at each call.
    The app sends and receives text only, so it never needs a download of its own."""
    from gradio import processing_utils

    if not callable(getattr(processing_utils, "async_ssrf_protected_get", None)):
        raise RuntimeError(
            "gradio.processing_utils.async_ssrf_protected_get is gone (a gradio upgrade?): "
            "check how this gradio downloads a client's URLs and update remote_fetch_guard.py"
        )
    processing_utils.async_ssrf_protected_get = _refuse_download
