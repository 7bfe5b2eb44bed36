"""End to end in a real browser: `python app.py --demo` on loopback, driven by headless Chromium.

The flow itself lives in `tests/browser_flow.py` so it can run against other deployments too.
Set ORCA_UPDATE_SCREENSHOT=1 to copy the final screenshot to docs/screenshot.png for the README.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from orca_space.startup import DEMO_DIR
from tests.browser_flow import chat_in_browser, chromium_page, require_chromium
from tests.helpers import ROOT, running_app

README_SCREENSHOT = ROOT / "docs" / "screenshot.png"

pytestmark = pytest.mark.browser


@pytest.fixture(scope="module", autouse=True)
def chromium_installed():
    """Checked before the app starts, so a missing browser fails at once."""
    require_chromium()


@pytest.fixture(scope="module")
def demo_url(tiny_dir, tmp_path_factory):
    """The app as users run the offline preview (`--demo`), so the page (and the README screenshot)
    names the demo model instead of a temporary path. HOME points at a folder whose demo cache is
    the session's tiny checkpoint, so nothing is built twice and the real home is left alone."""
    home = tmp_path_factory.mktemp("home")
    demo_dir = home / DEMO_DIR.relative_to(Path.home())
    demo_dir.parent.mkdir(parents=True)
    demo_dir.symlink_to(tiny_dir, target_is_directory=True)
    log = home / "app.log"
    with running_app("--demo", env={"HOME": str(home)}, log_path=log) as url:
        yield url


@pytest.fixture()
def page():
    with chromium_page() as page:
        yield page


def test_stream_stop_and_chat_again_in_browser(demo_url, page, tmp_path):
    screenshot = tmp_path / "artifacts" / "chat.png"
    seen = chat_in_browser(page, demo_url, screenshot_path=screenshot)

    assert page.locator("#demo-banner").is_visible(), "the demo banner is missing for the random-weight model"
    assert seen.second_reply != seen.stopped_reply, "the second turn showed the first reply again"
    assert screenshot.stat().st_size > 10_000, "the screenshot is (nearly) empty"
    if os.environ.get("ORCA_UPDATE_SCREENSHOT") == "1":
        README_SCREENSHOT.parent.mkdir(exist_ok=True)
        shutil.copyfile(screenshot, README_SCREENSHOT)


def test_an_error_gives_the_textbox_back(tiny_dir):
    """A gr.Error (here: a message over the length limit) must not lock the chat."""
    from playwright.sync_api import expect

    from tests.browser_flow import BOT_MESSAGES, CHAT_TEXTBOX, SUBMIT_BUTTON, USER_MESSAGES, send

    too_long = "This message is longer than twenty characters."
    with running_app("--model", str(tiny_dir), "--max-message-chars", "20") as url, chromium_page() as page:
        page.set_default_timeout(30_000)
        page.goto(url)
        box = page.locator(CHAT_TEXTBOX)
        send(box, too_long)
        expect(page.get_by_text("the limit is 20").first).to_be_visible()
        expect(box, "the textbox must be usable again after an error").to_be_enabled(timeout=5000)
        expect(page.locator(SUBMIT_BUTTON), "the stop button must give way to submit").to_be_visible()
        expect(page.locator(USER_MESSAGES).first).to_have_text(too_long)
        send(box, "Short one.")
        expect(page.locator(BOT_MESSAGES).first, "the next message gets a reply").to_be_visible()
        expect(box).to_be_enabled(timeout=30_000)
        assert page.locator(USER_MESSAGES).count() == 2
