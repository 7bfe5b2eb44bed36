"""Browser helpers for the page's features: replies and their figures, the panels, layout checks.

Used by tests/test_browser.py with Playwright's sync API on a running app; each helper waits for
what it needs with the page's default timeout and returns what it saw.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from playwright.sync_api import expect

from tests.browser_flow import (
    BOT_MESSAGES,
    CHAT_TEXTBOX,
    REPLY_STATS,
    SUBMIT_BUTTON,
    close_settings,
    open_settings,
    send,
    set_max_new_tokens,
)

CHAT_LABEL = "#chatbot label[data-testid=block-label]"
CHAT_TOOLBAR = "#chatbot .top-panel"
FIRST_MESSAGE = "#chatbot .message-row"
CONTINUE = "#continue"
PROMPT_PANEL = "Prompt of the last reply"
EXPORT_PANEL = "Export and import"
ENGINE_PANEL = "Engine"
ENDINGS = ("finished", "hit max new tokens", "stopped", "ended by an error")
NOTE_AFTER_LAST_MESSAGE_JS = """
() => {
  const users = document.querySelectorAll("#chatbot [data-testid=user]");
  const notes = document.querySelectorAll("#chatbot .thought-group .title");
  if (!users.length || !notes.length) return false;
  const position = users[users.length - 1].compareDocumentPosition(notes[notes.length - 1]);
  return Boolean(position & Node.DOCUMENT_POSITION_FOLLOWING);
}
"""


def open_page(page, url: str, timeout_s: float = 30.0):
    page.set_default_timeout(timeout_s * 1000)
    page.goto(url)
    box = page.locator(CHAT_TEXTBOX)
    box.wait_for(state="visible")
    return box


def chat_and_wait(page, message: str, max_new_tokens: int | None = None) -> str:
    """Send `message` (after setting max new tokens) and wait until its reply has ended."""
    if max_new_tokens is not None:
        open_settings(page)
        set_max_new_tokens(page, max_new_tokens)
        close_settings(page)
    replies = page.locator(BOT_MESSAGES).count()
    send(page.locator(CHAT_TEXTBOX), message)
    expect(page.locator(BOT_MESSAGES)).to_have_count(replies + 1, timeout=30_000)
    # Its own note (not the last reply's, which already says how that one ended): a note drawn
    # after the message just sent. (Not a count of notes: a chat just opened may still be drawing.)
    page.wait_for_function(NOTE_AFTER_LAST_MESSAGE_JS, timeout=30_000)
    wait_until_settled(page)
    return drawn_text(page.locator(BOT_MESSAGES).last)


def drawn_text(locator, quiet_s: float = 0.25, timeout_s: float = 30.0) -> str:
    """The element's text once its drawing has stopped changing for `quiet_s`. A reply that has
    ended is drawn a moment later (gradio draws Markdown asynchronously, a formula once KaTeX has
    loaded), so a read right after the ending can be a step behind what the page holds."""
    deadline = time.monotonic() + timeout_s
    text, since = locator.inner_text(), time.monotonic()
    while time.monotonic() - since < quiet_s:
        assert time.monotonic() < deadline, f"the text kept changing for {timeout_s} s: {text[-80:]!r}"
        time.sleep(0.05)
        now = locator.inner_text()
        if now != text:
            text, since = now, time.monotonic()
    return text


def wait_until_settled(page, timeout_s: float = 30.0) -> None:
    """The reply has ended: submit is back, and the last note says why it ended."""
    expect(page.locator(SUBMIT_BUTTON)).to_be_visible(timeout=timeout_s * 1000)
    expect(page.locator(CHAT_TEXTBOX)).to_be_enabled(timeout=timeout_s * 1000)
    deadline = time.monotonic() + timeout_s
    while not any(word in last_stats(page) for word in ENDINGS):
        assert time.monotonic() < deadline, f"the reply's note never said why it ended: {last_stats(page)!r}"
        time.sleep(0.05)


def last_stats(page) -> str:
    notes = page.locator(REPLY_STATS)
    return notes.last.inner_text() if notes.count() else ""


def open_panel(page, name: str) -> None:
    page.get_by_role("button", name=name).click()


def show_export_panel(page) -> None:
    if not page.locator("#import-json").is_visible():
        open_panel(page, EXPORT_PANEL)


def exported(page, folder: Path) -> dict:
    """The chat as the browser holds it (and sends it back each turn), through the JSON export:
    the replies as the server sent them, not as drawn (a reply's Markdown is drawn a moment after
    its text arrives, so a read of the drawing right after a reply ends can be a step behind)."""
    show_export_panel(page)
    with page.expect_download() as download:
        page.locator("#export-json").click()
    saved = folder / "export.json"
    download.value.save_as(saved)
    return json.loads(saved.read_text())


def box_of(page, selector: str) -> dict:
    box = page.locator(selector).first.bounding_box()
    assert box is not None, f"{selector} is not on the page"
    return box


def overlap(a: dict, b: dict) -> float:
    """The area two bounding boxes share, in px²."""
    width = min(a["x"] + a["width"], b["x"] + b["width"]) - max(a["x"], b["x"])
    height = min(a["y"] + a["height"], b["y"] + b["height"]) - max(a["y"], b["y"])
    return max(0.0, width) * max(0.0, height)


CONTRAST_JS = """
(element) => {
  const rgba = (text) => text.match(/[\\d.]+/g).map(Number);
  const luminance = ([r, g, b]) => {
    const lin = (c) => { c /= 255; return c <= 0.03928 ? c / 12.92 : ((c + 0.055) / 1.055) ** 2.4; };
    return 0.2126 * lin(r) + 0.7152 * lin(g) + 0.0722 * lin(b);
  };
  let node = element, background = null;
  while (node && !background) {
    const color = rgba(getComputedStyle(node).backgroundColor);
    if (color.length < 4 || color[3] > 0.5) background = color;
    node = node.parentElement;
  }
  background = background || [255, 255, 255];
  const [a, b] = [luminance(rgba(getComputedStyle(element).color)), luminance(background)];
  return (Math.max(a, b) + 0.05) / (Math.min(a, b) + 0.05);
}
"""


COVERED_MESSAGE_POINTS_JS = """() => {
  const chat = document.querySelector('#chatbot .bubble-wrap');
  const view = chat.getBoundingClientRect();
  const covered = [];
  for (let top = 0; top <= chat.scrollHeight; top += 40) {
    chat.scrollTop = top;
    for (const message of document.querySelectorAll('#chatbot .message')) {
      const box = message.getBoundingClientRect();
      for (let y = Math.max(box.top, view.top) + 2; y < Math.min(box.bottom, view.bottom) - 2; y += 6) {
        for (let x = box.left + 2; x < box.right - 2; x += 8) {
          const hit = document.elementFromPoint(x, y);
          // gradio's scroll-to-bottom arrow floats over the list on purpose, while scrolled up.
          if (hit && !message.contains(hit) && !hit.closest('.scroll-down-button-container')) {
            covered.push(`scrolled ${top}px: ${hit.tagName}.${hit.className} at ${Math.round(x)},${Math.round(y)}`);
          }
        }
      }
    }
  }
  return covered;
}"""


def covered_message_points(page) -> list[str]:
    """Points of messages in the chat's visible area that something else is drawn over, at
    every scroll position of the message list (scrolled 40 px at a time)."""
    return page.evaluate(COVERED_MESSAGE_POINTS_JS)


def contrast(page, selector: str) -> float:
    """The WCAG contrast ratio of an element's text against the first opaque background behind it."""
    return page.locator(selector).last.evaluate(CONTRAST_JS)


