"""What other software calls: the OpenAI-compatible routes and the MCP tool.

`openai_api.py` serves `/v1` (routes, streaming, errors), `openai_schema.py` checks its requests
and shapes its responses (pydantic models, no I/O), `mcp_tool.py` registers the one MCP tool.

May import: the guards in `web/` and the layers below `web/`; never `web/page/` or
`web/server.py`.
"""
