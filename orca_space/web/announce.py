"""What the console says as the app starts, in place of gradio's own lines.

gradio printed "Running on local URL" seconds before the model could answer (on a GPU, minutes),
then "To create a public link, set `share=True` in `launch()`" (the app's switch is `--share`).
Instead: the page's address as the server starts, and one line when the model is ready (or
failed), said again with the address, so the last line of the console says whether to open it.
"""

from __future__ import annotations

import logging

from ..loading import LoadStatus
from ..runtime import ChatRuntime
from ..settings import Settings

log = logging.getLogger(__name__)
EVERY_ADDRESS = ("0.0.0.0", "::")


def page_url(settings: Settings) -> str:
    """Where to open the page on this machine: a server on every address is reached on loopback."""
    host = "127.0.0.1" if settings.host in EVERY_ADDRESS else settings.host
    host = f"[{host}]" if ":" in host else host
    return f"http://{host}:{settings.port}"


def announce_start(runtime: ChatRuntime, settings: Settings) -> None:
    """Say where the page is now, and (from the loading thread, as it finishes) when the model is
    ready there."""
    url = page_url(settings)
    if not runtime.status.ready:
        log.info("The page is at %s; the model is still loading (the page shows how far).", url)
    runtime.status.when_settled(lambda status: announce_settled(status, url))


def announce_settled(status: LoadStatus, url: str) -> None:
    if status.ready:
        log.info("Ready to chat: open %s", url)
    else:
        log.error("The model could not be loaded; %s says why, and so does the line above.", url)
