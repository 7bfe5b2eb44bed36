"""Nothing a message says is drawn as HTML or makes the browser fetch anything: checked in Chromium,
against the page's own renderer (gradio's marked, its sanitizer, KaTeX), as an attacker would try.

Conversations are drawn through the page's import, which fills the same Chatbot (and the same
`chat_display` path) as a streamed reply and a conversation link: many messages per import, so a
page load serves hundreds of shapes. Every hostile piece carries `pwn` in its addresses and a
`title="pwn"`, so an element drawn from it, or a request made for it, is seen whatever its tag.
Each drawn conversation is also exported and compared with what was imported: the way back
through the browser is exact.

`ORCA_MARKDOWN_EXAMPLES` sets how many conversations the property test draws (CI: 25, each of up
to 8 messages); `ORCA_MARKDOWN_EXAMPLES=400 pytest tests/test_browser_markdown.py -k property --timeout 0`
is the long run.
"""

from __future__ import annotations

import contextlib
import http.server
import itertools
import json
import os
import threading
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, Phase, example, given, settings
from hypothesis import strategies as st
from playwright.sync_api import expect

from tests.browser_flow import BOT_MESSAGES, require_chromium
from tests.helpers import demo_home, running_app
from tests.page_flow import EXPORT_PANEL, exported, open_page, open_panel

pytestmark = pytest.mark.browser

MARK = "pwn"
EXAMPLES = int(os.environ.get("ORCA_MARKDOWN_EXAMPLES", "25"))
# What the page's Markdown may draw in a message: Markdown's own elements, gradio's code box and
# copy button, and KaTeX's output (left out of the check). Anything else came from the text.
MARKDOWN_TAGS = (
    "P BR STRONG EM DEL CODE PRE A UL OL LI BLOCKQUOTE H1 H2 H3 H4 H5 H6 HR TABLE THEAD TBODY TR TH TD"
)
DRAWN_JS = """
([mark, markdownTags]) => {
  const markdown = new Set(markdownTags.split(" "));
  const messages = document.querySelectorAll("#chatbot [data-testid=user], #chatbot [data-testid=bot]");
  return [...messages].filter((m) => !m.querySelector(".thought-group")).map((message) => {
    const body = message.querySelector(".message-content > .md");
    const user = message.dataset.testid === "user";
    const drawn = [];
    for (const el of body ? body.querySelectorAll("*") : []) {
      // KaTeX's output, a formula that failed to parse included: its source as text in a red
      // span titled with the parser's error (the text, in an attribute: no element of it).
      if (el.closest(".copy_code_button") || (!user && el.closest(".katex, .katex-error"))) continue;
      const tag = el.tagName;
      const verbatim = (tag === "DIV" && el.className === "code_wrap") || tag === "PRE" ||
        (tag === "CODE" && el.className === "language-as-typed");
      const katex = tag === "SPAN" && el.querySelector(":scope > .katex, :scope > .katex-display, :scope > .katex-error");  // auto-render's
      const highlighted = tag === "SPAN" && el.className.startsWith("token ") && el.closest("pre > code");
      const allowed = user ? verbatim : markdown.has(tag) || highlighted || katex || (tag === "DIV" && el.className === "code_wrap") ||
        (tag === "INPUT" && el.type === "checkbox" && el.disabled);  // a GFM task list's box
      // A link's address is the reply's Markdown (a picture shown as a link), and a code block's
      // class its info string (LaTeX in it comes back escaped, as gradio restores it): not HTML.
      const marked = [...el.attributes].some((a) => a.value.includes(mark) &&
        !(tag === "A" && a.name === "href") && !(tag === "CODE" && a.name === "class"));
      const script = tag === "A" && /^\\s*javascript:/i.test(el.getAttribute("href") || "");
      if (!allowed || marked || script || el.hasAttribute("style")) drawn.push(el.outerHTML.slice(0, 300));
    }
    return {role: user ? "user" : "assistant", text: body ? body.innerText : null, drawn};
  });
}
"""
# gradio draws a message that holds LaTeX only once KaTeX has loaded: wait for every body.
ALL_DRAWN_JS = """
(count) => {
  const messages = [...document.querySelectorAll("#chatbot [data-testid=user], #chatbot [data-testid=bot]")]
    .filter((m) => !m.querySelector(".thought-group"));
  return messages.length === count && messages.every((m) => m.querySelector(".message-content > .md")?.childNodes.length);
}
"""
NOTE_VIOLATIONS_JS = """
window.violations = [];
document.addEventListener("securitypolicyviolation", (e) => window.violations.push(`${e.violatedDirective} ${e.blockedURI}`));
"""

