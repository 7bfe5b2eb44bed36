"""The page's CSS and the few lines of browser JavaScript its events run.

The JavaScript does what only the browser can: read a file the user picks (so the server never
enables uploads: `max_file_size=0` keeps refusing them on every route), save text as a file,
mirror the system box into the presets dropdown without a round trip, and open the
conversations sidebar on screens wide enough for it.
"""

from __future__ import annotations

import json

from .presets import CUSTOM, PRESETS
from .transcript import MAX_TRANSCRIPT_BYTES

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
#prompt-text { max-height: 24rem; overflow-y: auto; }

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
    """The preset whose text the system box holds, else "Custom": in the browser, per keystroke."""
    by_text = json.dumps({text: name for name, text in PRESETS.items()}, ensure_ascii=False)
    return f"(text) => ({by_text}[text] ?? {json.dumps(CUSTOM)})"


OPEN_SIDEBAR_ON_WIDE_SCREENS_JS = """
() => {
  if (!window.matchMedia("(min-width: 769px)").matches) return;
  const sidebar = document.querySelector("#conversations");
  if (sidebar && !sidebar.classList.contains("open")) sidebar.querySelector(".toggle-button")?.click();
}
"""
