"""The browser's part of conversation links: a few lines of JavaScript for the events.

The browser keeps each link it made with its delete token in its own storage (localStorage,
beside its saved conversations), so that the link's page offers to delete it there. Not a
gr.BrowserState: gradio encrypts one with a key it draws anew at every start of the app, so
what it kept would be unreadable after a restart, while the link itself outlives restarts.
"""

from __future__ import annotations

import json

STORAGE_KEY = "orca-space:conversation-links"
MAX_KEPT = 200  # the newest links; older tokens are dropped from the browser, not the server
CONTINUE_PARAM = "continue"  # /?continue=ID: a link's page sends its conversation to the chat

_KEPT = f"JSON.parse(localStorage.getItem({json.dumps(STORAGE_KEY)}) || '[]')"

# The page's address without its query or fragment, to build links from (what the browser
# shows: behind a proxy or in a Space's frame, the server cannot know it).
PAGE_BASE_JS = "() => window.location.origin + window.location.pathname"

# Keep a new link's id and token: `record` is the JSON {id, token, created} the share step made.
REMEMBER_JS = f"""
(record) => {{
  try {{
    const link = JSON.parse(record);
    const kept = {_KEPT}.filter((old) => old.id !== link.id);
    kept.unshift(link);
    localStorage.setItem({json.dumps(STORAGE_KEY)}, JSON.stringify(kept.slice(0, {MAX_KEPT})));
  }} catch (error) {{
    console.error("could not keep the conversation link's delete token", error);
  }}
}}
"""

# On a link's page: the delete token this browser kept for the link in the address, or "".
KEPT_TOKEN_JS = f"""
() => {{
  try {{
    const id = new URLSearchParams(window.location.search).get("id");
    return {_KEPT}.find((link) => link.id === id)?.token ?? "";
  }} catch (error) {{
    return "";
  }}
}}
"""

# After deleting: forget the link in the address.
FORGET_JS = f"""
() => {{
  try {{
    const id = new URLSearchParams(window.location.search).get("id");
    const kept = {_KEPT}.filter((link) => link.id !== id);
    localStorage.setItem({json.dumps(STORAGE_KEY)}, JSON.stringify(kept));
  }} catch (error) {{
    console.error("could not forget the conversation link", error);
  }}
}}
"""

# On the chat page: the id in ?continue=ID, or "", taken out of the address at once so that a
# reload does not load the conversation again over what was typed since.
CONTINUE_ID_JS = f"""
() => {{
  const url = new URL(window.location.href);
  const id = url.searchParams.get({json.dumps(CONTINUE_PARAM)});
  if (id === null) return "";
  url.searchParams.delete({json.dumps(CONTINUE_PARAM)});
  window.history.replaceState(window.history.state, "", url.href);
  return id;
}}
"""
