"""The page's CSS and the few lines of browser JavaScript its events run.

The JavaScript does what only the browser can: read a file the user picks (so the server never
enables uploads: `max_file_size=0` keeps refusing them on every route), save text as a file,
mirror the system box into the presets dropdown without a round trip, open the conversations
sidebar on screens wide enough for it, and keep true, as gradio redraws the page, what its
components do not offer (`LIVE_PAGE_HEAD`).
"""

from __future__ import annotations

import json

import gradio as gr

from ...transcript import MAX_TRANSCRIPT_BYTES
from .presets import CUSTOM, NO_SYSTEM_MESSAGE, PRESETS


def page_theme() -> gr.themes.Base:
    """gradio's Soft theme in blue, its light-mode text made to meet WCAG AA (4.5:1) where it did
    not: field labels (blue 500 on blue 100, 3.0:1), the primary button (white on blue 500,
    3.7:1) and quiet text such as a slider's bounds and the footer (grey 400, 2.4:1)."""
    return gr.themes.Soft(primary_hue="blue").set(
        block_label_text_color="*primary_700",
        block_title_text_color="*primary_700",
        button_primary_background_fill="*primary_600",
        button_primary_background_fill_hover="*primary_700",
        body_text_color_subdued="*neutral_600",
    )


CSS = """
/* The chat shows no label (the page's title names the model) and its toolbar (clear, copy all)
   gets its own row above the messages instead of floating over the text of a reply scrolled
   beneath it, as gradio draws both; the message list takes the rest of the height. */
#chatbot .wrapper { display: flex; flex-direction: column; }
#chatbot .wrapper > .top-panel { position: static; align-self: flex-end; }
#chatbot .bubble-wrap { flex: 1 1 auto; min-height: 0; }

/* A reply's figures: one quiet line of small type, not a box. (gradio marks a "thought" that
   follows another message in its bubble `.message.thought`, as the figures always do; the
   "waiting for the model" note, alone in its bubble, keeps gradio's box and spinner.) */
#chatbot .message.thought .thought-group { border: none; background: none; box-shadow: none;
  padding: 0; margin: var(--spacing-sm) 0 0 0; }
#chatbot .message.thought .title { font-size: var(--text-sm); color: var(--neutral-600);
  padding: 0; cursor: default; }
.dark #chatbot .message.thought .title { color: var(--neutral-400); }
#chatbot .message.thought .title .md p { font-size: var(--text-sm); margin: 0; }
#chatbot .message.thought .arrow { display: none; }

#reply-actions { gap: var(--spacing-md); }
/* The message's count towards its limit (message_checks): quiet, under the box, at its right. */
#message-count { text-align: right; min-height: 0; }
#message-count p { font-size: var(--text-sm); color: var(--neutral-600); margin: 0; }
.dark #message-count p { color: var(--neutral-400); }
/* Empty once loaded; while gradio's loader shows in it, it is no scrollable region to tab to. */
#load-status { overflow: visible; }
#prompt-text { max-height: 24rem; overflow-y: auto; }

/* A user's message reaches Markdown as a verbatim block (typed_message): drawn as the message's
   own text, its spaces and line breaks kept, long tokens wrapped rather than overflowing, no
   code box and no copy-code button. */
#chatbot .code_wrap:has(> pre > code.language-as-typed) { margin: 0; position: static; }
#chatbot .code_wrap:has(> pre > code.language-as-typed) > .copy_code_button { display: none; }
#chatbot pre:has(> code.language-as-typed), #chatbot code.language-as-typed {
  margin: 0; padding: 0; border: none; border-radius: 0; background: none; box-shadow: none;
  color: inherit; font: inherit; white-space: pre-wrap; overflow-wrap: anywhere; overflow: visible; }

/* Nothing in a message draws outside its bubble: a `style` gradio's sanitizer keeps (KaTeX needs
   them) cannot pin an element over the page; `contain: paint` makes the bubble the containing
   block of fixed and absolute descendants and clips them to it. */
#chatbot .message-content { contain: paint; }

/* Whole words on narrow screens: gradio's highlighted text breaks anywhere (`break-all`) and a
   narrow table column breaks its words; a word too long for the line (a URL) may still wrap. */
#prompt-text .text { word-break: normal; overflow-wrap: anywhere; }
#engine-panel table { width: 100%; }
#engine-panel th, #engine-panel td { word-break: normal; overflow-wrap: normal; }
#engine-panel td:first-child, #engine-panel th:first-child { white-space: nowrap; width: 1%; }
#engine-panel td:last-child { overflow-wrap: anywhere; }
/* A control token in the prompt: gradio writes its text black over the colour at half strength,
   which on the dark theme's background is 3.9:1; light text there is 5.4:1. */
.dark #prompt-text .token.highlighted { color: var(--neutral-50) !important; }

/* Phones: the chat first; the header shrinks to one line. */
@media (max-width: 640px) {
  #page-header h1 { font-size: var(--text-xl); margin-bottom: 0; }
  #page-header p { display: none; }
}
"""


