"""One chat driven through a real browser, reusable against any running app (local or remote backend).

`chat_in_browser(page, base_url)` types a message, watches the reply stream into the page, presses
stop mid-stream, checks that generation ended (in the page and in `/healthz`), then sends a second
message with CJK and emoji and waits for its reply; under each reply the line of figures says
why it ended. It asserts as it goes and returns what it saw.

Headless Debian Chromium only: `playwright install` cannot download a browser here, so a missing
`/usr/bin/chromium` is a failure with a clear message, never a skip.
"""

from __future__ import annotations

import contextlib
import json
import re
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from playwright.sync_api import expect, sync_playwright

CHROMIUM = Path("/usr/bin/chromium")
# The flags known to work for headless Chromium in this environment (see shared PITFALLS).
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
VIEWPORT = {"width": 1280, "height": 900}
# Playwright's `expect` waits 5 s by default, its own setting beside the pages' 30 s: on a busy
# machine a page that loads after a login took longer. Every browser test imports this module.
expect.set_options(timeout=30_000)

FIRST_MESSAGE = "Tell me a story about an orca who learns to surf."
SECOND_MESSAGE = "谢谢！🐋🌊 Now tell it again in 日本語, please, with emoji 😊"
# Long enough that the reply is still streaming when stop is pressed, on any machine.
LONG_REPLY_TOKENS = 4000
SHORT_REPLY_TOKENS = 40
GROWTH_OBSERVATIONS = 4  # distinct, growing reply lengths to see before pressing stop
SETTINGS_ACCORDION = "System message and generation settings"

# The chat textbox is the one that shares its input row with the submit or stop button
# (the system message in the settings accordion is a textarea too).
CHAT_TEXTBOX = ".input-container:has(button.submit-button, button.stop-button) > textarea"
STOP_BUTTON = "button.stop-button"
SUBMIT_BUTTON = "button.submit-button"
USER_MESSAGES = "[data-testid=user]"
# A reply's text. The page's notes (a reply's figures, "waiting for the model") are gradio
# "thoughts" in the same bubble, not replies.
BOT_MESSAGES = "[data-testid=bot]:not(:has(.thought-group))"
REPLY_STATS = "#chatbot .thought-group .title"


@dataclass
class BrowserChat:
    """What the browser showed during `chat_in_browser`."""

    reply_lengths: list[int]  # the first reply's length at each distinct observation before stop
    stopped_reply: str
    second_reply: str
    page_errors: list[str] = field(default_factory=list)


def require_chromium() -> None:
    """Fail (never skip) when Debian's Chromium is not installed."""
    if not CHROMIUM.exists():
        pytest.fail(
            f"{CHROMIUM} is missing: the browser test needs Debian's chromium "
            "(apt-get install chromium fonts-noto-cjk fonts-noto-color-emoji). "
            "`playwright install` cannot download a browser here.",
            pytrace=False,
        )


def launch_chromium(playwright):
    """Headless Debian Chromium with the flags that work here."""
    require_chromium()
    return playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)


@contextlib.contextmanager
def chromium_page(viewport: dict[str, int] = VIEWPORT):
    """A fresh page in a fresh headless Chromium, closed afterwards."""
    with chromium() as browser:
        yield browser.new_page(viewport=viewport, device_scale_factor=1)


@contextlib.contextmanager
def chromium():
    """A headless Chromium for several pages, closed afterwards."""
    with sync_playwright() as playwright:
        browser = launch_chromium(playwright)
        try:
            yield browser
        finally:
            browser.close()


def health(base_url: str) -> dict:
    with urllib.request.urlopen(f"{base_url}/healthz", timeout=5) as response:
        return json.load(response)


def wait_for_idle_server(base_url: str, timeout: float = 6.0) -> dict:
    deadline = time.monotonic() + timeout
    body = health(base_url)
    while body.get("active") != 0 and time.monotonic() < deadline:
        time.sleep(0.1)
        body = health(base_url)
    assert body.get("active") == 0, (
        f"the server still reports a running generation {timeout}s after stop: {body}"
    )
    return body


