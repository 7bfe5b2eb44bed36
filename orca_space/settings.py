"""Settings from command-line flags and environment variables (flags win).

Only `app.py` calls `parse_settings`; every other module takes explicit arguments. Settings are
the first thing a process reads, so this module imports nothing heavy (no torch, no gradio):
`--help` and every refusal of a flag answer before any model or web code loads.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from .chat import MAX_MESSAGE_CHARS
from .engines.options import DEFAULT_WARMUP_TIMEOUT_S, ENGINE_CHOICES, PREFIX_CACHE_MODES
from .params import MIN_CONTEXT_LENGTH
from .sharing.store import DEFAULT_MAX_SNAPSHOT_BYTES, default_data_dir
from .tiny import MODEL_ID

ZERO_GPU_ENV = "SPACES_ZERO_GPU"
# Who may show the page in a frame (CSP frame-ancestors): the app itself and Hugging Face, whose
# Space page embeds the app in an iframe.
FRAME_ANCESTORS = "'self' https://huggingface.co https://*.hf.space"
TRUE_VALUES = ("1", "t", "true")  # what `spaces` itself takes for "on" (spaces/config.py)


def on_zerogpu(environ: Mapping[str, str]) -> bool:
    """Whether this process runs on ZeroGPU (Spaces sets the variable there)."""
    return environ.get(ZERO_GPU_ENV, "").strip().lower() in TRUE_VALUES


@dataclass(frozen=True)
class Option:
    flag: str
    env: str
    help: str
    default: object = None
    kind: type = str
    default_text: str | None = None  # how --help shows the default, where the value itself says little


OPTIONS = (
    Option("--model", "ORCA_MODEL", "Hub id or local directory of the model", MODEL_ID),
    Option("--host", "ORCA_HOST", "address to listen on (0.0.0.0 for all)", "127.0.0.1"),
    Option("--port", "ORCA_PORT", "port to listen on", 7860, int),
    Option("--share", "ORCA_SHARE", "create a public gradio.live link", False, bool),
    Option("--auth", "ORCA_AUTH", "require a login, as user:password", None),
    Option(
        "--access-key",
        "ORCA_ACCESS_KEY",
        "bearer key(s) for the OpenAI-compatible API and MCP, comma-separated (needed with --auth)",
        (),
    ),
    Option("--mcp", "ORCA_MCP", "serve gradio's MCP server with one tool, ask_mistral_orca", False, bool),
    Option("--demo", "ORCA_DEMO", "offline preview with a tiny random-weight model", False, bool),
    Option(
        "--zerogpu",
        "ORCA_ZEROGPU",
        "run each reply on ZeroGPU (this forces it)",
        False,
        bool,
        default_text=f"on where {ZERO_GPU_ENV} says so (a ZeroGPU Space), else off",
    ),
    Option("--context-length", "ORCA_CONTEXT_LENGTH", "prompt plus reply token limit", 8192, int),
    Option(
        "--max-message-chars", "ORCA_MAX_MESSAGE_CHARS", "longest message accepted", MAX_MESSAGE_CHARS, int
    ),
    Option("--max-input-tokens", "ORCA_MAX_INPUT_TOKENS", "longest message accepted, in tokens", 4096, int),
    Option("--rate-limit", "ORCA_RATE_LIMIT", "messages per minute per address (0 = off)", 30, int),
    Option(
        "--api-rate-limit",
        "ORCA_API_RATE_LIMIT",
        "/v1 requests per minute per access key, or per address without one (0 = off)",
        None,
        int,
        default_text="--rate-limit's",
    ),
    Option("--max-queue", "ORCA_MAX_QUEUE", "waiting chats; beyond it new ones are told to retry", 64, int),
    Option(
        "--session-memory-mb",
        "ORCA_SESSION_MEMORY_MB",
        "memory the page's sessions may keep together, in MB (least recently used dropped first)",
        160,
        int,
    ),
    Option(
        "--trusted-proxy-hops",
        "ORCA_TRUSTED_PROXY_HOPS",
        "proxies in front of the app whose X-Forwarded-For is believed",
        0,
        int,
        default_text="0 (1 on Spaces)",
    ),
    Option("--backend", "ORCA_BACKEND", "where replies come from: local or remote", "local"),
    Option(
        "--engine",
        "ORCA_ENGINE",
        "local engine: auto (graphs, then eager, then reference; compiled first where the device check chose it), compiled, graphs, eager or reference",
        "auto",
    ),
    Option(
        "--warmup-timeout",
        "ORCA_WARMUP_TIMEOUT",
        "seconds an engine may take to warm up before auto tries the next",
        DEFAULT_WARMUP_TIMEOUT_S,
        float,
    ),
    Option(
        "--prefix-cache",
        "ORCA_PREFIX_CACHE",
        "reuse a conversation's KV cache: private (each visitor their own), shared (any visitor's) or off",
        "private",
    ),
    Option(
        "--endpoint", "ORCA_ENDPOINT", "remote OpenAI-compatible server URL (with --backend remote)", None
    ),
    Option("--api-key", "ORCA_API_KEY", "token for the remote server", None, default_text="HF_TOKEN, if set"),
    Option("--request-timeout", "ORCA_REQUEST_TIMEOUT", "seconds to wait for the remote server", 60.0, float),
    Option(
        "--remote-concurrency",
        "ORCA_REMOTE_CONCURRENCY",
        "chats streamed from the remote server at once",
        16,
        int,
    ),
    # Conversation links (not --share): where they are kept and their limits.
    Option(
        "--data-dir",
        "ORCA_DATA_DIR",
        "folder for the app's data: conversation links",
        None,
        default_text="/data/orca-space on a Space with persistent storage, else ~/.cache/orca-space",
    ),
    Option("--link-max-kb", "ORCA_LINK_MAX_KB", "largest conversation a link holds, in KB", 1024, int),
    Option(
        "--links-per-hour",
        "ORCA_LINKS_PER_HOUR",
        "conversation links per visitor per hour (0 = no limit)",
        20,
        int,
    ),
    Option("--links-max-mb", "ORCA_LINKS_MAX_MB", "all conversation links together, in MB", 1024, int),
    Option(
        "--link-expiry-days",
        "ORCA_LINK_EXPIRY_DAYS",
        "days a conversation link lasts (0 = until deleted)",
        0.0,
        float,
    ),
    Option(
        "--frame-ancestors",
        "ORCA_FRAME_ANCESTORS",
        "sites that may show the page in a frame, as CSP frame-ancestors sources, space-separated",
        FRAME_ANCESTORS,
    ),
)
# Spaces and gradio deployments set these; honour them when ours are unset.
FALLBACK_ENV = {
    "ORCA_HOST": "GRADIO_SERVER_NAME",
    "ORCA_PORT": "GRADIO_SERVER_PORT",
    "ORCA_MCP": "GRADIO_MCP_SERVER",
}
BACKENDS = ("local", "remote")
MAX_PORT = 65535
# Options that only one backend reads: given to the other, they would be silently ignored.
REMOTE_ONLY = ("endpoint", "api_key", "request_timeout", "remote_concurrency")
LOCAL_ONLY = ("engine", "warmup_timeout", "demo", "zerogpu", "prefix_cache")
MAX_LINK_KB = DEFAULT_MAX_SNAPSHOT_BYTES >> 10
TRUE_WORDS = {"1", "true", "yes", "on"}
FALSE_WORDS = {"0", "false", "no", "off", ""}


@dataclass(frozen=True)
class Settings:
    model: str = MODEL_ID
    host: str = "127.0.0.1"
    port: int = 7860
    share: bool = False
    auth: tuple[str, str] | None = None
    # Every key accepted on /v1 and MCP (given comma-separated); kept out of repr and logs.
    access_key: tuple[str, ...] = field(default=(), repr=False)
    mcp: bool = False
    demo: bool = False
    zerogpu: bool = False
    context_length: int = 8192
    max_message_chars: int = MAX_MESSAGE_CHARS
    max_input_tokens: int = 4096
    rate_limit: int = 30
    api_rate_limit: int | None = None  # None: as rate_limit (see `api_requests_per_minute`)
    max_queue: int = 64
    session_memory_mb: int = 160
    trusted_proxy_hops: int = 0
    backend: str = "local"
    engine: str = "auto"
    warmup_timeout: float = DEFAULT_WARMUP_TIMEOUT_S
    prefix_cache: str = "private"
    endpoint: str | None = None
    api_key: str | None = None
    request_timeout: float = 60.0
    remote_concurrency: int = 16
    data_dir: str = ""  # set by parse_settings (default_data_dir); "" means no conversation links
    link_max_kb: int = 1024
    links_per_hour: int = 20
    links_max_mb: int = 1024
    link_expiry_days: float = 0.0
    frame_ancestors: str = FRAME_ANCESTORS
    hf_token: str | None = None


def parse_settings(argv: Sequence[str] | None, environ: Mapping[str, str]) -> Settings:
    parser = build_parser()
    args = parser.parse_args(argv)
    values = {}
    given = {}  # option name -> the flag or variable that set it, for the user's own choices
    for option in OPTIONS:
        name = option.flag[2:].replace("-", "_")
        raw, source = getattr(args, name), option.flag
        if raw is None:
            source = next((env for env in variables_for(option) if env in environ), None)
            raw = environ[source] if source else None
        if raw is None and option.env == "ORCA_TRUSTED_PROXY_HOPS" and environ.get("SPACE_ID"):
            raw = 1  # a Space sits behind one proxy of Hugging Face's
        elif raw is not None:
            given[name] = source
        try:
            values[name] = option.default if raw is None else convert(option, raw)
        except ValueError as exc:
            parser.error(f"{option.flag} / {option.env}: {exc}")
    if not 1 <= values["port"] <= MAX_PORT:
        parser.error(f"--port must be between 1 and {MAX_PORT}, got {values['port']}")
    if values["context_length"] < MIN_CONTEXT_LENGTH:
        parser.error(f"--context-length must be at least {MIN_CONTEXT_LENGTH}")
    for name in ("max_message_chars", "max_input_tokens", "max_queue", "session_memory_mb"):
        if values[name] < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if values["rate_limit"] < 0 or values["trusted_proxy_hops"] < 0 or (values["api_rate_limit"] or 0) < 0:
        parser.error("--rate-limit, --api-rate-limit and --trusted-proxy-hops cannot be negative")
    if values["backend"] not in BACKENDS:
        parser.error(f"--backend must be one of {', '.join(BACKENDS)}")
    if values["engine"] not in ENGINE_CHOICES:
        parser.error(f"--engine must be one of {', '.join(ENGINE_CHOICES)}")
    if values["prefix_cache"] not in PREFIX_CACHE_MODES:
        parser.error(f"--prefix-cache must be one of {', '.join(PREFIX_CACHE_MODES)}")
    if values["warmup_timeout"] <= 0:
        parser.error("--warmup-timeout must be positive")
    if values["backend"] == "remote" and values["demo"]:
        parser.error(
            "--demo serves a tiny model in this process, --backend remote a server elsewhere: choose one"
        )
    if values["backend"] == "remote" and not values["endpoint"]:
        parser.error("--backend remote needs --endpoint URL (or ORCA_ENDPOINT)")
    if values["request_timeout"] <= 0 or values["remote_concurrency"] < 1:
        parser.error("--request-timeout and --remote-concurrency must be positive")
    if problem := ignored_option(values, given):
        parser.error(problem)
    if not 1 <= values["link_max_kb"] <= MAX_LINK_KB:
        parser.error(f"--link-max-kb must be 1 to {MAX_LINK_KB} (an imported file's limit)")
    if values["links_per_hour"] < 0 or values["links_max_mb"] < 1:
        parser.error("--links-per-hour cannot be negative and --links-max-mb must be at least 1")
    if not 0 <= values["link_expiry_days"] < math.inf:
        parser.error("--link-expiry-days must be 0 (no expiry) or a positive number of days")
    if problem := frame_ancestors_problem(values["frame_ancestors"]):
        parser.error(f"--frame-ancestors: {problem}")
    values["data_dir"] = values["data_dir"] or str(default_data_dir(environ))
    values["zerogpu"] = values["zerogpu"] or on_zerogpu(environ)
    return Settings(**values, hf_token=environ.get("HF_TOKEN") or None)


def frame_ancestors_problem(sources: str) -> str | None:
    """Why `sources` is not a list of CSP sources that stays one directive, or None."""
    if not sources.strip():
        return "give at least one source ('none' for no frame at all)"
    if bad := sorted({c for c in sources if c in ";," or ord(c) < 0x21 and c != " " or ord(c) > 0x7E}):
        return f"a source cannot hold {' '.join(repr(c) for c in bad)}"
    return None


def variables_for(option: Option) -> tuple[str, ...]:
    """The environment variables that set `option`, ours first."""
    fallback = FALLBACK_ENV.get(option.env)
    return (option.env,) if fallback is None else (option.env, fallback)


def ignored_option(values: Mapping[str, object], given: Mapping[str, str]) -> str | None:
    """A sentence naming an option the user set that the chosen setup would ignore, or None.

    `given` holds only what the user set (flag or environment), so a default, or ZeroGPU
    detected from the Space, is never refused."""
    remote = values["backend"] == "remote"
    for name in LOCAL_ONLY if remote else REMOTE_ONLY:
        if name in given and values[name] is not False:  # ORCA_DEMO=0 asks for nothing
            wanted = "--backend local (the model in this process)" if remote else "--backend remote"
            return f"{given[name]} is only for {wanted}: leave it out, or use {wanted.split(' (')[0]}"
    if values["demo"] and "model" in given:
        return f"--demo serves its own tiny model: leave out {given['model']}, or drop --demo to serve it"
    return None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="app.py", description="Chat with Mistral-7B-OpenOrca in the browser."
    )
    for option in OPTIONS:
        help_text = f"{option.help} (env {option.env}; default: {shown_default(option)})"
        if option.kind is bool:
            parser.add_argument(option.flag, action="store_const", const=True, default=None, help=help_text)
        else:
            parser.add_argument(option.flag, default=None, help=help_text)
    return parser


def shown_default(option: Option) -> str:
    """The default as --help says it: "off" for a switch, "none" for no value, else the value."""
    if option.default_text is not None:
        return option.default_text
    if option.kind is bool:
        return "on" if option.default else "off"
    if option.default in (None, ()):
        return "none"
    return f"{option.default:g}" if isinstance(option.default, float) else str(option.default)


def convert(option: Option, raw: object):
    if option.kind is bool:
        if isinstance(raw, bool):
            return raw
        word = str(raw).strip().lower()
        if word in TRUE_WORDS | FALSE_WORDS:
            return word in TRUE_WORDS
        raise ValueError(f"expected true or false, got {raw!r}")
    if option.kind in (int, float):
        return number(option.kind, raw)
    if option.flag == "--auth":
        return parse_auth(str(raw))
    if option.flag == "--access-key":
        return parse_access_keys(str(raw))
    return str(raw)


def number(kind: type, raw: object) -> int | float:
    """`raw` as an int or a float, or a ValueError in the user's terms (not Python's "invalid
    literal for int() with base 10")."""
    try:
        return kind(raw)
    except ValueError:
        wanted = "a whole number" if kind is int else "a number"
        raise ValueError(f"expected {wanted}, got {raw!r}") from None


def parse_access_keys(raw: str) -> tuple[str, ...]:
    """`k1,k2` -> ("k1", "k2"); blanks around and between commas are dropped."""
    keys = tuple(key.strip() for key in raw.split(",") if key.strip())
    # A key travels in an HTTP header: printable ASCII without spaces.
    if not all(key.isascii() and key.isprintable() and " " not in key for key in keys):
        raise ValueError("a key must be printable ASCII without spaces")
    return keys


def parse_auth(raw: str) -> tuple[str, str]:
    user, sep, password = raw.partition(":")
    if not sep or not user or not password:
        raise ValueError("expected user:password")
    return user, password


def api_requests_per_minute(settings: Settings) -> int:
    """/v1's own limit per key or address: --api-rate-limit, else the page's --rate-limit."""
    return settings.rate_limit if settings.api_rate_limit is None else settings.api_rate_limit
