"""bench/device_check.py on the CPU (--tiny): every step runs or says why not, and the result JSON
has every figure the GPU-figures issue asks for, so that the one GPU call cannot fail on a typo."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.helpers import ROOT


def test_the_device_check_runs_every_step_and_writes_every_figure(tmp_path):
    out = tmp_path / "check.json"
    shipped_defaults = (ROOT / "orca_space" / "engines" / "step_defaults.json").read_text()
    done = subprocess.run(
        [sys.executable, "bench/device_check.py", "--tiny", "--out", str(out), "--budget", "240"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    result = json.loads(out.read_text())
    assert result["finished"] and "cut_short" not in result
    failed = {
        name: step["status"] for name, step in result["steps"].items() if step["status"].startswith("failed")
    }
    assert not failed, failed
    for step in ("graph_replay", "attention", "compiled_step", "gpu_tests", "plan_24gb"):
        assert result["steps"][step]["status"] == "skipped: no CUDA", (
            "the GPU-only steps say why they did not run"
        )
    engine = result["engine"]
    assert result["floor_tok_s"] > 0 and result["reference"]["single_stream_tok_s"] > 0
    for key in (
        "single_stream_tok_s",
        "ttft_512_ms",
        "ttft_4096_ms",
        "ready_s",
        "peak_mem_gb",
        "rung",
        "attention",
    ):
        assert engine.get(key) is not None, key
    assert set(engine["per_stream_tok_s"]) == set(engine["aggregate_tok_s"]) == {"1", "4"}
    assert engine["rung"] == "eager" and result["versions"]["torch"]
    turns = engine["multiturn"]["turns"]
    assert (
        len(turns) == 10
        and turns[-1]["prompt_tokens"] > 3000
        and engine["multiturn"]["prompt_tokens_reused"] > 0
    )
    assert all(row["continued_ms"] > 0 and row["fresh_ms"] > 0 for row in turns)
    assert all(row["equal"] for row in result["steps"]["greedy"]["prompts"]), "greedy equals generate"
    if result["steps"]["scheduling"]["status"] == "ok":  # else it says why it was skipped
        assert set(result["steps"]["scheduling"]["policies"]) == {"fcfs", "budget", "mixed", "budget:256"}
    assert result["load_path"]["slots"] >= 1 and result["load_path"]["load_s"] > 0
    # Every step variant ran, agreed with today's step, and the choice went beside --out only.
    variants = result["steps"]["variants"]["results"]
    assert set(variants) == {"1x256", "4x256"}
    for shape, row in variants.items():
        assert set(row) == {"today", "fused_norm_rope", "fused_all", "fused_all_padded_vocab", "split_kv"}, (
            shape
        )
        assert all(r["correct"] and r["ms"] > 0 for r in row.values()), (shape, row)
    written = json.loads((tmp_path / "step-defaults.json").read_text())
    assert written["choices"]["cpu"] == result["step_options"] and written["evidence"]["cpu"]["ms"]
    assert (ROOT / "orca_space" / "engines" / "step_defaults.json").read_text() == shipped_defaults, (
        "a CPU run never rewrites the engine's defaults"
    )
    profile = result["steps"]["profile"]
    assert all(
        profile[f"{name}_b{batch}"]["aten_ops"] > 0 for name in ("today", "chosen") for batch in (1, 4)
    )
    assert (
        result["versions"]["pinned_torch"]
        and result["versions"]["certified_torch"] == result["versions"]["torch"]
    )
