"""A stand-in for `spaces.GPU` that works the way ZeroGPU does, on the CPU.

Each call asks `duration(*args)` first (recorded), then runs the generator in a worker process
forked for that call; its arguments and every item it yields are pickled across, as ZeroGPU does.
Closing the caller's generator takes effect at the worker's next item: the worker then closes the
real generator (its `finally` runs) and exits. An exception in the worker comes back the way
ZeroGPU reports it: a gradio Error titled "ZeroGPU worker error" carrying the class name only.
"""

from __future__ import annotations

import multiprocessing
import os
import pickle
import queue

from gradio.exceptions import Error as GradioError


class FakeZeroGPU:
    def __init__(self) -> None:
        self.durations: list[int] = []
        self.workers: list = []
        self.visitor_tokens: list[str | None] = []  # what `spaces` would charge each call to

    def GPU(self, task=None, *, duration=None):  # noqa: N802 (the name `spaces` gives it)
        def decorate(function):
            def call(*args):
                self.durations.append(duration(*args) if callable(duration) else duration)
                self.visitor_tokens.append(visitor_token())
                context = multiprocessing.get_context("fork")
                items, stop = context.Queue(), context.Event()
                worker = context.Process(target=run_worker, args=(function, pickle.dumps(args), items, stop))
                worker.start()
                self.workers.append(worker)
                try:
                    while True:
                        try:
                            kind, value = items.get(timeout=60)
                        except queue.Empty:
                            raise GradioError("GPU task aborted", title="ZeroGPU worker error") from None
                        if kind == "item":
                            yield pickle.loads(value)
                        elif kind == "error":
                            raise GradioError(value, title="ZeroGPU worker error")
                        else:
                            return
                finally:
                    stop.set()
                    worker.join(10)

            return call

        return decorate(task) if task is not None else decorate


def visitor_token() -> str | None:
    """The X-IP-Token header of gradio's current request, as `spaces` reads it (None without one)."""
    from gradio.context import LocalContext

    request = LocalContext.request.get(None)
    return None if request is None else request.headers.get("x-ip-token")


def run_worker(function, pickled_args: bytes, items, stop) -> None:
    stream = function(*pickle.loads(pickled_args))
    try:
        for item in stream:
            if stop.is_set():  # the caller closed: ZeroGPU notices at the next item
                stream.close()
                break
            items.put(("item", pickle.dumps(item)))
        else:
            items.put(("end", None))
    except Exception as exc:
        items.put(("error", type(exc).__name__))
    if stop.is_set():  # nobody reads what is left: exit without flushing it
        items.cancel_join_thread()
    else:
        items.close()
        items.join_thread()
    # Straight out, as a ZeroGPU worker ends: this process was forked from one of the caller's
    # executor threads, whose exit hooks (joining that very thread) would fail here.
    os._exit(0)
