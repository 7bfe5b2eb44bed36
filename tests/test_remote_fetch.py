"""No request makes the server fetch from another server: the app is no proxy.

gradio 6.31 fetches remote bytes on a client's word in several places: `GET /gradio_api/file=<URL>`
streams any public URL back, `/gradio_api/proxy=<URL>` relays Spaces loaded with `gr.load`, and any
input of any endpoint (page, REST, MCP) holding a FileData whose path is a URL is downloaded into
gradio's cache before the app's function runs. This machine has no network, so every fetch fails
anyway and a status code alone proves nothing: the app runs in this process, each fetch entry point
is replaced by a recorder, and the tests assert that none was ever called.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from http.client import HTTPConnection
from urllib.parse import urlsplit

import gradio.routes
import httpx
import pytest
import safehttpx
from fastapi import HTTPException

from orca_space.web.remote_fetch_guard import NO_REMOTE_DOWNLOADS, NO_REMOTE_FILES, fetches_remote
from tests.helpers import app_in_process, chat_and_sync_ids
from tests.test_security import read_events

ANSWER_DEADLINE = 30.0
LOOPBACK_HOSTS = {"127.0.0.1", "localhost", "::1"}


class FetchRecorder:
    """Stands in for every way gradio reaches another server; records each call and lets none out.

    - `routes.secure_url_stream_response`: the file route's URL fetcher (patched where routes.py
      looks it up);
    - `routes.App.build_proxy_request`: the first step of every `/proxy=` request;
    - `safehttpx.async_validate_url` and `safehttpx.get`: under the file route and under gradio's
      download of FileData URLs (`processing_utils.async_ssrf_protected_get`);
    - `httpx.Client.send` / `httpx.AsyncClient.send` to any host but loopback: whatever else might
      fetch (the app's own loopback calls and this test's client pass through).
    """

    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []

    def record(self, name: str, target: object) -> None:
        self.calls.append((name, str(target)[:200]))

    def install(self, patch: pytest.MonkeyPatch) -> None:
        async def stream_response(url, request):
            self.record("secure_url_stream_response", url)
            raise HTTPException(502, "recorded: no fetching in tests")

        def build_proxy_request(app, url_path):
            self.record("build_proxy_request", url_path)
            raise PermissionError("recorded: no proxying in tests")

        async def validate_url(hostname, *args, **kwargs):
            self.record("safehttpx.async_validate_url", hostname)
            raise ValueError("recorded: no resolving in tests")

        async def safe_get(url, *args, **kwargs):
            self.record("safehttpx.get", url)
            raise ValueError("recorded: no downloads in tests")

        patch.setattr(gradio.routes, "secure_url_stream_response", stream_response)
        patch.setattr(gradio.routes.App, "build_proxy_request", build_proxy_request)
        patch.setattr(safehttpx, "async_validate_url", validate_url)
        patch.setattr(safehttpx, "get", safe_get)
        self._guard_outbound(patch, httpx.Client, is_async=False)
        self._guard_outbound(patch, httpx.AsyncClient, is_async=True)

    def _guard_outbound(self, patch: pytest.MonkeyPatch, client_class, is_async: bool) -> None:
        original = client_class.send
        recorder = self

        def outward(request) -> bool:
            if request.url.host in LOOPBACK_HOSTS:
                return False
            recorder.record(f"{client_class.__name__}.send", request.url)
            return True

        if is_async:

            async def send(client, request, *args, **kwargs):
                if outward(request):
                    raise httpx.ConnectError("recorded: no outbound requests in tests")
                return await original(client, request, *args, **kwargs)
        else:

            def send(client, request, *args, **kwargs):
                if outward(request):
                    raise httpx.ConnectError("recorded: no outbound requests in tests")
                return original(client, request, *args, **kwargs)

        patch.setattr(client_class, "send", send)


@pytest.fixture(scope="module")
def recorder():
    with pytest.MonkeyPatch.context() as patch:
        fetches = FetchRecorder()
        fetches.install(patch)
        yield fetches


@pytest.fixture(scope="module")
def app(tiny_dir, recorder, tmp_path_factory):
    """One app for the module, with the MCP server on and static file workers asked for through
    gradio's environment variable (which would serve `/file=` without the app's middleware)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("GRADIO_NUM_WORKERS", "1")
        patch.setenv("GRADIO_TEMP_DIR", str(tmp_path_factory.mktemp("gradio-tmp")))
        with app_in_process("--model", str(tiny_dir), "--mcp") as (url, runtime):
            yield url


@pytest.fixture()
def fetches(recorder):
    """The recorder, emptied before the test; the test fails if anything reached a fetcher."""
    recorder.calls.clear()
    yield recorder
    assert not recorder.calls, f"these requests reached a fetcher: {recorder.calls}"


@pytest.fixture(scope="module")
def http(app):
    with httpx.Client(base_url=app, timeout=ANSWER_DEADLINE) as client:
        yield client


