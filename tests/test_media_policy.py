"""The page's Content-Security-Policy: its directives, the frame-ancestors setting, and the header on responses."""

from __future__ import annotations

import pytest
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.responses import PlainTextResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from orca_space.settings import FRAME_ANCESTORS, parse_settings
from orca_space.web.media_policy import SameOriginMedia, content_security_policy


def policy_of(response) -> dict[str, str]:
    directives = [d.strip().split(" ", 1) for d in response.headers["content-security-policy"].split(";")]
    return {name: value for name, value in directives}


def app_with(frame_ancestors: str, own_policy: str | None = None) -> TestClient:
    def page(request):
        headers = {"content-security-policy": own_policy} if own_policy else {}
        return PlainTextResponse("page", headers=headers)

    middleware = [Middleware(SameOriginMedia, frame_ancestors=frame_ancestors)]
    return TestClient(Starlette(routes=[Route("/", page)], middleware=middleware))


def test_every_response_says_where_forms_post_and_who_may_frame_it():
    policy = policy_of(app_with(FRAME_ANCESTORS).get("/"))
    assert policy["form-action"] == "'self'", "a drawn form could post a typed token elsewhere"
    assert policy["frame-ancestors"] == "'self' https://huggingface.co https://*.hf.space", (
        "Spaces show the app in an iframe on huggingface.co: the default must allow it, and no one else"
    )
    assert policy["img-src"] == "'self' data: blob:" and policy["media-src"] == "'self' data: blob:"


def test_a_self_hosted_app_names_its_own_framers():
    settings = parse_settings(["--frame-ancestors", "'self'  https://intranet.example"], {})
    assert (
        policy_of(app_with(settings.frame_ancestors).get("/"))["frame-ancestors"]
        == "'self' https://intranet.example"
    )
    from_env = parse_settings([], {"ORCA_FRAME_ANCESTORS": "'none'"})
    assert content_security_policy(from_env.frame_ancestors).endswith("frame-ancestors 'none'")


@pytest.mark.parametrize(
    "sources", ["", "'self'; script-src *", "https://a.example, https://b.example", "a\nb"]
)
def test_frame_ancestors_that_would_break_the_policy_are_refused(sources, capsys):
    with pytest.raises(SystemExit):
        parse_settings(["--frame-ancestors", sources], {})
    assert "--frame-ancestors" in capsys.readouterr().err


def test_a_response_with_its_own_policy_keeps_it():
    assert (
        app_with(FRAME_ANCESTORS, own_policy="default-src 'none'").get("/").headers["content-security-policy"]
        == "default-src 'none'"
    )
