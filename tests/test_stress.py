"""`bench/stress.py --size small` against the tiny checkpoint: nothing crashes, fails or leaks."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.helpers import ROOT


@pytest.fixture(scope="module")
def figures(tiny_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("stress")
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "stress.py"),
            "--spawn",
            "--model",
            str(tiny_dir),
            "--size",
            "small",
            "--app-arg=--rate-limit=0",
            "--out",
            str(out / "stress.json"),
            "--app-log",
            str(out / "app.log"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=180,
    )
    log_tail = (out / "app.log").read_text()[-3000:] if (out / "app.log").exists() else ""
    assert (out / "stress.json").exists(), f"no figures:\n{proc.stdout}\n{proc.stderr}\n{log_tail}"
    results = json.loads((out / "stress.json").read_text())
    results["_output"] = f"{proc.stdout}\n{proc.stderr[-3000:]}\n--- app log ---\n{log_tail}"
    results["_returncode"] = proc.returncode
    return results


def test_no_crashes_failures_or_leaks(figures):
    assert figures["crashes"] == 0, f"the app died or stopped answering /healthz:\n{figures['_output']}"
    assert figures["failures"] == 0, f"requests that should have worked did not:\n{figures['_output']}"
    assert figures["leaked"] == 0, f"a cancelled generation kept running:\n{figures['_output']}"
    assert figures["_returncode"] == 0 and not figures["skipped_phases"]


def test_every_bad_input_failed_visibly(figures):
    bad = figures["bad_inputs"]
    assert bad["tried"] >= 30 and bad["skipped"] == 0
    assert bad["unanswered"] == 0 and bad["server_errors"] == 0, "each bad input gets an answer"
    assert bad["refused_4xx"] + bad["error_events"] + bad["unnamed_errors"] + bad["accepted"] == bad["tried"]


def test_concurrent_sessions_stay_separate(figures):
    sessions = figures["sessions"]
    assert sessions["succeeded"] == sessions["sessions"] * sessions["turns"], sessions["errors"]
    assert sessions["compared_with_solo"] == sessions["succeeded"], (
        "every reply was checked against a solo run"
    )
    assert sessions["mismatches"] == 0, (
        f"a session saw another's conversation: {sessions['mismatch_examples']}"
    )


def test_cancels_free_the_engine(figures):
    cancels = figures["cancels"]
    assert cancels["cancels"] + cancels["disconnects"] >= 8 and cancels["hung"] == 0
    assert cancels["leaked"] == 0 and cancels["idle_after_ms"] <= 5000  # bench/stress.py IDLE_DEADLINE_S
    assert cancels["next_request_ok"]


def test_a_full_queue_answers_busy_at_once(figures):
    overflow = figures["overflow"]
    assert overflow["queue_limit_found"], "the queue must be bounded"
    assert overflow["burst"] > 0 and overflow["accepted_in_burst"] == 0, "nothing more fits in a full queue"
    assert overflow["busy"] > 0, f"callers are told the queue is full: {overflow['other_rejections']}"
    assert overflow["refused_ms"]["max"] < 1000, "a full queue says so at once instead of making callers wait"
    assert overflow["next_request_ok"], "the app serves again after the flood"