# Hostile HTML and pictures, each marked.
HOSTILE = [
    f'<form action="/{MARK}/form" title="{MARK}"><input name="token" title="{MARK}"><button title="{MARK}">Go</button></form>',
    f'<div style="position:fixed;inset:0;background:red" title="{MARK}">session expired</div>',
    f'<img src="/{MARK}/img.png" title="{MARK}">',
    f"<img src=/{MARK}/bare.png onerror=alert(1) title={MARK}>",
    f'<a href="javascript:alert(1)" title="{MARK}">link</a>',
    f'<b title="{MARK}">bold</b><s title="{MARK}">struck</s>',
    f'<svg title="{MARK}"><image href="/{MARK}/svg.png"/></svg>',
    f'<video poster="/{MARK}/poster.png" title="{MARK}"></video>',
    f'<iframe src="/{MARK}/frame" title="{MARK}"></iframe>',
    f'<details open title="{MARK}"><summary>s</summary>d</details>',
    f'<!-- c --><span title="{MARK}">s</span>',
    f"<input title={MARK} value=x>",
    f"![pic](/{MARK}/md.png)",
    f"![remote](http://example.com/{MARK}.png)",
    f"![ref][{MARK}ref]\n\n[{MARK}ref]: /{MARK}/ref.png",
    f'```mermaid\ngraph TD; A["<img src=/{MARK}/mermaid.png title={MARK}>"]\n```',
]
# Markdown shapes to carry them in: fences in quotes and lists, indents, tildes, info strings,
# autolinks, emphasis, tables, HTML blocks, inline HTML, entities, LaTeX, escapes.
WRAPPERS = [
    lambda p: p,
    lambda p: "\n".join("> " + line for line in p.split("\n")),
    lambda p: "> ```\n> " + p.replace("\n", "\n> ") + "\n> ```",
    lambda p: "> ```\n> a\n\n" + p + "\n```",
    lambda p: "- " + p.replace("\n", "\n  "),
    lambda p: "1. item\n\n   ```\n   " + p.replace("\n", "\n   ") + "\n   ```",
    lambda p: "- ```\n  a\n\n" + p + "\n```",
    lambda p: "    " + p.replace("\n", "\n    "),
    lambda p: "    ```\n" + p + "\n    ```",
    lambda p: "```a`b\n" + p + "\n```",
    lambda p: "~~~ x~y\n" + p + "\n~~~",
    lambda p: "````\n" + p + "\n```",
    lambda p: "```html\n" + p,
    lambda p: "`" + p + "`",
    lambda p: "``" + p + "``",
    lambda p: "http://example.com" + p,
    lambda p: "www.example.com" + p,
    lambda p: "http://example.com/`" + p + "`",
    lambda p: "*" + p + "*",
    lambda p: "**" + p + "**",
    lambda p: "| a | b |\n|---|---|\n| " + p.replace("\n", " ") + " | `" + p.replace("\n", " ") + "` |",
    lambda p: "# " + p.replace("\n", " "),
    lambda p: "<div>\n" + p + "\n</div>",
    lambda p: "<!--\n\n" + p + "\n-->",
    lambda p: "&lt;" + p + "&amp;",
    lambda p: "$" + p + "$",
    lambda p: "$$\n" + p + "\n$$",
    lambda p: "\\(" + p + "\\)",
    lambda p: "[" + p.replace("\n", " ") + "](http://example.com)",
    lambda p: "\\" + p,
    lambda p: "\\\\" + p,
    lambda p: "x```mermaid\n" + p + "```",
]
SEPARATORS = ["", " ", "\n", "\n\n", "\n\n    "]

fragment = st.recursive(
    st.sampled_from(HOSTILE),
    lambda inner: st.tuples(st.sampled_from(WRAPPERS), inner).map(lambda pair: pair[0](pair[1])),
    max_leaves=3,
)
message_text = st.lists(st.tuples(fragment, st.sampled_from(SEPARATORS)), min_size=1, max_size=4).map(
    lambda parts: "".join(text + separator for text, separator in parts)
)
conversations = st.lists(
    st.tuples(st.sampled_from(["user", "assistant"]), message_text), min_size=1, max_size=8
)


