"""What a new user meets on the page, in headless Chromium.

A message shows as typed and a reply's Markdown renders without its raw HTML, both reaching the
model unchanged; a refused import changes nothing; a small context answers with the defaults;
refusals speak the page's words and take one line of the log; the controls have names and
axe-core finds nothing serious at phone and desktop width, light and dark; the placeholder stays
after a reply; the panels keep their words whole on a phone.

One app serves every test: `python app.py --demo --context-length 300`, the small context a new
user tried, so every test also runs with the max-new-tokens slider fitted to it.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
from playwright.sync_api import expect

from orca_space.web.page.chat_hooks import MESSAGE_PLACEHOLDER
from tests.browser_flow import (
    BOT_MESSAGES,
    CHAT_TEXTBOX,
    USER_MESSAGES,
    open_settings,
    require_chromium,
    send,
    set_slider,
)
from tests.helpers import ROOT, demo_home, running_app
from tests.page_flow import (
    ENGINE_PANEL,
    PROMPT_PANEL,
    chat_and_wait,
    exported,
    open_page,
    open_panel,
    show_export_panel,
    wait_until_settled,
)

pytestmark = pytest.mark.browser

CONTEXT = 300
# Installed by .ci/run (`npm install --prefix .ci/npm axe-core@...`); ORCA_AXE_JS points elsewhere.
AXE_JS = Path(
    os.environ.get("ORCA_AXE_JS", ROOT / ".ci" / "npm" / "node_modules" / "axe-core" / "axe.min.js")
)
WIDTHS = {"desktop": {"width": 1280, "height": 900}, "phone": {"width": 390, "height": 844}}
TYPED = (
    'hi</s><s> and <b>bold?</b> **not bold** $x$ <img src=x onerror="window.pwned=1">\n    indented\tby tab'
)
REPLY = (
    '**Bold** and <b>raw bold</b>, <s>struck</s>, <img src=x onerror="window.pwned=2">, '
    '<script>window.pwned=3</script> and <a href="javascript:window.pwned=4">a link</a>.\n\n'
    '```html\n<div class="in-code">code</div>\n```\n\n'
    "Inline `<i>code</i>` and math $a^2+b^2=c^2$.\n\n<div>a block of HTML</div>"
)
USER_BODY = "[data-testid=user] .message-content > .md"
STATUS_ERROR = "[data-testid=status-tracker]:not(.hide) .error"  # gradio's red badge over a failed output
NOTE_STOP_BUTTON_NAMES_JS = """
() => {
  window.stopButtonNames = [];
  new MutationObserver(() => {
    for (const button of document.querySelectorAll("#message-box button.stop-button")) {
      window.stopButtonNames.push(button.getAttribute("aria-label"));
    }
  }).observe(document.body, {subtree: true, childList: true, attributes: true});
}
"""
# gradio dims an output (0.2 opacity) while its event runs unless show_progress is "hidden".
NOTE_DIMMED_PANELS_JS = """
() => {
  window.dimmedPanels = [];
  const panels = "#prompt-summary, #prompt-text, #engine-panel";
  new MutationObserver(() => {
    for (const dimmed of document.querySelectorAll(`:is(${panels}) .pending, :is(${panels}).pending`)) {
      window.dimmedPanels.push(dimmed.closest("[id]").id);
    }
  }).observe(document.body, {subtree: true, attributes: true, attributeFilter: ["class"]});
}
"""
TRANSITIONS_ENDED_JS = """
async () => {
  const fades = document.getAnimations().filter((a) => a instanceof CSSTransition);
  await Promise.all(fades.map((a) => a.finished.catch(() => null)));
}
"""
# Words of the panels' text split over two lines (a range over a word with more than one line box).
SPLIT_WORDS_JS = """
(root) => {
  const split = [];
  const walker = document.createTreeWalker(root, NodeFilter.SHOW_TEXT);
  for (let node = walker.nextNode(); node; node = walker.nextNode()) {
    for (const word of node.data.matchAll(/\\p{L}{2,24}/gu)) {
      const range = document.createRange();
      range.setStart(node, word.index);
      range.setEnd(node, word.index + word[0].length);
      const lines = new Set([...range.getClientRects()].filter((r) => r.width > 0).map((r) => Math.round(r.top)));
      if (lines.size > 1) split.push(word[0]);
    }
  }
  return split;
}
"""


@pytest.fixture(scope="module", autouse=True)
def tools_installed():
    """Checked before the app starts, so that a missing tool fails at once (never a skip)."""
    require_chromium()
    if not AXE_JS.exists():
        pytest.fail(f"{AXE_JS} is missing: `bash .ci/run` installs axe-core from npm", pytrace=False)


@pytest.fixture(scope="module")
def app(tiny_dir, tmp_path_factory):
    """(url, log) of `--demo --context-length 300`; HOME's demo cache is the session's tiny
    checkpoint, as in test_browser.py, so nothing is built twice."""
    home = demo_home(tiny_dir, tmp_path_factory.mktemp("home"))
    log = home / "app.log"
    with running_app(
        "--demo", "--context-length", str(CONTEXT), env={"HOME": str(home)}, log_path=log
    ) as url:
        yield url, log


def new_page(browser, url: str, width: str = "desktop", theme: str = "light"):
    context = browser.new_context(viewport=WIDTHS[width], accept_downloads=True)
    page = context.new_page()
    open_page(page, url + ("/?__theme=dark" if theme == "dark" else "/"))
    return page


@pytest.fixture()
def page(browser, app):
    page = new_page(browser, app[0])
    yield page
    page.context.close()


def import_file(page, path: Path) -> None:
    show_export_panel(page)
    with page.expect_file_chooser() as chooser:
        page.locator("#import-json").click()
    chooser.value.set_files(str(path))


def conversation_file(path: Path, messages: list[dict]) -> Path:
    path.write_text(json.dumps({"format": "orca-space/conversation", "version": 1, "messages": messages}))
    return path


def test_a_users_message_shows_as_typed_and_comes_back_as_typed(page, tmp_path):
    chat_and_wait(page, TYPED, max_new_tokens=8)
    body = page.locator(USER_BODY).first
    # (A verbatim block's text ends with a line break, which draws no line: typed_message.py.)
    # Waited for: a message with a formula delimiter is drawn once KaTeX has loaded.
    expect(body, "the message on screen is not what was typed").to_have_text(
        re.compile("^" + re.escape(TYPED + "\n") + "$"), use_inner_text=True
    )
    rendered = body.locator("b, s, strong, img, .katex")
    assert rendered.count() == 0, (
        f"typed markup was rendered: {rendered.evaluate_all('(e) => e.map((x) => x.outerHTML)')}"
    )
    assert page.evaluate("window.pwned") is None
    # What the browser holds (and sends back as the next turn's history) is what was typed:
    # gradio's cleandoc dropped the indentation and made the tab spaces before.
    assert exported(page, tmp_path)["messages"][0]["content"] == TYPED


def test_a_replys_markdown_renders_and_its_raw_html_shows_as_text(page, tmp_path):
    import_file(page, conversation_file(tmp_path / "chat.json", [user(TYPED), assistant(REPLY)]))
    reply = page.locator(BOT_MESSAGES).first.locator(".md").first
    expect(reply.locator("strong")).to_have_text("Bold")
    assert reply.locator("b, s, img, script, a, div.in-code").count() == 0, "a reply's raw HTML was rendered"
    shown = reply.inner_text()
    for literal in (
        "<b>raw bold</b>",
        "<s>struck</s>",
        "<script>window.pwned=3</script>",
        "<div>a block of HTML</div>",
    ):
        assert literal in shown, f"{literal!r} is not shown as text: {shown!r}"
    assert '<div class="in-code">code</div>' in reply.locator("pre code").inner_text(), (
        "code is shown verbatim"
    )
    expect(reply.locator("code").filter(has_text="<i>code</i>")).to_have_count(1)
    expect(reply.locator(".katex").first).to_be_visible()
    assert "\\<" not in shown, "the backslashes that keep HTML as text are not seen"
    assert page.evaluate("window.pwned") is None, "raw HTML ran as script"
    messages = exported(page, tmp_path)["messages"]
    assert [m["content"] for m in messages] == [TYPED, REPLY], "the chat came back changed from the browser"
    saved = page.locator("#conversations").get_by_text(TYPED[:40])
    expect(saved, "the imported chat is in the saved conversations, by its first message").to_be_visible()


def user(text: str) -> dict:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict:
    return {"role": "assistant", "content": text}


def test_a_refused_import_changes_nothing_on_the_page(page, tmp_path):
    reply = chat_and_wait(page, "Hello, orca!", max_new_tokens=8)
    import_file(page, conversation_file(tmp_path / "bad.json", [{"role": "system", "content": "evil"}]))
    expect(page.locator(".toast-body").filter(has_text="has role 'system'")).to_be_visible()
    page.wait_for_timeout(500)  # gradio marks a failed event's outputs as it shows the toast
    assert page.locator(STATUS_ERROR).count() == 0, "a component shows gradio's red Error after the refusal"
    shown = page.locator(BOT_MESSAGES).first
    assert shown.inner_text() == reply
    box = shown.bounding_box()
    on_top = page.evaluate(
        "([x, y]) => document.elementFromPoint(x, y)?.closest('[data-testid=bot]') !== null",
        [box["x"] + box["width"] / 2, box["y"] + box["height"] / 2],
    )
    assert on_top, "the chat is covered after a refused import"
    chat_and_wait(page, "And now?", max_new_tokens=8)
    expect(page.locator(USER_MESSAGES)).to_have_count(2)


def test_a_small_context_answers_with_the_defaults_and_refusals_are_in_the_pages_words(page, app):
    log = app[1]
    open_settings(page)
    slider = page.get_by_label("range slider for Max new tokens")
    assert (slider.get_attribute("max"), slider.input_value()) == ("172", "150"), (
        "fitted to a 300-token context"
    )
    send(page.locator(CHAT_TEXTBOX), "Hello with the default settings.")
    wait_until_settled(page)
    assert page.locator(".toast-body.error").count() == 0, page.locator(".toast-body").all_inner_texts()
    expect(page.locator(BOT_MESSAGES)).to_have_count(1)

    # Below the least that samples, typed in the number box (the slider itself stops at 0.05).
    temperature = page.get_by_label("number input for Temperature")
    temperature.fill("0.005")
    temperature.press("Enter")
    send(page.locator(CHAT_TEXTBOX), "And again.")
    toast = page.locator(".toast-body.error").last
    expect(toast).to_contain_text("Temperature must be 0 (greedy) or at least 0.01")
    expect(toast).not_to_contain_text("temperature must")
    refusals = [line for line in log.read_text().splitlines() if "refused: Temperature must be 0" in line]
    assert len(refusals) == 1 and " INFO " in refusals[0], "a user's error is one line of the log"


@pytest.mark.parametrize("theme", ["light", "dark"])
@pytest.mark.parametrize("width", ["desktop", "phone"])
def test_the_controls_are_named_and_axe_finds_nothing_serious(browser, app, width, theme):
    page = new_page(browser, app[0], width, theme)
    try:
        expect(page.get_by_role("textbox", name="Message", exact=True)).to_be_visible()
        expect(page.get_by_role("button", name="Send message", exact=True)).to_be_visible()
        open_settings(page)
        set_slider(page, "Temperature", 0)  # greedy: the tiny model's reply runs all its 150 tokens
        # The stop button lives only while a reply streams (a second or so): its name is noted
        # as it appears rather than looked for in time.
        for panel in (PROMPT_PANEL, ENGINE_PANEL):
            open_panel(page, panel)
        expect(page.locator("#engine-panel")).to_contain_text("Chats")
        page.evaluate(NOTE_STOP_BUTTON_NAMES_JS)
        page.evaluate(NOTE_DIMMED_PANELS_JS)
        send(page.locator(CHAT_TEXTBOX), "Tell me a story about an orca who learns to surf.")
        wait_until_settled(page)
        expect(page.locator("#prompt-text")).to_contain_text("Tell me a story")
        page.wait_for_timeout(2500)  # an engine panel refresh or more
        assert "Stop the reply" in page.evaluate("window.stopButtonNames"), "the stop button has no name"
        assert page.evaluate("window.dimmedPanels") == [], "an open panel flickers as it is filled"
        # Nothing in flight, and no fade still running: axe reads colours as they are drawn.
        page.wait_for_function("() => document.querySelectorAll('.wrap.default:not(.hide)').length === 0")
        page.evaluate(TRANSITIONS_ENDED_JS)
        page.add_script_tag(path=str(AXE_JS))
        result = page.evaluate("async () => await axe.run(document, {resultTypes: ['violations']})")
        serious = [
            f"{v['impact']} {v['id']}: {[n['target'] for n in v['nodes']][:5]}"
            for v in result["violations"]
            if v["impact"] in ("serious", "critical")
        ]
        assert serious == [], f"axe-core at {width} width, {theme} theme"
    finally:
        page.context.close()


def test_the_placeholder_stays_and_the_panels_keep_words_whole_on_a_phone(browser, app):
    page = new_page(browser, app[0], "phone")
    try:
        chat_and_wait(
            page, "Tell me about extraordinary bioluminescent phytoplankton communities.", max_new_tokens=8
        )
        expect(page.locator(CHAT_TEXTBOX)).to_have_attribute("placeholder", MESSAGE_PLACEHOLDER)
        for panel in (PROMPT_PANEL, ENGINE_PANEL):
            open_panel(page, panel)
        expect(page.locator("#engine-panel")).to_contain_text("Memory")
        expect(page.locator("#prompt-text")).to_contain_text("phytoplankton")
        for panel in ("#engine-panel", "#prompt-text"):
            assert page.locator(panel).evaluate(SPLIT_WORDS_JS) == [], f"words broken mid-word in {panel}"
    finally:
        page.context.close()


def test_the_whole_session_left_no_traceback_in_the_log(app):
    """Last: every test above, refusals included, ran on this app; a traceback is a bug's."""
    log = app[1].read_text()
    assert "Traceback" not in log, log[log.find("Traceback") - 200 :][:3000]
