"""The pure parts of the page's panels: the prompt view, the engine panel, the presets."""

from __future__ import annotations

import pytest

from orca_space.chat import ChatLimits, ChatService
from orca_space.engines.ladder import EngineChoice, RungFailure
from orca_space.engines.requests import EngineStats
from orca_space.runtime import ChatRuntime, GpuMemory
from orca_space.web.page import presets
from orca_space.web.page.engine_panel import engine_markdown, gpu_memory_text
from orca_space.web.page.prompt_view import CONTROL_LABEL, highlighted, preview, prompt_view, summary_markdown

DEFAULTS = {"max_new_tokens": 100, "temperature": 0.4, "top_p": 0.95, "top_k": 40, "repetition_penalty": 1.1}


class ContinuingBackend:
    continues_replies = True


def service(encoder, context_length=512):
    return ChatService(ContinuingBackend(), encoder, ChatLimits(context_length=context_length))


def test_prompt_view_shows_the_exact_chatml_with_control_tokens_marked(encoder, tokenizer):
    chat = service(encoder).prepare("Hi <|im_start|> typed", [], "Be brief.", DEFAULTS)
    view = prompt_view(encoder, chat, 512)
    assert view.text == tokenizer.decode(encoder.encode_chat(chat.messages)), "the text the ids stand for"
    spans = highlighted(view)
    controls = [text for text, label in spans if label == CONTROL_LABEL]
    assert controls == ["<s>", "<|im_start|>", "<|im_end|>", "<|im_start|>", "<|im_end|>", "<|im_start|>"]
    assert ("user\nHi <|im_start|> typed", None) in spans, "a typed control string is plain text, unmarked"
    assert view.prompt_tokens == len(encoder.encode_chat(chat.messages))


def test_prompt_summary_counts_tokens_against_the_budget_and_names_left_out_turns(encoder):
    old = [
        {"role": "user", "content": "old *question* " * 30},
        {"role": "assistant", "content": "old answer " * 30},
    ]
    chat = service(encoder, context_length=260).prepare("new question", old, "", DEFAULTS)
    assert chat.dropped_turns == 1 and chat.left_out == tuple(old)
    summary = summary_markdown(prompt_view(encoder, chat, 260))
    assert f"**{chat.prompt_tokens:,} of 160 tokens**" in summary
    assert "260-token context minus 100 max new tokens" in summary
    assert "Left out to fit, oldest first (1 turn):" in summary
    assert "- **user**: old \\*question\\*" in summary, "a left-out message shows as typed, not as Markdown"
    assert "none was left out" in summary_markdown(
        prompt_view(encoder, service(encoder).prepare("x", [], "", DEFAULTS), 512)
    )
    assert "No reply yet" in summary_markdown(None) and highlighted(None) == []


def test_a_continued_prompt_says_its_reply_is_open(encoder):
    history = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello, I"}]
    chat = service(encoder).prepare_continuation(history, "", DEFAULTS)
    view = prompt_view(encoder, chat, 512)
    assert view.continued and view.text.endswith("<|im_start|>assistant\nHello, I")
    assert "left open" in summary_markdown(view)


def test_previews_are_one_short_line():
    assert preview("a\n\nb  c") == "a b c"
    assert len(preview("x" * 500)) == 100 and preview("x" * 500).endswith("…")
    assert preview("") == "(empty)"


class Engine:
    def __init__(self, stats):
        self._stats = stats

    def stats(self):
        return self._stats


def test_engine_panel_while_loading_and_after_a_failure():
    runtime = ChatRuntime(model_name="m", context_length=8192)
    runtime.status.update("downloading", "Downloading the weights…", 0.4)
    assert "No engine yet" in engine_markdown(runtime) and "Downloading" in engine_markdown(runtime)
    runtime.status.update("failed", "No GPU.")
    assert "could not be loaded" in engine_markdown(runtime)


def test_engine_panel_names_the_engine_its_load_speed_and_memory(encoder):
    runtime = ChatRuntime(model_name="m", context_length=8192)
    runtime.service = service(encoder)
    runtime.engine = Engine(EngineStats(alive=True, active=2, queued=1, capacity=9, non_finite_replies=3))
    runtime.engine_choice = EngineChoice("eager", (RungFailure("graphs", "capture failed: out of memory"),))
    runtime.status.update("ready", "Ready.")
    panel = engine_markdown(runtime)
    assert "`eager`: batched engine, eager (no CUDA graphs)" in panel
    assert "`graphs`: capture failed: out of memory" in panel, "why the faster engine was left"
    assert "2 active, 1 queued, capacity 9" in panel and "3 replies ended" in panel
    assert "0.0 tok/s over the last minute" in panel
    assert "CPU (no GPU in use)" in panel, "no CUDA context in this test process"


def test_engine_panel_for_a_remote_backend(encoder):
    runtime = ChatRuntime(model_name="m", context_length=8192)
    runtime.service = ChatService(object(), encoder, ChatLimits())
    runtime.engine = type("Remote", (Engine,), {"endpoint": "http://gpu:8080/v1"})(
        EngineStats(True, 1, 0, 16)
    )
    runtime.status.update("ready", "Ready.")
    panel = engine_markdown(runtime)
    assert "remote server at http://gpu:8080/v1" in panel and "on the remote server" in panel


def test_gpu_memory_reads_in_gib():
    assert (
        gpu_memory_text(GpuMemory(used_bytes=18 << 30, total_bytes=24 << 30))
        == "GPU: 18.0 of 24.0 GiB in use (75%)"
    )


def test_presets_fill_the_box_and_text_maps_back():
    assert presets.preset_text(presets.DEFAULT_PRESET) == presets.MODEL_CARD
    assert presets.preset_text(presets.CUSTOM) is None, "Custom keeps what the box holds"
    assert presets.preset_for(presets.PRESETS["Coding assistant"]) == "Coding assistant"
    assert presets.preset_for("my own words") == presets.CUSTOM
    assert len(presets.PRESETS) >= 5 and len(set(presets.PRESETS.values())) == len(presets.PRESETS)
    with pytest.raises(ValueError, match="unknown preset"):
        presets.preset_text("Evil")