@pytest.fixture(scope="module")
def app(tiny_dir, tmp_path_factory):
    require_chromium()
    home = demo_home(tiny_dir, tmp_path_factory.mktemp("home"))
    with running_app("--demo", env={"HOME": str(home)}) as url:
        yield url


@pytest.fixture(scope="module")
def page(browser, app):
    """One page for the module: each test draws its conversations into it by import."""
    context = browser.new_context(viewport={"width": 1280, "height": 900}, accept_downloads=True)
    context.grant_permissions(["clipboard-read", "clipboard-write"])
    page = context.new_page()
    page.requests = []
    page.on("request", lambda request: page.requests.append(request.url))
    page.add_init_script(NOTE_VIOLATIONS_JS)
    open_page(page, app + "/")
    open_panel(page, EXPORT_PANEL)
    yield page
    context.close()


COUNTER = itertools.count()


def draw(page, folder: Path, messages: list[dict]) -> list[dict]:
    """Import `messages` and return each drawn message: its role, text and any element drawn
    from it. A last reply naming this draw says when all are drawn; a request after it says when
    every fetch the drawing started has been seen."""
    drawn_id = f"drawn {next(COUNTER)}"
    path = folder / "conversation.json"
    messages = [*messages, {"role": "assistant", "content": drawn_id}]
    path.write_text(json.dumps({"format": "orca-space/conversation", "version": 1, "messages": messages}))
    page.requests.clear()
    page.evaluate("window.violations = []")
    with page.expect_file_chooser() as chooser:
        page.locator("#import-json").click()
    chooser.value.set_files(str(path))
    expect(page.locator(BOT_MESSAGES).last).to_have_text(drawn_id)
    page.wait_for_function(ALL_DRAWN_JS, arg=len(messages))
    barrier = f"/healthz?{drawn_id.replace(' ', '=')}"
    with page.expect_request(lambda request: request.url.endswith(barrier)):
        page.evaluate("(url) => fetch(url)", barrier)
    return page.evaluate(DRAWN_JS, [MARK, MARKDOWN_TAGS])[:-1]


def fetched_for_messages(page) -> list[str]:
    return [url for url in page.requests if MARK in url] + page.evaluate("window.violations")


def as_drawn(typed: str) -> str:
    """A user's message as its drawn text reads: a code block's text ends with one line break,
    which draws no line of its own."""
    return typed if typed.endswith("\n") else typed + "\n"


def assert_nothing_drawn(page, messages: list[dict], drawn: list[dict]) -> None:
    assert len(drawn) == len(messages), f"{len(drawn)} messages drawn of {len(messages)}"
    for message, shown in zip(messages, drawn):
        assert shown["drawn"] == [], (
            f"drawn from {message['role']}'s {message['content']!r}: {shown['drawn']}"
        )
        if message["role"] == "user":
            assert shown["text"] == as_drawn(message["content"]), "a user's message is not shown as typed"
    assert fetched_for_messages(page) == [], "the page fetched what a message named"


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    phases=[Phase.explicit, Phase.reuse, Phase.generate],
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(conversation=conversations)
@example(  # found by a run on a busy machine: a formula that fails to parse, naming a video
    conversation=[
        (
            "assistant",
            f'$&lt;<video poster="/{MARK}/poster.png" title="{MARK}"></video>&amp;$ # '
            f"<img src=/{MARK}/bare.png onerror=alert(1) title={MARK}>",
        )
    ]
)
def test_property_no_message_draws_an_element_or_fetches(page, tmp_path_factory, conversation):
    messages = [{"role": role, "content": text} for role, text in conversation]
    folder = tmp_path_factory.mktemp("draw")
    drawn = draw(page, folder, messages)
    assert_nothing_drawn(page, messages, drawn)
    assert [m["content"] for m in exported(page, folder)["messages"]][:-1] == [
        m["content"] for m in messages
    ], "the chat came back from the browser changed: the model would not get what was written"