def click_last(page, button: str) -> None:
    """Click the last of the chat's message buttons named `button` (Retry, Undo, Edit...)."""
    page.locator("#chatbot").get_by_role("button", name=button, exact=True).last.click()


def reply_after(page, action, max_new_tokens: int) -> str:
    """Set max new tokens, do `action()` (which starts a reply), wait until that reply has ended,
    return its text.

    A reply on the tiny model can start and end between two looks at the page, and a retry or an
    edit keeps the number of replies, so the new reply is told from the old by its length: greedy
    replies of the random-weight model run to max new tokens, which the caller makes differ."""
    open_settings(page)
    set_max_new_tokens(page, max_new_tokens)
    close_settings(page)
    action()
    expect(page.locator(REPLY_STATS).last).to_contain_text(f"{max_new_tokens} tokens · ", timeout=60_000)
    wait_until_settled(page)
    return drawn_text(page.locator(BOT_MESSAGES).last)


def retry_last(page, max_new_tokens: int) -> str:
    """Retry the last reply (as `max_new_tokens` long) and wait until it has ended; its text."""
    return reply_after(page, lambda: click_last(page, "Retry"), max_new_tokens)


def edit_last_message(page, text: str, max_new_tokens: int) -> str:
    """Edit the last user message to `text` and wait until its new reply (as `max_new_tokens`
    long) has ended; its text."""

    def edit() -> None:
        click_last(page, "Edit")
        page.locator("#chatbot textarea.edit-textarea").fill(text)
        click_last(page, "Submit")

    return reply_after(page, edit, max_new_tokens)
