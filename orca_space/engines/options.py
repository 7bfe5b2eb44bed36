"""What can be chosen about the local engines, as plain constants.

`settings.py` reads these while parsing the command line, before anything decides to load a
model, so this module imports nothing: the engines themselves (and torch) load only on the path
that needs them.
"""

from __future__ import annotations

# The ladder's rungs, fastest first (see `ladder.py`); `auto` tries `compiled` only where the
# device check found the compiled step fastest (engines/step_defaults.json).
RUNGS = ("compiled", "graphs", "eager", "reference")
ENGINE_CHOICES = ("auto", *RUNGS)
DEFAULT_WARMUP_TIMEOUT_S = 300.0  # the 7B model captures its graphs in seconds; compiling takes a minute
PREFIX_CACHE_MODES = ("private", "shared", "off")  # see `prefix_cache.py`; `off` keeps nothing
