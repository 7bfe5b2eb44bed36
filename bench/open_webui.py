"""Open WebUI, with its default settings, against the Space's /v1, driven in a real browser.

    python bench/open_webui.py                 # installs Open WebUI on first run (minutes), then drives it
    python bench/open_webui.py --out FILE.json # default: bench/results/<date>-open-webui.json

What it does:
1. Installs `open-webui==0.12.4` into its own venv, bench/.openwebui/venv (git-ignored; made with
   `python -m venv`, without the system's site packages, so the project's pinned torch and gradio
   are never touched). Later runs reuse it.
2. Starts `python app.py --demo --rate-limit 0` (the tiny random-weight model; a temporary HOME)
   and a loopback proxy in front of its /v1 that notes every request Open WebUI sends: path,
   status, the body's fields (is `max_tokens` there? how many `tools`? which roles?), and the
   answer of any 4xx. The Space's own log lines about /v1 are kept too.
3. Starts Open WebUI offline against the proxy: no login (WEBUI_AUTH=False), no Ollama, no
   embedding/reranking/speech model downloaded at start, its data in a temporary folder.
4. In headless Chromium (/usr/bin/chromium) with Open WebUI's defaults (no setting changed):
   sends a message and watches the reply stream in (the text seen growing), presses
   "Continue Response" and watches the reply grow again, and waits for the chat's title to be
   generated (Open WebUI's title task; 0.12.4 sends it with max_tokens 1000, its follow-up and
   tag tasks with none). Continue's growth is read from the chat Open WebUI saved (the page renders the demo model's
   random `$` and `\\` as LaTeX, so its text is no measure), and the proxy counts the content
   deltas and finish reason of each streamed answer.
5. Sends Open WebUI's own chat and continue requests to the Space again, unstreamed, for one
   token, to read how many prompt tokens they take (its tools included) of the 8192 context.
6. Prints the result and writes it as JSON. Each step is recorded as passed or failed with what
   was seen, so a failure names where it broke; the exit status is 1 if any step failed.

Heavy (Open WebUI installs torch and friends; it starts in about a minute): not part of CI.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from owui_proxy import start_proxy  # noqa: E402
from playwright.sync_api import Page, expect  # noqa: E402

from orca_space.tiny import write_tiny_checkpoint  # noqa: E402
from tests.browser_flow import chromium  # noqa: E402
from tests.helpers import free_port, running_app, wait_for_url  # noqa: E402

OPEN_WEBUI_VERSION = "0.12.4"
VENV = ROOT / "bench" / ".openwebui" / "venv"
MESSAGE = "Tell me a story about an orca who learns to surf."
START_TIMEOUT_S = 600.0  # Open WebUI's first start migrates its database and builds its caches
REPLY_TIMEOUT_S = 300.0  # the tiny model on a busy 2-core machine took 60 s for 1024 tokens
TITLE_TIMEOUT_S = 180.0

# Open WebUI's page (0.12): the message box, its send button, an answer's text, its action bar
CHAT_INPUT = "#chat-input"
SEND_BUTTON = "#send-message-button"
ASSISTANT_TEXT = "#response-content-container"
CONTINUE_BUTTON = "button[aria-label='Continue Response']"


def ensure_open_webui() -> Path:
    """The `open-webui` command of the bench's own venv, installed there if it is not yet."""
    exe = VENV / "bin" / "open-webui"
    pip = VENV / "bin" / "pip"
    if not (VENV / "bin" / "python").exists():
        subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
    installed = subprocess.run([str(pip), "show", "open-webui"], capture_output=True, text=True).stdout
    if f"Version: {OPEN_WEBUI_VERSION}" not in installed or not exe.exists():
        print(f"installing open-webui=={OPEN_WEBUI_VERSION} into {VENV} (minutes)...", flush=True)
        subprocess.run([str(pip), "install", "-q", f"open-webui=={OPEN_WEBUI_VERSION}"], check=True)
    return exe


