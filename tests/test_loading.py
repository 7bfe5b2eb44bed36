"""Loading failures become a plain status on the page and in /healthz, never a bare stack trace."""

from __future__ import annotations

import shutil
import time

import pytest

from orca_space.loading import LoadStatus, ModelLoadError, explain_download_failure, pick_device
from orca_space.settings import parse_settings
from orca_space.startup import start_local_runtime
from orca_space.tiny import TINY_MARKER


def wait_done(status: LoadStatus, timeout=60.0):
    deadline = time.monotonic() + timeout
    while not (status.ready or status.failed):
        assert time.monotonic() < deadline, status.message
        time.sleep(0.05)
    return status


def test_without_cuda_the_full_model_says_it_needs_a_gpu(monkeypatch):
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    with pytest.raises(ModelLoadError, match="needs a CUDA GPU") as info:
        pick_device(require_cuda=True)
    assert "--demo" in str(info.value), "the message says what to do instead"


def test_a_full_size_local_checkpoint_on_cpu_fails_with_the_gpu_message(tiny_dir, tmp_path, monkeypatch):
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    not_tiny = tmp_path / "model"
    shutil.copytree(tiny_dir, not_tiny)
    (not_tiny / TINY_MARKER).unlink()  # now it looks like any real checkpoint
    runtime = start_local_runtime(parse_settings(["--model", str(not_tiny)], {}))
    status = wait_done(runtime.status)
    assert status.failed and "needs a CUDA GPU" in status.message
    assert runtime.service is None


def test_without_cuda_nothing_is_downloaded(monkeypatch):
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    downloads = []
    monkeypatch.setattr("huggingface_hub.snapshot_download", lambda *a, **k: downloads.append(a))
    runtime = start_local_runtime(parse_settings([], {}))
    status = wait_done(runtime.status)
    assert status.failed and "needs a CUDA GPU" in status.message
    assert downloads == [], "14.5 GB must not be fetched for a machine that cannot run it"


def test_offline_and_not_cached_says_so(tmp_path, monkeypatch):
    monkeypatch.setattr("torch.cuda.is_available", lambda: True)  # get past the GPU check
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    runtime = start_local_runtime(parse_settings(["--model", "Open-Orca/Mistral-7B-OpenOrca"], {}))
    status = wait_done(runtime.status)
    assert status.failed
    assert "not in the local cache" in status.message and "--demo" in status.message


def test_download_failures_are_explained():
    from huggingface_hub.errors import OfflineModeIsEnabled

    text = explain_download_failure("x/y", OfflineModeIsEnabled("offline"))
    assert "unreachable" in text and "x/y" in text
    assert "ValueError" in explain_download_failure("x/y", ValueError("odd"))


def test_tiny_checkpoint_loads_on_cpu_and_is_labelled_demo(tiny_dir):
    runtime = start_local_runtime(parse_settings(["--model", str(tiny_dir)], {}))
    status = wait_done(runtime.status)
    assert status.ready and runtime.demo and runtime.service is not None
    runtime.engine.close()


def test_the_ready_news_is_told_before_anyone_can_act_on_it():
    """`when_settled` listeners run in the thread that settles the load, inside `update`: the
    console's "Ready to chat" line is written before /healthz can say ready (a poll every 0.5 s
    once missed it: the test client stopped the server sooner)."""
    status, heard = LoadStatus(), []
    status.when_settled(lambda s: heard.append((s.phase, s.ready)))
    status.update("loading", "Loading...")
    assert heard == [], "not settled yet"
    status.update("ready", "Ready.")
    assert heard == [("ready", True)], "told at once, in update"
    status.when_settled(lambda s: heard.append("late"))
    assert heard[-1] == "late", "a listener that comes after the news hears it at once"
    failed = LoadStatus()
    failed.when_settled(lambda s: heard.append(s.failed))
    failed.update("failed", "No GPU.")
    assert heard[-1] is True