def chat_in_browser(
    page,
    base_url: str,
    screenshot_path: Path | None = None,
    check_server_load: bool = True,
    timeout_s: float = 30.0,
) -> BrowserChat:
    """Stream, stop, and chat again in `page` against the app at `base_url`; see the module docstring.

    `check_server_load=False` skips the `/healthz` "active" checks for a deployment without them.
    """
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.set_default_timeout(timeout_s * 1000)
    page.goto(base_url)
    box = page.locator(CHAT_TEXTBOX)
    box.wait_for(state="visible")
    header = page.locator("h1").first.inner_text()
    assert "\ufffd" not in header and "🐋" in header, f"the header lost its emoji: {header!r}"

    # 1) A long reply, watched while it streams. Greedy: a sampled reply can meet <|im_end|>
    # before stop is pressed; greedy decoding of FIRST_MESSAGE on the tiny model runs 4,000 tokens.
    open_settings(page)
    set_slider(page, "Temperature", 0)
    set_max_new_tokens(page, LONG_REPLY_TOKENS)
    send(box, FIRST_MESSAGE)
    reply = page.locator(BOT_MESSAGES).last
    lengths = watch_reply_grow(page, reply, GROWTH_OBSERVATIONS, timeout_s)
    assert all(b > a for a, b in zip(lengths, lengths[1:])), f"the reply did not only grow: {lengths}"
    assert page.get_by_text("in line").count() == 0, "a lone user was told to wait for a slot"

    # 2) Stop mid-stream: the page lets go and the server frees the slot.
    stop = page.locator(STOP_BUTTON)
    assert stop.is_visible(), "no stop button while the reply is streaming"
    if check_server_load:
        busy = health(base_url)
        assert busy.get("active") == 1, f"the server is not generating while the page streams: {busy}"
    stop.click()
    expect(page.locator(SUBMIT_BUTTON), "no submit button after stop").to_be_visible(timeout=15_000)
    expect(box, "the textbox is still disabled after stop").to_be_enabled(timeout=15_000)
    # The page's redraw after a reply lands with the note that says it was stopped.
    expect(page.locator(REPLY_STATS).nth(0)).to_contain_text("stopped")
    stopped = reply.inner_text()
    time.sleep(1.0)
    assert reply.inner_text() == stopped, "the reply kept changing after stop"
    assert len(stopped) >= lengths[-1], "the reply shrank when stopped"
    if check_server_load:
        wait_for_idle_server(base_url)

    # 3) The next message works after stop, and CJK and emoji come through intact.
    set_max_new_tokens(page, SHORT_REPLY_TOKENS)
    send(box, SECOND_MESSAGE)
    page.locator(BOT_MESSAGES).nth(1).wait_for(state="visible")
    expect(box, "the textbox stayed disabled after the second reply").to_be_enabled(timeout=timeout_s * 1000)
    users = page.locator(USER_MESSAGES)
    bots = page.locator(BOT_MESSAGES)
    expect(users, "two user messages").to_have_count(2)
    expect(bots, "two replies").to_have_count(2)
    # Equality also rules out U+FFFD: a CJK character or emoji cut in half on the way shows as one.
    expect(users.nth(1), "the CJK/emoji message was changed on the way").to_have_text(SECOND_MESSAGE)
    second = bots.nth(1).inner_text()
    assert second.strip(), "the reply after stop is empty"
    assert bots.nth(0).inner_text() == stopped, "the stopped reply changed when the next turn was sent"
    # Under each reply, the backend's own figures and why it ended.
    expect(page.locator(REPLY_STATS).nth(0)).to_contain_text("stopped")
    expect(page.locator(REPLY_STATS).nth(1)).to_contain_text(
        re.compile(r"\d+ tokens? · .*(finished|hit max new tokens)")
    )
    if check_server_load:
        wait_for_idle_server(base_url)
    assert not errors, f"uncaught errors in the page: {errors}"

    if screenshot_path is not None:
        take_screenshot(page, screenshot_path)
    return BrowserChat(lengths, stopped, second, errors)


def open_settings(page) -> None:
    toggle_settings(page, "visible")


def close_settings(page) -> None:
    toggle_settings(page, "hidden")


def toggle_settings(page, state: str) -> None:
    """Open ("visible") or fold ("hidden") the settings accordion, whichever way it starts."""
    field = page.get_by_label("number input for Max new tokens")
    if field.is_visible() != (state == "visible"):
        # The last accordion with this label is the one ChatInterface fills with the inputs.
        page.get_by_role("button", name=SETTINGS_ACCORDION).last.click()
    field.wait_for(state=state)


def set_max_new_tokens(page, value: int) -> None:
    set_slider(page, "Max new tokens", value)


def set_slider(page, label: str, value: float, tries: int = 3) -> None:
    """Set a slider in the (open) settings through its number box.

    Typed within a few milliseconds of the accordion opening, a value can be put back to the
    default by the page itself (seen once in 20 fresh pages with the engine panel open: both boxes
    read 500 again 6 ms after Enter, with no answer from the server in between), which no person
    types fast enough to meet. So the value is typed again if it did not take; one that never
    takes still fails here."""
    number = page.get_by_label(f"number input for {label}")
    slider = page.get_by_label(f"range slider for {label}")
    for attempt in range(1, tries + 1):
        number.fill(str(value))
        number.press("Enter")
        try:
            # The slider follows the number box a moment later (the page's own update).
            expect(slider, f"{label} did not take {value}").to_have_value(str(value), timeout=2000)
            return
        except AssertionError:
            if attempt == tries:
                raise


def send(box, message: str) -> None:
    box.fill(message)
    box.press("Enter")


def watch_reply_grow(page, reply, observations: int, timeout_s: float) -> list[int]:
    """Poll the reply until it has shown `observations` different lengths; return them in order."""
    reply.wait_for(state="visible")
    lengths: list[int] = []
    deadline = time.monotonic() + timeout_s
    while len(lengths) < observations:
        assert time.monotonic() < deadline, f"saw only reply lengths {lengths} in {timeout_s:.0f}s"
        assert page.locator(STOP_BUTTON).is_visible(), (
            f"the reply ended before it was seen streaming (lengths {lengths}); "
            "multi-chunk streaming is not visible in the page"
        )
        length = len(reply.inner_text())
        if length and (not lengths or length != lengths[-1]):
            lengths.append(length)
        time.sleep(0.05)
    return lengths


def take_screenshot(page, path: Path) -> Path:
    """The conversation as a README would show it: settings folded, the whole page, no hover."""
    close_settings(page)
    page.mouse.move(0, 0)
    path.parent.mkdir(parents=True, exist_ok=True)
    # animations="disabled" finishes transitions (the accordion's chevron) before the capture.
    page.screenshot(path=str(path), full_page=True, animations="disabled")
    return path