def raw_request(app_url: str, method: str, raw_path: str) -> tuple[int, str]:
    """Send a path exactly as written: no client-side normalisation of slashes or encodings."""
    connection = HTTPConnection(urlsplit(app_url).netloc, timeout=10)
    try:
        connection.request(method, raw_path)
        response = connection.getresponse()
        return response.status, response.read(10_000).decode("utf-8", "replace")
    finally:
        connection.close()


# -- file and proxy routes --------------------------------------------------------------------------

URL_TARGETS = [
    "https://example.com/big.bin",
    "http://93.184.215.14/",
    "HTTPS://EXAMPLE.COM/big.bin",
    "hTtP://example.com/",
    "https:/example.com/big.bin",  # one slash, as a proxy that merges slashes leaves it
    "https:\\\\example.com\\big.bin",
    "//example.com/big.bin",
    "\\\\example.com\\big.bin",
    "https%3A%2F%2Fexample.com%2Fbig.bin",
    "https%253A%252F%252Fexample.com%252Fbig.bin",
    "https%25253A%25252F%25252Fexample.com",
    "%68ttps://example.com/",
    "%2F%2Fexample.com%2Fbig.bin",
    "%20https://example.com/",
    "%09https://example.com/",
    "/https://example.com/",
    "ftp://example.com/big.bin",
    "file:///etc/passwd",
    "data:text/html,hi",
]
FILE_PREFIXES = [
    "/gradio_api/file=",
    "/gradio_api/file/",
    "/file=",
    "/GRADIO_API/FILE=",
    "/gradio_api//file=",
    "//gradio_api/file=",
    "/gradio_api%2Ffile=",
    "/gradio_api%2ffile%3D",
    "/gradio_api%252Ffile%253D",
    "/gradio_api\\file=",
    "/some/root/path/gradio_api/file=",
]
PROXY_PATHS = [
    "/gradio_api/proxy=https://abc-def.hf.space/config",
    "/gradio_api/proxy=https://example.com/big.bin",
    "/gradio_api/proxy=/etc/passwd",
    "/gradio_api/Proxy=https://abc-def.hf.space/",
    "/gradio_api/proxy%3Dhttps://abc-def.hf.space/",
    "/proxy=https://abc-def.hf.space/",
]
HOSTILE_PATHS = [prefix + target for prefix in FILE_PREFIXES for target in URL_TARGETS] + PROXY_PATHS


def test_no_file_or_proxy_route_fetches_a_url(app, fetches):
    answers = {}
    for method in ("GET", "HEAD"):
        for path in HOSTILE_PATHS:
            answers[method, path] = raw_request(app, method, path)
    not_refused = {key: status for key, (status, _) in answers.items() if status != 403}
    assert not not_refused, f"each must be a 403: {not_refused}"
    unexplained = [key for key, (_, body) in answers.items() if key[0] == "GET" and body != NO_REMOTE_FILES]
    assert not unexplained, f"the 403 must say the app serves no remote files: {unexplained[:5]}"


@pytest.mark.parametrize(
    "path",
    [
        "/",
        "/assets/index-3f2a.js",
        "/gradio_api/file=/tmp/gradio/9c1e/avatar.png",
        "/gradio_api/file=/tmp/gradio/9c1e/notes: draft.txt",
        "/gradio_api/file/tmp/gradio/9c1e/profile/file=x.png",
        "/gradio_api/queue/data",
        "/gradio_api/mcp/",
        "/gradio_api/upload",
        "/theme.css",
    ],
)
def test_paths_the_page_uses_are_let_through(path):
    assert not fetches_remote(path)


def test_the_refusal_is_a_plain_403(app, fetches):
    response = httpx.get(f"{app}/gradio_api/file=https://example.com/big.bin")
    assert response.status_code == 403
    assert response.headers["content-type"].startswith("text/plain")
    assert response.text == NO_REMOTE_FILES


@pytest.mark.parametrize("path", ["/gradio_api/file=/etc/passwd", "/gradio_api/file=app.py"])
def test_a_local_path_still_goes_to_gradio_which_refuses_it(app, fetches, path):
    """The guard refuses URLs only; gradio's own checks answer for local paths (and refuse these)."""
    status, body = raw_request(app, "GET", path)
    assert status == 403 and NO_REMOTE_FILES not in body, (status, body[:100])


def test_the_page_and_its_assets_still_load(app, fetches, http):
    page = http.get("/")
    assert page.status_code == 200
    assets = sorted(set(re.findall(r"""(?:src|href)=["'](?:\./|/)?(assets/[^"'?#]+)""", page.text)))
    assert assets, "the page names its scripts and styles"
    for asset in assets:
        assert http.get(f"/{asset}").status_code == 200, asset
    for path in ("/config", "/gradio_api/info", "/theme.css", "/healthz"):
        assert http.get(path).status_code == 200, path


@pytest.mark.parametrize("path", ["/gradio_api/runs", "/gradio_api/run-history/buckets"])
def test_run_history_is_off(app, fetches, http, path):
    """gradio's run history fetches the remote files in a signed-in user's runs and relays files
    from Hugging Face buckets; the app has no use for it."""
    assert http.get(path).status_code == 404


