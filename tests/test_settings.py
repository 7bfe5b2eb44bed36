from __future__ import annotations

import re
from pathlib import Path

import pytest

from orca_space.settings import OPTIONS, parse_settings

README = Path(__file__).resolve().parent.parent / "README.md"


def test_defaults():
    s = parse_settings([], {})
    assert (s.model, s.host, s.port, s.share, s.auth, s.demo) == (
        "Open-Orca/Mistral-7B-OpenOrca",
        "127.0.0.1",
        7860,
        False,
        None,
        False,
    )
    assert s.context_length == 8192 and s.backend == "local" and s.trusted_proxy_hops == 0


def test_environment_then_flags_win():
    env = {"ORCA_PORT": "9000", "ORCA_SHARE": "true", "ORCA_MODEL": "/models/x", "HF_TOKEN": "hf_x"}
    s = parse_settings(["--port", "9001"], env)
    assert (s.port, s.share, s.model, s.hf_token) == (9001, True, "/models/x", "hf_x")


def test_gradio_and_spaces_variables_are_honoured():
    env = {"GRADIO_SERVER_NAME": "0.0.0.0", "GRADIO_SERVER_PORT": "7861", "SPACE_ID": "me/orca"}
    s = parse_settings([], env)
    assert (s.host, s.port, s.trusted_proxy_hops) == ("0.0.0.0", 7861, 1)


def test_auth_is_user_and_password():
    assert parse_settings(["--auth", "ann:s3:cret"], {}).auth == ("ann", "s3:cret")


def test_access_keys_and_mcp():
    s = parse_settings(["--access-key", " k1, k2 ,"], {"ORCA_MCP": "on"})
    assert (s.access_key, s.mcp) == (("k1", "k2"), True)
    assert "k1" not in repr(s), "keys stay out of logs"
    assert parse_settings([], {"GRADIO_MCP_SERVER": "True"}).mcp, "gradio's own switch is honoured"
    assert parse_settings([], {}).access_key == () and not parse_settings([], {}).mcp


@pytest.mark.parametrize(
    "argv, env, fragment",
    [
        (["--auth", "nopassword"], {}, "user:password"),
        (["--port", "eighty"], {}, "--port"),
        ([], {"ORCA_SHARE": "maybe"}, "ORCA_SHARE"),
        (["--backend", "cloud"], {}, "--backend must be one of"),
        (["--backend", "remote"], {}, "needs --endpoint"),
        (["--context-length", "10"], {}, "at least 256"),
        (["--rate-limit", "-1"], {}, "cannot be negative"),
        (["--access-key", "has space"], {}, "--access-key"),
        ([], {"ORCA_ACCESS_KEY": "caf\u00e9"}, "printable ASCII"),
        (["--port", "99999"], {}, "--port must be between 1 and 65535, got 99999"),
        (["--port", "0"], {}, "--port must be between 1 and 65535"),
        # Flags that would be silently ignored are refused, each named with what it needs.
        (["--endpoint", "http://gpu:8080/v1"], {}, "--endpoint is only for --backend remote"),
        ([], {"ORCA_ENDPOINT": "http://gpu:8080/v1"}, "ORCA_ENDPOINT is only for --backend remote"),
        (["--api-key", "k"], {}, "--api-key is only for --backend remote"),
        (["--request-timeout", "5"], {}, "--request-timeout is only for --backend remote"),
        (["--remote-concurrency", "4"], {}, "--remote-concurrency is only for --backend remote"),
        (
            ["--backend", "remote", "--endpoint", "http://x/v1", "--engine", "eager"],
            {},
            "--engine is only for",
        ),
        (
            ["--backend", "remote", "--endpoint", "http://x/v1", "--demo"],
            {},
            "--demo serves a tiny model in this",
        ),
        (
            ["--backend", "remote", "--endpoint", "http://x/v1", "--warmup-timeout", "9"],
            {},
            "--warmup-timeout",
        ),
        (["--backend", "remote", "--endpoint", "http://x/v1", "--zerogpu"], {}, "--zerogpu is only for"),
        (
            ["--backend", "remote", "--endpoint", "http://x/v1", "--prefix-cache", "shared"],
            {},
            "--prefix-cache is only for --backend local",  # the server keeps its own (docs/deploying.md)
        ),
        (["--demo", "--model", "/models/x"], {}, "--demo serves its own tiny model: leave out --model"),
    ],
)
def test_bad_settings_exit_with_a_message(argv, env, fragment, capsys):
    with pytest.raises(SystemExit) as exited:
        parse_settings(argv, env)
    err = capsys.readouterr().err
    assert fragment in err, err
    assert exited.value.code == 2 and "Traceback" not in err, (
        "refused as argparse refuses: one sentence, exit 2"
    )