def open_webui_env(api_base: str, data_dir: Path) -> dict[str, str]:
    """Offline, no login, one OpenAI connection; nothing fetched at start. Only the server's
    environment is set: the user's settings in the page stay Open WebUI's defaults."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VIRTUAL_ENV", "PYTHON"))}
    env.update(
        {
            "PATH": f"{VENV / 'bin'}:{env.get('PATH', '')}",
            "DATA_DIR": str(data_dir),
            "OPENAI_API_BASE_URL": api_base,
            "OPENAI_API_KEY": "unused",
            "ENABLE_OPENAI_API": "True",
            "ENABLE_OLLAMA_API": "False",
            "WEBUI_AUTH": "False",
            "WEBUI_SECRET_KEY": "bench-only",
            "OFFLINE_MODE": "True",
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            # No sentence-transformers model at start: the embedding engine is an API, never
            # called here; no reranker; speech-to-text left to the browser.
            "RAG_EMBEDDING_ENGINE": "openai",
            "RAG_EMBEDDING_MODEL_AUTO_UPDATE": "False",
            "RAG_RERANKING_MODEL_AUTO_UPDATE": "False",
            "RAG_RERANKING_MODEL": "",
            "WHISPER_MODEL_AUTO_UPDATE": "False",
            "STT_ENGINE": "web",
            "ENABLE_VERSION_UPDATE_CHECK": "False",
            "ENABLE_COMMUNITY_SHARING": "False",
            "ANONYMIZED_TELEMETRY": "False",
            "SCARF_NO_ANALYTICS": "true",
            "DO_NOT_TRACK": "true",
        }
    )
    return env


class Steps:
    """Each step passed or failed, with what was seen; later steps still run where they can."""

    def __init__(self) -> None:
        self.results: dict[str, dict] = {}

    def run(self, name: str, fn, *args) -> dict | None:
        started = time.monotonic()
        try:
            seen = fn(*args) or {}
            self.results[name] = {"ok": True, **seen}
        except Exception as error:  # a failed step is a result, not a crash
            self.results[name] = {"ok": False, "error": f"{type(error).__name__}: {error}"[:1500]}
        self.results[name]["seconds"] = round(time.monotonic() - started, 1)
        print(f"  {name}: {'ok' if self.results[name]['ok'] else 'FAILED'}", flush=True)
        return self.results[name]


def last_reply(page: Page) -> str:
    replies = page.locator(ASSISTANT_TEXT)
    return replies.last.inner_text() if replies.count() else ""


def watch_reply(page: Page, seen, kind: str, count: int) -> list[int]:
    """Lengths of the last reply each time it changed, until the Space has answered `count`
    requests of `kind` and the page has shown the end of it (no change for a few seconds)."""
    lengths, current, last_change = [], last_reply(page), time.monotonic()
    deadline = time.monotonic() + REPLY_TIMEOUT_S
    while time.monotonic() < deadline:
        text = last_reply(page)
        if text != current:
            current, last_change = text, time.monotonic()
            lengths.append(len(text))
        elif len(seen.finished(kind)) >= count and time.monotonic() - last_change > 3:
            return lengths
        time.sleep(0.05)
    raise TimeoutError(f"no end of the {kind} reply within {REPLY_TIMEOUT_S:.0f}s (lengths {lengths[-5:]})")


STORED_REPLY_JS = """async () => {
  const id = location.pathname.split('/').pop();
  const r = await fetch(`/api/v1/chats/${id}`, {headers: {Authorization: `Bearer ${localStorage.token}`}});
  const history = (await r.json()).chat.history;
  return history.messages[history.currentId].content;
}"""


def stored_reply(page: Page) -> str | None:
    """The last reply as Open WebUI saved it. The page's text is no measure of length: the demo
    model's random tokens hold `$` and `\\` that Open WebUI renders as LaTeX, which can shrink."""
    try:
        return page.evaluate(STORED_REPLY_JS)
    except Exception:  # an API that changed shape: the page's text is used instead
        return None


def open_chat(page: Page, url: str) -> dict:
    page.goto(url, wait_until="domcontentloaded")
    expect(page.locator(CHAT_INPUT)).to_be_visible(timeout=120_000)
    # The "what's new" notice shows on a first visit; it is dismissed as a user would.
    page.keyboard.press("Escape")
    return {"page_title": page.title()}


def send_message(page: Page, seen) -> dict:
    page.locator(CHAT_INPUT).click()
    page.keyboard.type(MESSAGE)
    page.keyboard.press("Enter")
    lengths = watch_reply(page, seen, "chat", 1)
    text = last_reply(page)
    request = seen.finished("chat")[0]
    if request["status"] != 200:
        raise AssertionError(f"the Space answered {request['status']}: {request.get('answer')}")
    if len(set(lengths)) < 3:
        raise AssertionError(f"the reply did not stream in (lengths seen {lengths}): {text[:300]!r}")
    return {"distinct_lengths_seen": len(set(lengths)), "reply_chars": len(text), "reply_start": text[:200]}


