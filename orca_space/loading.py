"""Getting the model and tokenizer: download, load, and say plainly why that failed.

The same `from_pretrained` path loads the real Hub checkpoint in fp16 on CUDA and the tiny
random checkpoint on the CPU. Loading runs in the background so the page comes up at once;
`LoadStatus` is what the page and the console show meanwhile.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

log = logging.getLogger(__name__)

Phase = Literal["starting", "downloading", "loading", "ready", "failed"]
# The files a checkpoint needs; skipping the rest avoids fetching a second copy of the weights.
CHECKPOINT_FILES = ["*.json", "*.safetensors", "tokenizer.model", "*.jinja", "*.txt"]
# A remote backend needs only the tokenizer (for the context budget), never the weights.
TOKENIZER_FILES = ["tokenizer*", "special_tokens_map.json", "*.jinja", "*.txt", "config.json"]
FULL_MODEL_GB = 14.5
RECOMMENDED_GPU_GB = 24


@dataclass
class LoadStatus:
    phase: Phase = "starting"
    message: str = "Starting…"
    fraction: float | None = None  # of the download, when known
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _on_settled: list[Callable[[LoadStatus], None]] = field(default_factory=list, repr=False)

    def update(self, phase: Phase, message: str, fraction: float | None = None) -> None:
        with self._lock:
            self.phase, self.message, self.fraction = phase, message, fraction
            listeners, self._on_settled = (self._on_settled, []) if self.settled else ([], self._on_settled)
        level = logging.ERROR if phase == "failed" else logging.INFO
        log.log(level, "%s%s", message, "" if fraction is None else f" ({fraction:.0%})")
        for listener in listeners:
            listener(self)

    def when_settled(self, listener: Callable[[LoadStatus], None]) -> None:
        """Call `listener(self)` once the load is ready or failed: at once if it is, else in the
        thread that settles it, before anyone could act on the news (a poll could miss it: a
        client that saw /healthz ready and stopped the server within the poll's interval)."""
        with self._lock:
            if not self.settled:
                self._on_settled.append(listener)
                return
        listener(self)

    @property
    def settled(self) -> bool:
        return self.phase in ("ready", "failed")

    @property
    def ready(self) -> bool:
        return self.phase == "ready"

    @property
    def failed(self) -> bool:
        return self.phase == "failed"


class ModelLoadError(RuntimeError):
    """Loading failed; the message says why and what to do."""


def pick_device(require_cuda: bool) -> str:
    import torch

    if torch.cuda.is_available():
        return "cuda"
    if require_cuda:
        raise ModelLoadError(
            f"The full model needs a CUDA GPU with at least {RECOMMENDED_GPU_GB} GB of memory "
            f"({FULL_MODEL_GB} GB of weights plus the chats' KV cache), "
            "and none was found. Run on a GPU machine (on Spaces, pick GPU hardware), "
            "or try the UI offline with --demo, or serve the model elsewhere with --backend remote."
        )
    return "cpu"


def resolve_checkpoint(
    source: str, status: LoadStatus, token: str | None = None, tokenizer_only: bool = False
) -> Path:
    """A local directory as is; a Hub id downloaded (or found in the cache) with progress."""
    if Path(source).is_dir():
        return Path(source)
    from huggingface_hub import snapshot_download

    what = "the tokenizer" if tokenizer_only else f"the weights ({FULL_MODEL_GB} GB the first time)"
    status.update("downloading", f"Downloading {what} of {source}…", 0.0)
    try:
        path = snapshot_download(
            source,
            allow_patterns=TOKENIZER_FILES if tokenizer_only else CHECKPOINT_FILES,
            token=token,
            tqdm_class=_progress_bar_class(status, source),
        )
    except Exception as exc:
        raise ModelLoadError(explain_download_failure(source, exc)) from exc
    return Path(path)


def _progress_bar_class(status: LoadStatus, source: str):
    """A tqdm that reports the download's byte progress into `status`."""
    from tqdm.auto import tqdm

    class StatusProgress(tqdm):
        def update(self, n=1):
            shown = super().update(n)
            if self.total and self.unit == "B":
                status.update(
                    "downloading",
                    f"Downloading {source}: {self.n / 1e9:.1f} of {self.total / 1e9:.1f} GB",
                    self.n / self.total,
                )
            return shown

    return StatusProgress


def explain_download_failure(source: str, exc: Exception) -> str:
    from huggingface_hub import errors

    name = type(exc).__name__
    if isinstance(exc, errors.GatedRepoError):
        return f"{source} is gated: accept its terms on the Hub and set HF_TOKEN."
    if isinstance(exc, errors.RepositoryNotFoundError):
        return f"{source} was not found on the Hugging Face Hub, nor as a local directory. Check --model."
    if isinstance(exc, (errors.LocalEntryNotFoundError, errors.OfflineModeIsEnabled)) or "Connect" in name:
        return (
            f"Could not download {source}: the Hub is unreachable (or HF_HUB_OFFLINE is set) and "
            "the model is not in the local cache. Connect to the internet once, or pass a local "
            "directory with --model, or try the UI with --demo."
        )
    return f"Could not download {source} ({name}: {exc})."


def load_tokenizer(checkpoint: str | Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(checkpoint)


def load_model(checkpoint: Path, device: str, dtype=None):
    """fp16 on CUDA (the model's own precision); fp32 on the CPU, where fp16 kernels are slow,
    unless `dtype` says otherwise (ZeroGPU loads fp16 on the CPU, then moves it)."""
    import torch
    from transformers import AutoModelForCausalLM

    dtype = dtype or (torch.float16 if device == "cuda" else torch.float32)
    try:
        model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=dtype, device_map=device)
    except torch.cuda.OutOfMemoryError as exc:
        raise ModelLoadError(
            f"The GPU ran out of memory loading the weights ({FULL_MODEL_GB} GB in fp16). "
            f"It needs a GPU with at least {RECOMMENDED_GPU_GB} GB, with nothing else running on it."
        ) from exc
    return model.eval()


def load_in_background(
    task: Callable[[LoadStatus], None], status: LoadStatus, name: str = "orca-loader"
) -> threading.Thread:
    """Run `task(status)` on a thread; any failure becomes a 'failed' status with its reason."""

    def run() -> None:
        try:
            task(status)
        except ModelLoadError as exc:
            status.update("failed", str(exc))
        except Exception as exc:  # unexpected: keep the trace in the log, the reason on the page
            log.exception("loading failed")
            status.update("failed", f"Loading failed ({type(exc).__name__}: {exc}).")

    thread = threading.Thread(target=run, name=name, daemon=True)
    thread.start()
    return thread