def test_remote_and_local_flags_each_work_where_they_belong():
    remote = parse_settings(["--backend", "remote", "--endpoint", "http://x/v1", "--api-key", "k"], {})
    assert (remote.endpoint, remote.api_key) == ("http://x/v1", "k")
    local = parse_settings(["--engine", "eager", "--warmup-timeout", "9"], {"HF_TOKEN": "hf_x"})
    assert (local.engine, local.warmup_timeout, local.hf_token) == ("eager", 9.0, "hf_x")
    assert parse_settings(["--demo", "--zerogpu"], {}).zerogpu, "ZeroGPU can serve the demo model"
    spaces = {"SPACES_ZERO_GPU": "true", "SPACE_ID": "me/orca"}
    assert parse_settings(["--backend", "remote", "--endpoint", "http://x/v1"], spaces).backend == "remote", (
        "ZeroGPU detected from the Space is no flag the user gave"
    )


def test_readme_documents_every_option():
    text = README.read_text()
    for option in OPTIONS:
        assert re.search(rf"`{option.flag}\b", text) and f"`{option.env}`" in text, option.flag


def test_the_app_refuses_an_ignored_flag_before_starting_anything():
    """Through `python app.py` itself, with the real os.environ (which refuses `None in environ`)."""
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "app.py", "--endpoint", "http://gpu:8080/v1"],
        cwd=README.parent,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert done.stderr.strip().splitlines()[-1] == (
        "app.py: error: --endpoint is only for --backend remote: leave it out, or use --backend remote"
    )


def readme_defaults() -> dict[str, str]:
    """Each option's default as the README's table gives it, code marks removed."""
    rows = re.findall(r"^\| `(--[a-z-]+)` \|[^|]*\| ([^|]+) \|", README.read_text(), re.MULTILINE)
    return {flag: cell.replace("`", "").strip() for flag, cell in rows}


def test_help_and_the_readme_give_the_same_defaults():
    from orca_space.settings import build_parser, shown_default

    documented = readme_defaults()
    help_text = " ".join(build_parser().format_help().split())
    for option in OPTIONS:
        said = shown_default(option)
        assert documented[option.flag] == said, (
            f"{option.flag}: README {documented[option.flag]!r}, --help {said!r}"
        )
        assert f"default: {said})" in help_text, f"--help shows {option.flag}'s default as {said!r}"
    assert "()" not in help_text and "default None" not in help_text and "default False" not in help_text


@pytest.mark.parametrize(
    "argv, said",
    [
        (["--port", "abc"], "app.py: error: --port / ORCA_PORT: expected a whole number, got 'abc'"),
        (
            ["--warmup-timeout", "soon"],
            "app.py: error: --warmup-timeout / ORCA_WARMUP_TIMEOUT: expected a number, got 'soon'",
        ),
        (
            ["--demo", "--backend", "remote"],
            "app.py: error: --demo serves a tiny model in this process, --backend remote a server elsewhere: choose one",
        ),
    ],
)
def test_a_mistyped_value_is_named_in_the_users_terms(argv, said, capsys):
    with pytest.raises(SystemExit):
        parse_settings(argv, {})
    assert capsys.readouterr().err.strip().splitlines()[-1] == said
