"""The page a person uses: gradio's ChatInterface and everything around it.

`ui.py` lays the page out; `replying.py` streams a reply onto it; `chat_hooks.py` is every place
the page reaches inside gradio's ChatInterface; `chat_display.py`, `typed_message.py` and
`reply_markdown.py` draw messages; `panels.py` (prompt, export and import, engine) with `prompt_view.py`,
`engine_panel.py` and `presets.py`; conversation links on the page in `share_panel.py`,
`link_page.py` and `link_scripts.py`; `assets.py` holds the theme, CSS and browser JS;
`page_state.py` the rule for what a session's state may hold.

May import: the guards in `web/` and the layers below `web/`; never `web/api/` or `web/server.py`.
"""
