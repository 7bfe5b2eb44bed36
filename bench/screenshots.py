"""The docs' screenshots, made from the running page, so that they cannot go stale.

    python bench/screenshots.py            # writes docs/screenshot.png and docs/screenshot-phone.png

Starts `python app.py --demo` (a temporary HOME: the tiny checkpoint is built there, nothing
else is touched), chats once in headless Chromium at desktop and at phone width, and saves the
whole page each time. Run it after a change to the page's look, and look at the pictures before
committing them.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from orca_space.tiny import write_tiny_checkpoint  # noqa: E402  (after the path above)
from tests.browser_flow import chromium  # noqa: E402
from tests.helpers import running_app  # noqa: E402
from tests.page_flow import chat_and_wait, open_page  # noqa: E402

MESSAGE = "Please tell me about how mistral winds have attracted super-orcas."
# name: (viewport, reply tokens); a shorter reply on a phone, so the picture shows more than it
SHOTS = {
    "screenshot.png": ({"width": 1280, "height": 900}, 60),
    "screenshot-phone.png": ({"width": 390, "height": 844}, 24),
}


def take_screenshots(base_url: str, out_dir: Path) -> list[Path]:
    written = []
    with chromium() as browser:
        for name, (viewport, reply_tokens) in SHOTS.items():
            context = browser.new_context(viewport=viewport, device_scale_factor=1, color_scheme="light")
            page = context.new_page()
            open_page(page, base_url)
            chat_and_wait(page, MESSAGE, max_new_tokens=reply_tokens)
            # The sidebar is fixed to the window: for a capture of the whole page, as tall as it.
            height = page.evaluate("document.documentElement.scrollHeight")
            page.add_style_tag(content=f"#conversations {{ height: {height}px !important; }}")
            page.evaluate("window.scrollTo(0, 0)")
            page.mouse.move(0, 0)
            path = out_dir / name
            page.screenshot(path=str(path), full_page=True, animations="disabled")
            written.append(path)
            context.close()
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out", type=Path, default=ROOT / "docs", help="folder for the pictures (default: docs/)"
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as home:
        # Built here, not by the app: its start is then quick enough for running_app's wait.
        write_tiny_checkpoint(Path(home) / ".cache" / "orca-space" / "tiny")
        with running_app("--demo", env={"HOME": home}) as url:
            for path in take_screenshots(url, args.out):
                print(f"wrote {path} ({path.stat().st_size:,} bytes)")


if __name__ == "__main__":
    main()
