"""Which local engine serves: the ladder of engines, fastest first, each tried until one passes.

0) `compiled`: `graphs` with the decode step compiled first (torch.compile; a minute more of
   warm-up). `auto` tries it only where the device check found it fastest (`step_options.py`);
1) `graphs`: the batched engine with its decode step replayed as CUDA graphs (CUDA only);
2) `eager`: the same batched engine, each step launched kernel by kernel;
3) `reference`: transformers' `generate` with a streamer, one request at a time.

`auto` walks them in order. A rung fails when building it raises, when its warm-up fails or runs
past the deadline (a hung capture must not hang the Space), or when its self-check
(`selfcheck.py`) disagrees with the model's own forward. A failed rung is closed (its graphs, KV
cache and thread released) before the next is built, and the next is never built while the
failed rung's thread lives: a warm-up stuck inside a CUDA call past `STUCK_GRACE_S`, or a failed
capture the device did not recover from (`capture.DeviceUntrusted`), leaves a process nothing
more should run in, and `FreshProcessNeeded` asks the app to go on from the next rung in a fresh
one. The log tells the story in order: which rung was tried, why it was left, which one serves.
A named engine (`--engine eager`) is tried alone: its failure is the app's.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from ..loading import ModelLoadError
from .batched import BatchedEngine
from .device import release_cached_memory
from .options import DEFAULT_WARMUP_TIMEOUT_S, ENGINE_CHOICES, RUNGS
from .reference import ReferenceEngine
from .requests import Engine
from .selfcheck import SelfCheckResult, run_self_check
from .step_options import defaults_for

log = logging.getLogger(__name__)

SELF_CHECK_TIMEOUT_S = 120.0  # seconds, not minutes, even for the slowest rung
# How long a closed rung's thread may take to end: a capture returns within seconds of its
# deadline, or it is wedged inside the driver.
STUCK_GRACE_S = 10.0
# What the page says each rung costs, in plain words.
RUNG_SPEED = {
    "compiled": "the fastest engine",
    "graphs": "the fastest engine",
    "eager": "slower than the CUDA-graph engine (every step launched kernel by kernel)",
    "reference": "much slower: one reply at a time, the others wait in line",
}
ProgressCallback = Callable[[str, "float | None"], None]


@dataclass(frozen=True)
class RungFailure:
    """A rung that was tried and left: its name and why, in a sentence."""

    rung: str
    reason: str


@dataclass(frozen=True)
class EngineChoice:
    """The engine that serves, and the rungs above it that failed, in the order tried."""

    engine: str
    fallback: tuple[RungFailure, ...] = ()
    self_check: SelfCheckResult | None = None

    @property
    def degraded(self) -> bool:
        """Whether a faster rung was tried and failed: the page then says it is slower."""
        return bool(self.fallback)

    def story(self) -> str:
        """One line for the console and the page: what serves, and why not something faster."""
        left = "; ".join(f"{f.rung} failed: {f.reason}" for f in self.fallback)
        return f"the {self.engine} engine serves" + (f" ({left})" if left else "")


class RungFailed(Exception):
    """This rung cannot serve; the message says why. `untrusted` says why nothing more should
    run in this process, when that is so."""

    untrusted: str | None = None


class FreshProcessNeeded(Exception):
    """A rung failed in a way that leaves this process unfit for the next: go on from `rungs`
    in a fresh process, the story so far in `failures` (see `startup.relaunch`)."""

    def __init__(self, failures: tuple[RungFailure, ...], rungs: list[str]) -> None:
        last = failures[-1]
        super().__init__(f"the {last.rung} engine failed ({last.reason}); going on in a fresh process")
        self.failures, self.rungs = failures, rungs


def rungs_to_try(choice: str, cuda: bool, compiled_first: bool = False) -> list[str]:
    """The rungs to try in order; `compiled_first`: the device check chose the compiled step."""
    if choice not in ENGINE_CHOICES:
        raise ModelLoadError(f"--engine must be one of {', '.join(ENGINE_CHOICES)}, got {choice!r}.")
    if choice == "auto":
        skipped = {"compiled", "graphs"} if not cuda else set() if compiled_first else {"compiled"}
        return [rung for rung in RUNGS if rung not in skipped]
    if choice in ("graphs", "compiled") and not cuda:
        raise ModelLoadError(
            f"--engine {choice} replays CUDA graphs and needs a CUDA GPU, which this machine does not have; "
            "use --engine eager (or auto)."
        )
    return [choice]


def build_rung(
    rung: str, model, stop_ids: Iterable[int], context_length: int, on_progress, prefix_cache: str = "private"
) -> Engine:
    """One rung. `prefix_cache` (engines/prefix_cache.py) is the batched engine's; the reference
    rung prefills every prompt whole."""
    if rung == "reference":
        return ReferenceEngine(model, stop_ids, context_length)
    return BatchedEngine(
        model,
        stop_ids,
        context_length,
        use_graphs=rung in ("graphs", "compiled"),
        compile_step=rung == "compiled",
        on_progress=on_progress,
        prefix_cache=prefix_cache,
    )


def start_engine(
    model,
    stop_ids: Iterable[int],
    context_length: int,
    probes: list[list[int]],
    choice: str = "auto",
    warmup_timeout: float = DEFAULT_WARMUP_TIMEOUT_S,
    on_progress: ProgressCallback | None = None,
    prefix_cache: str = "private",
    earlier: tuple[RungFailure, ...] = (),
) -> tuple[Engine, EngineChoice]:
    """The first rung that warms up and passes its self-check, and the story of the ladder.
    `earlier`: rungs that failed in an earlier process (`FreshProcessNeeded`), not tried again."""
    progress = on_progress or (lambda message, fraction=None: None)
    left_behind = {failure.rung for failure in earlier}
    compiled_first = defaults_for("cuda").compiled  # on a CPU there is no graphs rung to compile
    rungs = [rung for rung in rungs_to_try(choice, model.device.type == "cuda", compiled_first)]
    rungs = [rung for rung in rungs if rung not in left_behind]
    failures: list[RungFailure] = list(earlier)
    for number, rung in enumerate(rungs):
        above = f" ({failures[-1].rung} failed: {failures[-1].reason})" if failures else ""
        progress(f"Starting the {rung} engine{above}…", None)
        log.info("engine ladder: trying the %s engine", rung)
        try:
            engine, check = start_rung(
                rung, model, stop_ids, context_length, probes, warmup_timeout, progress, prefix_cache
            )
        except RungFailed as exc:
            log.warning("engine ladder: the %s engine failed: %s", rung, exc)
            failures.append(RungFailure(rung, str(exc)))
            if exc.untrusted and rungs[number + 1 :]:
                log.error("engine ladder: %s; the next engine starts in a fresh process", exc.untrusted)
                raise FreshProcessNeeded(tuple(failures), rungs[number + 1 :]) from None
            continue
        chosen = EngineChoice(rung, tuple(failures), check)
        log.info("engine ladder: %s", chosen.story())
        return engine, chosen
    tried = "; ".join(f"{f.rung}: {f.reason}" for f in failures)
    raise ModelLoadError(f"No engine could start on this machine ({tried}).")


def start_rung(
    rung: str,
    model,
    stop_ids: Iterable[int],
    context_length: int,
    probes: list[list[int]],
    warmup_timeout: float,
    progress: ProgressCallback,
    prefix_cache: str = "private",
) -> tuple[Engine, SelfCheckResult]:
    """Build, warm up and self-check one rung; RungFailed (after releasing it) if it cannot serve."""
    try:
        engine = build_rung(rung, model, stop_ids, context_length, progress, prefix_cache)
    except Exception as exc:  # e.g. no memory left for even one KV-cache slot
        log.debug("building the %s engine failed", rung, exc_info=True)
        raise RungFailed(f"starting it failed: {type(exc).__name__}: {exc}") from None
    try:
        started = time.monotonic()
        if not engine.wait_ready(warmup_timeout):
            failure = engine.stats().failure
            raise RungFailed(failure or f"its warm-up ran past the {warmup_timeout:g} s deadline")
        log.info("engine ladder: the %s engine warmed up in %.1f s", rung, time.monotonic() - started)
        progress(f"Checking the {rung} engine against the model's own forward…", None)
        check = run_self_check(engine, model, probes, SELF_CHECK_TIMEOUT_S)
        log.info("engine ladder: the %s engine's %s", rung, check.summary())
        if not check.passed:
            raise RungFailed(f"its self-check failed: {check.problem}")
        return engine, check
    except RungFailed as exc:
        exc.untrusted = close_and_release(engine, rung)
        raise
    except BaseException:
        close_and_release(engine, rung)
        raise


def stuck_rung_blocks_the_process(device) -> bool:
    """Whether a rung stuck in its warm-up leaves the process unfit for the next: on CUDA it holds
    the device (a capture under way, its memory); on the CPU there is nothing it shares."""
    return device.type == "cuda"


def close_and_release(engine: Engine, rung: str) -> str | None:
    """Close a failed rung and wait for its thread. None when the next rung may start in this
    process; else why not (its thread is stuck, or its failure left the device unusable)."""
    engine.close(timeout=STUCK_GRACE_S)  # a failed warm-up has already ended; a stuck capture may still
    if engine.stats().alive and not stuck_rung_blocks_the_process(engine.device):
        log.warning(
            "the %s engine is still stuck in its warm-up; on the %s nothing it holds is shared",
            rung,
            engine.device.type,
        )
        return None
    if engine.stats().alive:
        # Stuck inside a CUDA call that cannot be interrupted. A device-wide sync or cache release
        # now could break it (or worse) under its feet, and a next rung would plan its memory
        # around what the stuck one still holds: leave this process to it.
        log.warning("the %s engine is still stuck in its warm-up after %g s", rung, STUCK_GRACE_S)
        return f"the {rung} engine's warm-up is stuck inside a CUDA call and cannot be stopped"
    if getattr(engine, "device_untrusted", False):
        return f"the GPU did not recover from the {rung} engine's failed capture"
    release_cached_memory(engine.device)
    return None