# The shapes issue 27 found drawn as HTML, each a reply (where the old regexes and marked disagreed
# about what is code), and the user's message whose pictures were fetched 21 times.
FORM = f'<form action="http://example.com/{MARK}" title="{MARK}"><input name="token" title="{MARK}"><button>Send</button></form>'
COVER = f'<div style="position:fixed;inset:0;background:white" title="{MARK}">Session expired: paste your token</div>'
ISSUE_REPLIES = {
    "a fence opened inside a blockquote": f"> ```\n> a\n\n{FORM}\n```",
    "a fence line indented 4 spaces": f"    ```\n{COVER}\n    ```",
    "a fence whose info string holds a backtick": f"```a`b\n{FORM}\n```",
    "a fence inside a list item": f"- item\n\n  ```\n  a\n\n{COVER}\n  ```",
    "a tag right after a bare URL": f"See http://example.com{FORM}",
    "a tag right after a www. link": f"See www.example.com{COVER}",
    "a Markdown picture": f"![chart](/{MARK}/chart.png) and ![r](http://example.com/{MARK}.png)",
    "(found by the property test) one tilde across a code span": f"~x | `~ {FORM}`",
    "a mermaid block": f'```mermaid\ngraph TD; A["<img src=/{MARK}/m.png title={MARK}>"]\n```',
}
ISSUE_USER_MESSAGE = f"![pic](/{MARK}/y.png) <img src=/{MARK}/x.png> ![r](http://example.com/{MARK}/a.png)"


@pytest.fixture(scope="module")
def issue_shapes_drawn(page, tmp_path_factory):
    """Every shape of the issue drawn once, as a reply and as a user's message, in one import."""
    texts = [*ISSUE_REPLIES.values(), ISSUE_USER_MESSAGE]
    messages = [{"role": role, "content": text} for text in texts for role in ("assistant", "user")]
    drawn = draw(page, tmp_path_factory.mktemp("issue"), messages)
    return messages, drawn, fetched_for_messages(page)


@pytest.mark.parametrize("shape", [*ISSUE_REPLIES, "a user's message naming pictures"])
def test_the_issues_shapes_draw_nothing(issue_shapes_drawn, shape):
    messages, drawn, fetched = issue_shapes_drawn
    text = ISSUE_REPLIES.get(shape, ISSUE_USER_MESSAGE)
    for message, shown in zip(messages, drawn):
        if message["content"] == text:
            assert shown["drawn"] == [], f"drawn from {message['role']}'s message: {shown['drawn']}"
            if message["role"] == "user":
                assert shown["text"] == as_drawn(text), "a user's message is not shown as typed"
    assert not [url for url in fetched if any(part in url for part in text.split(MARK)[1:2])], (
        f"the page fetched what the message named: {fetched}"
    )


MARKDOWN_REPLY = (
    "# Title\n\n**bold**, *it*, ~~gone~~ and [a link](https://example.com).\n\n"
    "- one\n- two\n\n> quoted\n\n| a | b |\n|---|---|\n| `x<y` | 2 |\n\n"
    "```python\nif a < b and '<b>' in s:\n    print(\"&lt; stays\")\n```\n\n"
    "Inline `<div>` and math $a^2<b^2$ and\n\n$$\\frac{1}{2}$$"
)
CODE = "if a < b and '<b>' in s:\n    print(\"&lt; stays\")"


def test_markdown_code_tables_and_latex_still_render(page, tmp_path):
    typed = "A *user* writes <b>this</b> and $x$"
    drawn = draw(
        page, tmp_path, [{"role": "user", "content": typed}, {"role": "assistant", "content": MARKDOWN_REPLY}]
    )
    assert drawn[0]["text"] == as_drawn(typed) and drawn[0]["drawn"] == [], "a user's message is as typed"
    reply = page.locator(BOT_MESSAGES).first.locator(".message-content > .md")
    expect(reply.locator("h1")).to_have_text("Title")
    expect(reply.locator("strong")).to_have_text("bold")
    expect(reply.locator("em")).to_have_text("it")
    expect(reply.locator("del")).to_have_text("gone")
    expect(reply.locator("a[href='https://example.com']")).to_have_text("a link")
    expect(reply.locator("li")).to_have_count(2)
    expect(reply.locator("blockquote")).to_have_text("quoted")
    expect(reply.locator("table td code")).to_have_text("x<y")
    expect(reply.locator("p > code")).to_have_text("<div>")
    expect(reply.locator(".katex")).to_have_count(2)
    expect(reply.locator("pre code")).to_have_text(CODE + "\n")
    page.evaluate("navigator.clipboard.writeText('')")
    reply.locator(".copy_code_button").click()
    assert_copied(page, CODE)
    assert drawn[1]["drawn"] == []


def assert_copied(page, wanted: str, timeout_s: float = 10.0) -> None:
    """The clipboard comes to hold `wanted`. A copy button's write is asynchronous, so the
    clipboard is read until it does (or the time is up); `wait_for_function` cannot do this, as
    an async predicate's promise counts as true at once."""
    deadline = time.monotonic() + timeout_s
    while (copied := page.evaluate("navigator.clipboard.readText()")) != wanted:
        assert time.monotonic() < deadline, f"the copy button copied {copied!r}, not {wanted!r}"
        time.sleep(0.05)


