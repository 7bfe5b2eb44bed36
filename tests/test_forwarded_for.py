"""A forged X-Forwarded-For is no new client (issue #27, item 8).

The app reads X-Forwarded-For only as `--trusted-proxy-hops` says (`ratelimit.client_key`). uvicorn,
which gradio starts with its defaults, believed the header from 127.0.0.1 before the app saw the
request and replaced the client's address with it: from loopback, 22 of 22 links were made against
a limit of 20 an hour. Here a local caller writes a fresh address into every request, to the
OpenAI-compatible API and to the page, and the limits still count the one real address.
"""

from __future__ import annotations

import json

import httpx
import pytest

from tests.helpers import running_app

LIMIT = 2  # messages a minute per address


@pytest.fixture(scope="module")
def app_url(tiny_dir, tmp_path_factory):
    log = tmp_path_factory.mktemp("forwarded") / "app.log"
    with running_app("--model", str(tiny_dir), env={"ORCA_RATE_LIMIT": str(LIMIT)}, log_path=log) as url:
        yield url


def forged(index: int) -> dict[str, str]:
    return {"x-forwarded-for": f"203.0.113.{index}", "x-real-ip": f"203.0.113.{index}"}


def test_a_forged_forwarded_for_from_loopback_counts_the_real_address(app_url):
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    with httpx.Client(base_url=app_url, timeout=60) as http:
        statuses = [
            http.post("/v1/chat/completions", json=body, headers=forged(i)).status_code
            for i in range(LIMIT + 1)
        ]
        assert statuses == [200] * LIMIT + [429], f"each forged address got a limit of its own: {statuses}"
        # The page has a limit of its own (/v1's is --api-rate-limit), also for the one real
        # address whatever the header says: the message after the limit is refused.
        data = {"data": ["hi", "You are a test.", 2, 0.0, 0.95, 40, 1.0]}
        for index in range(LIMIT + 1):
            posted = http.post("/gradio_api/call/chat", json=data, headers=forged(90 + index))
            assert posted.status_code == 200, posted.text
            answer = http.get(
                f"/gradio_api/call/chat/{posted.json()['event_id']}", headers=forged(90 + index)
            )
            events = [line for line in answer.text.splitlines() if line.startswith("data:")]
        assert "Too many" in json.dumps(events[-1]), f"the page took a forged address as new: {events[-1:]}"
