"""The self-check an engine passes before it serves: its own first tokens and logits for a few fixed
probe prompts, compared, teacher-forced, with the model's own transformers forward in this process.

Probes are greedy and submitted together (so the batched engine decodes them in one step, through
its graphs when it has them); one is short, one longer than a prefill chunk. For each token the
engine produced, the model's forward over the prompt and the engine's earlier tokens gives the
reference logits `h`; the engine's logits `e` for that step pass when:

- every value of `e` is finite, and the token is an id of the vocabulary;
- max |e - h| <= atol + rtol * max |h| (per dtype, `TOLERANCES`: fp32 agrees to rounding; fp16
  kernels that add in another order differ by a few hundredths on logits in the tens);
- the token is the argmax of `h`, or a near-tie: `h` scores it within `tie_margin` of its best.
  A greedy choice between two logits closer than fp16 rounding can go either way in an honest
  implementation; past the margin, a different token means different math.

Teacher forcing (the reference sees the engine's own tokens) keeps a near-tie from spoiling the
steps after it. It takes a fraction of a second on a GPU, about as long as a short reply.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

from ..params import SamplingParams
from .requests import Engine, TokenEvent

log = logging.getLogger(__name__)

PROBE_TOKENS = 8
PROBE_PARAMS = SamplingParams(
    max_new_tokens=PROBE_TOKENS, temperature=0.0, top_p=1.0, top_k=0, repetition_penalty=1.0
)


@dataclass(frozen=True)
class Tolerance:
    atol: float
    rtol: float
    tie_margin: float


TOLERANCES = {
    torch.float32: Tolerance(atol=1e-3, rtol=1e-4, tie_margin=1e-3),
    torch.float16: Tolerance(atol=0.05, rtol=0.02, tie_margin=0.1),
    torch.bfloat16: Tolerance(atol=0.1, rtol=0.04, tie_margin=0.25),
}


@dataclass(frozen=True)
class SelfCheckResult:
    passed: bool
    problem: str | None  # the first thing that failed, in a sentence
    max_logit_diff: float  # the largest |engine - reference| seen, over every checked logit
    tokens_checked: int
    near_ties: int  # tokens accepted that were not the reference's argmax
    seconds: float

    def summary(self) -> str:
        outcome = "passed" if self.passed else f"failed: {self.problem}"
        return (
            f"self-check {outcome} ({self.tokens_checked} tokens checked, largest logit difference "
            f"{self.max_logit_diff:.2e}, {self.near_ties} near-ties, {self.seconds:.1f} s)"
        )


class CheckFailed(Exception):
    pass


def run_self_check(engine: Engine, model, probes: list[list[int]], timeout: float) -> SelfCheckResult:
    """Probe `engine` and compare with `model`'s forward; see the module docstring."""
    started = time.monotonic()
    tolerance = TOLERANCES.get(model.dtype, TOLERANCES[torch.float16])
    checked, ties, largest = 0, 0, 0.0
    try:
        handles = [engine.submit(prompt, PROBE_PARAMS, record_logits=True) for prompt in probes]
        for number, (prompt, handle) in enumerate(zip(probes, handles), start=1):
            events = handle.collect(max(0.1, timeout - (time.monotonic() - started)))
            steps = probe_steps(events, f"probe {number}")
            reference = reference_logits(model, prompt, [token for token, _ in steps])
            for step, ((token, logits), expected) in enumerate(zip(steps, reference)):
                where = f"probe {number} ({len(prompt)} tokens), token {step + 1}"
                largest = max(largest, check_step(token, logits, expected, tolerance, where))
                ties += int(token != int(expected.argmax()))
                checked += 1
        if checked == 0:
            raise CheckFailed("the probes produced no tokens to check")
    except (CheckFailed, TimeoutError) as exc:
        return SelfCheckResult(False, str(exc), largest, checked, ties, time.monotonic() - started)
    except Exception as exc:  # e.g. the reference forward ran out of memory: this rung cannot be trusted
        log.warning("the self-check itself failed", exc_info=True)
        problem = f"the check itself failed ({type(exc).__name__}: {exc})"
        return SelfCheckResult(False, problem, largest, checked, ties, time.monotonic() - started)
    return SelfCheckResult(True, None, largest, checked, ties, time.monotonic() - started)


def probe_steps(events: list[TokenEvent], where: str) -> list[tuple[int, torch.Tensor]]:
    """(token, logits) for each token event; a failed probe is a failed check."""
    final = events[-1]
    if final.finish_reason == "error":
        raise CheckFailed(f"{where} failed in the engine: {final.error}")
    steps = [(event.token, event.logits) for event in events if event.token is not None]
    if any(logits is None for _, logits in steps):
        raise CheckFailed(f"{where}: the engine did not record its logits")
    return steps


def reference_logits(model, prompt: list[int], tokens: list[int]) -> torch.Tensor:
    """The model's own next-token logits for each of `tokens`, fed the tokens before it. [N, V]"""
    if not tokens:
        return torch.empty(0)
    ids = torch.tensor([prompt + tokens[:-1]], device=model.device)
    with torch.inference_mode():
        out = model(input_ids=ids, logits_to_keep=len(tokens))
    return out.logits[0].float().cpu()


def check_step(
    token: int, logits: torch.Tensor, expected: torch.Tensor, tolerance: Tolerance, where: str
) -> float:
    """The step's largest logit difference; CheckFailed naming what is wrong."""
    if not bool(torch.isfinite(logits).all()):
        raise CheckFailed(f"{where}: the engine's logits are not all finite")
    if not 0 <= token < expected.shape[-1]:
        raise CheckFailed(f"{where}: token {token} is not in the vocabulary")
    difference = float((logits - expected).abs().max())
    allowed = tolerance.atol + tolerance.rtol * float(expected.abs().max())
    if difference > allowed:
        raise CheckFailed(
            f"{where}: the engine's logits differ from the model's by {difference:.3g} "
            f"(at most {allowed:.3g} allowed)"
        )
    best = int(expected.argmax())
    gap = float(expected[best] - expected[token])
    if token != best and gap > tolerance.tie_margin:
        raise CheckFailed(
            f"{where}: the engine chose token {token} where the model prefers {best} by {gap:.3g} "
            f"(a tie within {tolerance.tie_margin} would be accepted)"
        )
    return difference