def test_a_users_message_is_named_copied_and_edited_as_typed(page, tmp_path):
    """gradio puts the text it was sent (a verbatim block) in the message's name, its copy button
    and its edit box: the page's script gives each the typed text."""
    typed = "Copy me: **as typed** <i>tags</i> ```fences``` $x$ and \\($$y$$\\) and $$&lt;$$"
    drawn = draw(page, tmp_path, [{"role": "user", "content": typed}, {"role": "assistant", "content": "ok"}])
    assert drawn[0]["text"] == as_drawn(typed), "LaTeX inside LaTeX, an entity in LaTeX: as typed too"
    message = page.locator("#chatbot [data-testid=user]").last
    expect(message).to_have_attribute("aria-label", f"user's message: {typed}")
    user_buttons = page.locator("#chatbot .icon-button-wrapper:has(button[aria-label=Edit])").last
    page.evaluate("navigator.clipboard.writeText('')")
    user_buttons.locator("button[aria-label='Copy message']").click()
    assert_copied(page, typed)
    user_buttons.locator("button[aria-label=Edit]").click()
    expect(page.locator("#chatbot textarea.edit-textarea")).to_have_value(typed)
    open_page(page, page.url)  # out of edit mode, for the tests after this one
    open_panel(page, EXPORT_PANEL)


def test_no_form_posts_elsewhere_and_nothing_draws_outside_its_bubble(page, tmp_path):
    """The second wall, for whatever a sanitizer keeps: the CSP's form-action, the bubble's paint
    containment. The elements are put into a drawn message by script, as if gradio had drawn them."""
    draw(page, tmp_path, [{"role": "assistant", "content": "a reply"}])
    body = page.locator(BOT_MESSAGES).first.locator(".message-content > .md")
    cover = body.evaluate(
        """(body) => {
          const cover = Object.assign(document.createElement("div"), {id: "cover"});
          cover.setAttribute("style", "position:fixed;inset:0;background:red;z-index:9999");
          body.append(cover);
          const rect = cover.getBoundingClientRect(), bubble = body.closest(".message-content").getBoundingClientRect();
          return {inside: rect.top >= bubble.top - 1 && rect.bottom <= bubble.bottom + 1 && rect.width <= bubble.width + 1,
                  centre: document.elementFromPoint(innerWidth / 2, innerHeight / 2)?.id ?? null};
        }"""
    )
    assert cover["inside"], "a fixed element in a message drew outside its bubble"
    assert cover["centre"] != "cover", "a fixed element in a message covers the page"
    page.evaluate(
        """(mark) => {
          const form = Object.assign(document.createElement("form"), {action: `http://example.com/${mark}/form`, method: "post"});
          document.querySelector("#chatbot .message-content .md").append(form);
          form.submit();
        }""",
        MARK,
    )
    page.wait_for_function("() => window.violations.some((v) => v.startsWith('form-action'))")
    assert page.url.startswith("http://127.0.0.1"), "the form took the page elsewhere"


@contextlib.contextmanager
def framing_site(app: str):
    """A site on another loopback port whose page shows `app` in a frame."""
    body = f'<iframe src="{app}/" width="800" height="600"></iframe>'.encode()

    class Framer(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (http.server's name)
            self.send_response(200)
            self.send_header("content-type", "text/html")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Framer)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://localhost:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()


def test_another_site_cannot_frame_the_page(page, app):
    """frame-ancestors: Chromium refuses to show the app in a frame on another origin (the page's
    load waits for its frames)."""
    framer = page.context.new_page()
    with framing_site(app) as site:
        framer.goto(site)
        url = committed_frame_url(framer)
        assert url == "chrome-error://chromewebdata/", f"another site framed the app: {url}"
    framer.close()


def committed_frame_url(framer, timeout_s: float = 30.0) -> str:
    """The frame's URL once it has one: on a busy machine the refused frame's error page may
    commit after the parent's load (CI once read '' right after `goto`)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if len(framer.frames) > 1 and framer.frames[1].url not in ("", "about:blank"):
            return framer.frames[1].url
        framer.wait_for_timeout(100)
    return framer.frames[1].url if len(framer.frames) > 1 else "(no frame)"