def pick_file_js(max_bytes: int = MAX_TRANSCRIPT_BYTES) -> str:
    """Open a file picker and hand the event the file's text and size; ["", -1] if none was
    chosen. A file over `max_bytes` is not read: its size alone goes, for the server to refuse."""
    return f"""
async () => {{
  const input = Object.assign(
    document.createElement("input"), {{type: "file", accept: ".json,application/json"}}
  );
  input.style.display = "none";
  document.body.appendChild(input);
  const file = await new Promise((resolve) => {{
    input.addEventListener("change", () => resolve(input.files[0] ?? null), {{once: true}});
    input.addEventListener("cancel", () => resolve(null), {{once: true}});
    input.click();
  }});
  input.remove();
  if (!file) return ["", -1];
  if (file.size > {max_bytes}) return ["", file.size];
  return [await file.text(), file.size];
}}
"""


def save_text_js(extension: str, mime: str) -> str:
    """Save the event's text as `conversation-YYYY-MM-DD-HHMM.<extension>` in the browser."""
    return f"""
(text) => {{
  if (!text) return;
  const stamp = new Date().toISOString().slice(0, 16).replace("T", "-").replace(":", "");
  const link = Object.assign(document.createElement("a"), {{
    href: URL.createObjectURL(new Blob([text], {{type: "{mime}"}})),
    download: `conversation-${{stamp}}.{extension}`,
  }});
  document.body.appendChild(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(link.href), 10000);
}}
"""


def preset_for_text_js() -> str:
    """`presets.preset_for` in the browser, per change of the system box: the preset whose text
    it holds, "No system message" if only spaces (no system turn is sent), else "Custom"."""
    by_text = json.dumps({text: name for name, text in PRESETS.items()}, ensure_ascii=False)
    return (
        f"(text) => ((text ?? '').trim() === '' ? {json.dumps(NO_SYSTEM_MESSAGE)}"
        f" : ({by_text}[text] ?? {json.dumps(CUSTOM)}))"
    )


OPEN_SIDEBAR_ON_WIDE_SCREENS_JS = """
() => {
  if (!window.matchMedia("(min-width: 769px)").matches) return;
  const sidebar = document.querySelector("#conversations");
  if (sidebar && !sidebar.classList.contains("open")) sidebar.querySelector(".toggle-button")?.click();
}
"""


# A user's message reaches the browser as a verbatim block (`typed_message`), so the text gradio
# puts where a person meets it is that block: the message's accessible name (gradio's aria-label,
# "user's message: " + the text), the box that edits it, and what the copy buttons copy. The
# script gives each the typed text back. The textbox and its send and stop buttons get names
# (gradio's buttons are bare icons), and the examples' `role="list"`, whose items are buttons,
# becomes a group. In the page's <head>, so that it watches from the first render; an observer's
# callback runs before the browser paints. tests/test_browser_polish.py fails if a gradio upgrade
# moves what it relies on.
LIVE_PAGE_HEAD = """
<script>
(() => {
  const USER_PREFIX = "user's message: ";
  // typed_message.shown_message: a fence longer than any run of backticks inside, `as-typed`.
  const SHOWN = /(`{3,})as-typed\\n([\\s\\S]*?)\\n\\1(?!`)/g;
  const typed = (text) => text.replace(SHOWN, (_, fence, inner) => inner);
  // gradio wraps the textbox and its buttons in one <label>, so the box's name took in the button's.
  const NAMES = {
    "textarea": "Message", "button.submit-button": "Send message", "button.stop-button": "Stop the reply",
  };
  if (navigator.clipboard) {
    const write = navigator.clipboard.writeText.bind(navigator.clipboard);
    navigator.clipboard.writeText = (text) => write(typeof text === "string" ? typed(text) : text);
  }
  const named = new WeakMap();  // a user's message -> the name this script gave it
  const keep = () => {
    for (const message of document.querySelectorAll('#chatbot [data-testid="user"][aria-label]')) {
      const label = message.getAttribute("aria-label");
      if (!label.startsWith(USER_PREFIX)) continue;
      if (named.get(message) !== label) {
        named.set(message, typed(label));
        message.setAttribute("aria-label", typed(label));
      }
      // gradio takes LaTeX out before Markdown and puts it back as HTML, in one pass: a span inside
      // another (`\\($$x$$\\)`) comes back as its placeholder, and an entity in a span (`$&lt;$`)
      // as its character. The block's text (text only: nothing is parsed) is set to the typed text.
      const code = message.querySelector("code.language-as-typed");
      const text = named.get(message).slice(USER_PREFIX.length);
      const drawn = text.endsWith("\\n") ? text : text + "\\n";
      if (code && code.textContent !== drawn) code.textContent = drawn;
    }
    for (const box of document.querySelectorAll("#chatbot textarea.edit-textarea")) {
      if (typed(box.value) === box.value) continue;
      box.value = typed(box.value);
      box.dispatchEvent(new Event("input", {bubbles: true}));
    }
    for (const [selector, name] of Object.entries(NAMES)) {
      for (const control of document.querySelectorAll(`#message-box ${selector}`)) {
        if (control.getAttribute("aria-label") !== name) control.setAttribute("aria-label", name);
      }
    }
    for (const list of document.querySelectorAll('#chatbot .examples[role="list"]')) {
      list.setAttribute("role", "group");
      list.setAttribute("aria-label", "Example messages");
    }
  };
  new MutationObserver(keep).observe(document.documentElement, {
    subtree: true, childList: true, attributes: true, attributeFilter: ["aria-label", "role"],
  });
})();
</script>
"""
