"""`python app.py`, except that loading the model waits until a file exists.

For the browser test of a message sent while the model loads: the test decides when loading
ends (`ORCA_TEST_RELEASE_FILE`), instead of racing a load that takes a second.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import app  # noqa: E402  (after the path is set)
from orca_space import startup  # noqa: E402

RELEASE = Path(os.environ["ORCA_TEST_RELEASE_FILE"])
load_model = startup.load_model


def load_model_when_released(*args, **kwargs):
    while not RELEASE.exists():
        time.sleep(0.05)
    return load_model(*args, **kwargs)


if __name__ == "__main__":
    startup.load_model = load_model_when_released
    app.main(sys.argv[1:])
