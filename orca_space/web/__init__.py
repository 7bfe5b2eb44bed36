"""The web edge, in three parts that change for different reasons.

- Here, at the top: the server (`server.py`: queue, routes, launch) and what guards every request
  before any part sees it: access keys (`access.py`), load and rate limits (`admission.py`), no
  fetching of URLs for clients (`remote_fetch_guard.py`), the response headers' media policy
  (`media_policy.py`), and refusals told once, in words, with one log line (`refusals.py`).
- `page/`: the gradio page a person uses (the chat, its panels, conversation links).
- `api/`: what other software calls (the OpenAI-compatible `/v1` routes, the MCP tool).

Who may import whom: `page/` and `api/` import the guards here and the layers below `web/`
(`chat`, `transcript`, `sharing`, ...), never each other and never `server.py`; `server.py` is
the one module that puts the parts together. Nothing outside `web/` imports it, except `app.py`.
"""
