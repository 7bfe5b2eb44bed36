"""Which decode step the engine runs: today's step (`mistral.decode`) or the fused one
(`fused_decode.decode`) with some of its parts, and where the choice comes from.

Every variant computes the same function (greedy-equal to the reference on the tiny model, within
the self-check's tolerance in fp16); they differ in kernels per step, which only a GPU can weigh.
`bench/device_check.py` times each side by side on the GPU and writes the fastest correct one to
`step_defaults.json` beside this file; the engine reads it for a CUDA device (`defaults_for`). The
CPU keeps its own line of that file: there SDPA is slower with a float mask.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, fields
from pathlib import Path

log = logging.getLogger(__name__)

DEFAULTS_FILE = Path(__file__).with_name("step_defaults.json")
MASKS = ("bool", "additive")
NORMS = ("separate", "fused")
ROPES = ("separate", "fused")


@dataclass(frozen=True)
class StepOptions:
    """One decode-step variant. The defaults are today's step, kernel for kernel."""

    # "bool": every layer's SDPA converts the boolean mask into a float one again; "additive":
    # one float mask per step, shared by every layer.
    mask: str = "bool"
    # "separate": upcast, rms_norm, downcast, weight multiply (four kernels); "fused": F.rms_norm
    # with its weight, one kernel (fp32 statistics either way).
    norm: str = "separate"
    # "separate": q and k rotated one after the other, four kernels each; "fused": q and k rotated
    # together as one tensor, three kernels in all.
    rope: str = "separate"
    # Decode batches of at most this many rows attend by batched matmuls with an fp32 softmax
    # (`fused_decode.split_kv_attention`): the matrix product splits the keys over the whole
    # GPU, where SDPA's memory-efficient kernel runs one block per (row, head). 0: never.
    split_kv_up_to: int = 0
    # The logits come from the output projection padded to a multiple of 64 rows
    # (`hf_weights.pad_lm_head`), then cut back to the vocabulary.
    pad_vocab: bool = False
    # The graphs rung compiles the step first (torch.compile, a minute of warm-up on the 7B).
    compiled: bool = False

    def __post_init__(self) -> None:
        for name, allowed in (("mask", MASKS), ("norm", NORMS), ("rope", ROPES)):
            if getattr(self, name) not in allowed:
                raise ValueError(
                    f"step option {name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}"
                )
        if self.split_kv_up_to < 0:
            raise ValueError(f"step option split_kv_up_to must be >= 0, got {self.split_kv_up_to}")

    @property
    def is_baseline(self) -> bool:
        """Today's step, with no part fused: `mistral.decode` runs it."""
        return self.forward_parts() == BASELINE.forward_parts()

    def forward_parts(self) -> tuple:
        return (self.mask, self.norm, self.rope, self.split_kv_up_to, self.pad_vocab)

    def describe(self) -> str:
        changed = {k: v for k, v in asdict(self).items() if v != getattr(BASELINE, k)}
        return ", ".join(f"{k}={v}" for k, v in changed.items()) or "today's step"

    @classmethod
    def from_dict(cls, values: dict) -> StepOptions:
        known = {f.name for f in fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise ValueError(f"unknown step options: {', '.join(sorted(unknown))}")
        return cls(**values)


BASELINE = StepOptions()
# Fewer kernels for the same numbers, without anything only a GPU can judge.
FUSED = StepOptions(norm="fused", rope="fused")


def defaults_for(device_type: str, path: Path = DEFAULTS_FILE) -> StepOptions:
    """The variant the engine runs on this kind of device: the file's line for it, or FUSED."""
    try:
        chosen = json.loads(path.read_text())["choices"].get(device_type)
    except (OSError, ValueError, KeyError) as exc:
        log.warning("no step defaults in %s (%s): using %s", path, exc, FUSED.describe())
        return FUSED
    return StepOptions.from_dict(chosen) if chosen is not None else FUSED


def write_defaults(path: Path, device_type: str, options: StepOptions, evidence: dict) -> None:
    """Record `options` as the default for `device_type`, with what decided it."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        data = {}
    data.setdefault("choices", {})[device_type] = asdict(options)
    data.setdefault("evidence", {})[device_type] = evidence
    path.write_text(json.dumps(data, indent=2) + "\n")
