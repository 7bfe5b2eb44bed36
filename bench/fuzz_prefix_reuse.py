"""The shared differential fuzz with kept caches in play: `../shared/tools/engine_fuzz.py` (run it
from the project's root), every request scoped to a visitor (most to one, some to another), some
engines in `shared` mode, half of them padding decode batches as CUDA graphs do, so that kept
caches are reused, moved, evicted and ride along in padded steps. Without a scope the engine keeps
nothing, and the fuzz's next turns, retries and edits would reuse nothing.

    python bench/fuzz_prefix_reuse.py --seconds 600 --seed 3

Prints the fuzz's own summary, then the prompt tokens reused over every engine it built.
"""

from __future__ import annotations

import os
import random
import sys

sys.path.insert(0, os.getcwd())
sys.path.insert(0, os.path.join(os.getcwd(), "..", "shared", "tools"))
import engine_fuzz  # noqa: E402

from orca_space.engines.batched import BatchedEngine  # noqa: E402

pick = random.Random(int(sys.argv[sys.argv.index("--seed") + 1]) if "--seed" in sys.argv else 0)
real_submit, real_init, real_close = BatchedEngine.submit, BatchedEngine.__init__, BatchedEngine.close
totals = {"reused": 0, "prefilled": 0, "engines_reusing": 0, "engines": 0}


def submit(self, prompt_ids, params, record_logits=False, cache_scope=None):
    scope = cache_scope or ("alice" if pick.random() < 0.8 else "bob")
    return real_submit(self, prompt_ids, params, record_logits, scope)


def init(self, *args, **kwargs):
    kwargs.setdefault("prefix_cache", pick.choice(["private", "private", "shared"]))
    real_init(self, *args, **kwargs)
    self.pad_batches = pick.random() < 0.5


def close(self, timeout=10.0):
    stats = self.stats()
    totals["reused"] += stats.prompt_tokens_reused
    totals["prefilled"] += stats.prompt_tokens_prefilled
    totals["engines_reusing"] += stats.prompt_tokens_reused > 0
    totals["engines"] += 1
    real_close(self, timeout)


if __name__ == "__main__":
    BatchedEngine.submit, BatchedEngine.__init__, BatchedEngine.close = submit, init, close
    code = engine_fuzz.main()
    print("prompt tokens over every engine:", totals, flush=True)
    sys.exit(code)
