"""What other software calls: the OpenAI-compatible routes and the MCP tool.

`openai_api.py` serves `/v1` and `/health` (routes, admission, errors), `openai_requests.py`
translates a request into the chat service's terms, `openai_answers.py` writes the answers
(whole or streamed, `n` choices), `openai_schema.py` checks requests and shapes responses
(pydantic models, no I/O), with `openai_completions.py` for text completions and
`openai_logprobs.py` for log-probabilities, `api_errors.py` words the chat service's refusals
for API callers; `mcp_tool.py` registers the one MCP tool.

May import: the guards in `web/` and the layers below `web/`; never `web/page/` or
`web/server.py`.
"""