def continue_reply(page: Page, seen) -> dict:
    before = stored_reply(page) or last_reply(page)
    page.locator(ASSISTANT_TEXT).last.hover()
    button = page.locator(CONTINUE_BUTTON).last
    expect(button).to_be_visible(timeout=20_000)
    button.click()
    lengths = watch_reply(page, seen, "continue", 1)
    stored = stored_reply(page)
    after = stored or last_reply(page)
    request = seen.finished("continue")[0]
    if request["status"] != 200:
        raise AssertionError(f"the Space answered {request['status']}: {request.get('answer')}")
    # Open WebUI may trim trailing space of the shown text: compare all but the very end.
    if len(after) <= len(before) or not after.startswith(before[:-5]):
        raise AssertionError(
            f"the reply did not grow from where it was: {len(before)} -> {len(after)} chars; "
            f"now ends {after[-200:]!r}"
        )
    return {
        "measured_on": "stored reply" if stored is not None else "page text",
        "chars_before": len(before),
        "chars_after": len(after),
        "distinct_lengths_seen": len(set(lengths)),
        "request": request,
    }


def chat_title(page: Page, seen) -> dict:
    """Open WebUI's title task answered by the Space, and the title the sidebar shows. A title is
    read from a JSON object in the answer; with no such object (the demo model's random text)
    Open WebUI names the chat after the first message instead."""
    deadline = time.monotonic() + TITLE_TIMEOUT_S
    while not seen.finished("title") and time.monotonic() < deadline:
        time.sleep(0.5)
    titles = seen.finished("title")
    if not titles:
        raise AssertionError(f"no title request answered within {TITLE_TIMEOUT_S:.0f}s")
    request = titles[0]
    if request["status"] != 200 or not request.get("answer_content"):
        raise AssertionError(f"the title request got {request['status']}: {request.get('answer')}")
    chat_id = page.url.rstrip("/").rsplit("/", 1)[-1]
    entry = page.locator(f"a[href$='/c/{chat_id}']").first
    expect(entry).to_be_visible(timeout=30_000)
    shown = entry.inner_text().strip().splitlines()[0]
    return {
        "title_shown": shown,
        "title_from_model": shown != MESSAGE,
        "request": request,
    }


def wait_for_background(seen, timeout: float = 300.0) -> list[dict]:
    """Open WebUI's follow-up and tag tasks run after the reply: their answers are waited for,
    so that every request's status is known (one cut off by the end of the run would be noise)."""
    deadline = time.monotonic() + timeout
    while seen.in_flight() and time.monotonic() < deadline:
        time.sleep(0.5)
    return seen.in_flight()


def drive(url: str, seen, shots: Path) -> dict:
    steps = Steps()
    with chromium() as browser:
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        console: list[str] = []
        page.on("console", lambda m: console.append(m.text[:300]) if m.type == "error" else None)
        if steps.run("open", open_chat, page, url)["ok"]:
            if steps.run("reply_streamed", send_message, page, seen)["ok"]:
                steps.run("continue", continue_reply, page, seen)
            steps.run("title", chat_title, page, seen)
        left = wait_for_background(seen)
        steps.results["unanswered_requests"] = {"ok": not left, "requests": left}
        page.screenshot(path=str(shots), full_page=True)
        steps.results["console_errors"] = console[:20]
    return steps.results


def prompt_tokens(space: str, seen) -> dict[str, int | str]:
    """How many tokens of the context Open WebUI's chat and continue prompts take (its tools
    included): each request sent again as it was, unstreamed, for one token, to read its usage."""
    sizes: dict[str, int | str] = {}
    for kind, raw in seen.bodies.items():
        body = {**json.loads(raw), "stream": False, "max_tokens": 1}
        request = urllib.request.Request(
            f"{space}/v1/chat/completions", json.dumps(body).encode(), {"content-type": "application/json"}
        )
        try:
            with urllib.request.urlopen(request, timeout=300) as response:
                sizes[kind] = json.load(response)["usage"]["prompt_tokens"]
        except OSError as error:
            sizes[kind] = f"not measured: {error}"
    return sizes