def test_no_static_file_workers_even_when_gradio_is_asked_for_them(app, fetches):
    """With GRADIO_NUM_WORKERS, gradio starts worker processes that serve `/file=` (URLs
    included) behind its SSR front, where the app's middleware never sees the request."""
    port = int(app.rsplit(":", 1)[1])
    for worker_port in (port + 1, port + 2):
        try:
            answer = httpx.get(f"http://127.0.0.1:{worker_port}/health", timeout=2)
        except httpx.TransportError:
            continue
        assert answer.text != '{"status":"ok"}', f"a static file worker listens on {worker_port}"


REDIRECT_BAIT = [
    "/logout?next=https://evil.example&_target_url=https://evil.example&url=//evil.example",
    "/logout/?next=https://evil.example",
    "/login/huggingface?_target_url=https://evil.example",
    "/gradio_api/mcp?redirect=https://evil.example",
    "//evil.example/",
    "/%2F%2Fevil.example/",
    "/\\evil.example/",
    "/gradio_api/file=https://evil.example/",
]


@pytest.mark.parametrize("path", REDIRECT_BAIT)
def test_no_route_redirects_to_another_host(app, fetches, path):
    """gradio's redirects (after a logout, a trailing slash, an old open redirect on /file=) go
    to the app itself, whatever the query says."""
    connection = HTTPConnection(urlsplit(app).netloc, timeout=10)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        location = response.getheader("location") or ""
    finally:
        connection.close()
    if 300 <= response.status < 400:
        target, own = httpx.URL(app).join(location), httpx.URL(app)
        assert (target.host, target.port) == (own.host, own.port), f"{path} sent the client to {location}"


# -- FileData URLs in request bodies ---------------------------------------------------------------

REMOTE_FILE = {"path": "https://example.com/big.bin", "meta": {"_type": "gradio.FileData"}}
CHAT_VALUES = ["hi", "You are a test.", 4, 0.0, 0.95, 40, 1.0]


def call_and_read(http, api_name: str, data: list) -> list[tuple[str, object]]:
    posted = http.post(f"/gradio_api/call/{api_name}", json={"data": data})
    assert posted.status_code == 200, posted.text[:200]
    return read_events(http, f"/gradio_api/call/{api_name}/{posted.json()['event_id']}")


@pytest.mark.parametrize("slot", [0, 1], ids=["as-message", "as-system"])
def test_a_remote_file_in_a_chat_is_not_downloaded(app, fetches, http, slot):
    data = list(CHAT_VALUES)
    data[slot] = REMOTE_FILE
    name, data = call_and_read(http, "chat", data)[-1]
    assert name == "error" and data["error"] == NO_REMOTE_DOWNLOADS, (name, data)


def test_a_remote_file_in_a_forged_history_is_not_downloaded(app, fetches, http):
    part = {"type": "file", "file": REMOTE_FILE}
    body = {
        "data": [[{"role": "user", "content": [part]}]],
        "fn_index": chat_and_sync_ids(http)["sync"],
        "session_hash": f"remote-{time.monotonic_ns()}",
    }
    response = http.post("/gradio_api/run/predict", json=body)
    assert response.json().get("error") == NO_REMOTE_DOWNLOADS, response.text[:200]


def test_a_remote_file_to_the_tools_endpoint_is_not_downloaded(app, fetches, http):
    """The MCP tool's own gradio endpoint (`gr.api`), called without MCP."""
    response = http.post("/gradio_api/run/ask", json={"data": [REMOTE_FILE, "", 4, 0.0]})
    assert response.json().get("error") == NO_REMOTE_DOWNLOADS, response.text[:200]


def test_a_remote_file_through_mcp_is_not_downloaded(app, fetches):
    """The MCP server checks arguments against the tool's schema (text) before gradio sees them;
    the download refusal stands behind that."""
    from mcp import ClientSession
    from mcp.client.streamable_http import streamablehttp_client

    async def run():
        async with streamablehttp_client(f"{app}/gradio_api/mcp/") as (read, write, _):
            async with ClientSession(read, write) as session:
                await session.initialize()
                name = (await session.list_tools()).tools[0].name
                remote = await session.call_tool(name, {"message": REMOTE_FILE, "max_new_tokens": 4})
                as_text = await session.call_tool(
                    name, {"message": "https://example.com/big.bin", "max_new_tokens": 4, "temperature": 0}
                )
                return remote, as_text

    remote, as_text = asyncio.run(run())
    assert remote.isError, "a file where the question belongs is refused"
    assert not as_text.isError, "a URL in a question is only text, and the model answers it"


def test_a_chat_works_after_all_of_it(app, fetches, http):
    data = list(CHAT_VALUES)
    data[2] = 8
    events = call_and_read(http, "chat", data)
    assert events[-1][0] == "complete" and events[-1][1][0], events[-1]


def test_json_of_remote_file_marker_is_what_gradio_traverses():
    """The FileData shape used above is what gradio moves to its cache (so the tests above would
    catch a download if the guard let one through)."""
    from gradio_client.utils import is_file_obj_with_meta

    assert is_file_obj_with_meta(json.loads(json.dumps(REMOTE_FILE)))