def space_v1_lines(log: Path) -> list[str]:
    return [line.rstrip() for line in log.read_text(errors="replace").splitlines() if "/v1" in line]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    today = datetime.date.today().isoformat()
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / f"{today}-open-webui.json")
    args = parser.parse_args()
    exe = ensure_open_webui()
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        write_tiny_checkpoint(tmp_path / "home" / ".cache" / "orca-space" / "tiny")
        space_log = tmp_path / "space.log"
        with running_app(
            "--demo", "--rate-limit", "0", env={"HOME": str(tmp_path / "home")}, log_path=space_log
        ) as space:
            proxy, seen = start_proxy(int(space.rsplit(":", 1)[1]))
            api_base = f"http://127.0.0.1:{proxy.server_address[1]}/v1"
            port = free_port()
            webui_log = tmp_path / "open-webui.log"
            with open(webui_log, "w") as log:
                webui = subprocess.Popen(
                    [str(exe), "serve", "--host", "127.0.0.1", "--port", str(port)],
                    env=open_webui_env(api_base, tmp_path / "data"),
                    cwd=tmp_path,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            url = f"http://127.0.0.1:{port}"
            started = time.monotonic()
            try:
                wait_for_url(f"{url}/health", timeout=START_TIMEOUT_S, proc=webui)
                start_s = round(time.monotonic() - started, 1)
                print(f"Open WebUI {OPEN_WEBUI_VERSION} answered after {start_s}s; driving it", flush=True)
                shots = VENV.parent / "last-run.png"  # the page at the end (git-ignored)
                steps = drive(url, seen, shots)
                sizes = prompt_tokens(space, seen)
            except Exception as error:
                start_s, steps, sizes = None, {"start": {"ok": False, "error": str(error)}}, {}
            finally:
                webui.terminate()
                try:
                    webui.wait(15)
                except subprocess.TimeoutExpired:
                    webui.kill()
                proxy.shutdown()
            webui_tail = webui_log.read_text(errors="replace").splitlines()[-40:]
        result = {
            "open_webui_version": OPEN_WEBUI_VERSION,
            "date": today,
            "open_webui_start_s": start_s,
            "steps": steps,
            "prompt_tokens_of_open_webui_requests": sizes,
            "space_context_length": 8192,  # app.py's default --context-length, which this run uses
            "requests_to_space": seen.snapshot(),
            "space_v1_log": space_v1_lines(space_log),
            "open_webui_log_tail": webui_tail
            if any(not s.get("ok", True) for s in steps.values() if isinstance(s, dict))
            else [],
        }
    print_summary(result)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    print(f"wrote {args.out}")
    failed = [k for k, v in result["steps"].items() if isinstance(v, dict) and not v.get("ok")]
    sys.exit(1 if failed else 0)


def print_summary(result: dict) -> None:
    print(f"\nOpen WebUI {result['open_webui_version']} (defaults) against app.py --demo:")
    for name, step in result["steps"].items():
        if isinstance(step, dict):
            detail = step.get("error") or {k: v for k, v in step.items() if k not in ("ok", "request")}
            print(f"  {name:15} {'ok    ' if step['ok'] else 'FAILED'} {detail}")
    print("requests Open WebUI sent to the Space:")
    for r in result["requests_to_space"]:
        extra = (
            f" kind={r.get('kind')} max_tokens={r.get('max_tokens')} tools={r.get('tools')} roles={r.get('roles')}"
            if "fields" in r
            else ""
        )
        if "finish_reason" in r:
            extra += (
                f" content_deltas={r['content_deltas']} content_chars={r['content_chars']}"
                f" tool_call_deltas={r['tool_call_deltas']} finish_reason={r['finish_reason']}"
            )
        print(f"  {r['method']} {r['path']} -> {r['status']}{extra}")
        if not isinstance(r["status"], int) or r["status"] >= 400:
            print(f"      answer: {r.get('answer') or r.get('error')}")
    print(
        f"prompt tokens (of the Space's {result['space_context_length']}): {result['prompt_tokens_of_open_webui_requests']}"
    )
    print("the Space's log lines about /v1:")
    for line in result["space_v1_log"]:
        print(f"  {line}")


if __name__ == "__main__":
    main()
