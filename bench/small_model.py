"""A random-weight Mistral bigger than the tiny one, for CPU benchmarks where prefill must cost real
time: hidden 256, 6 layers, grouped-query attention, the real vocabulary and tokenizer.

    python bench/small_model.py OUT_DIR    # a checkpoint `app.py --model OUT_DIR` serves
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from orca_space import tiny  # noqa: E402

SMALL_SIZES = dict(
    tiny.TINY_SIZES, hidden_size=256, intermediate_size=768, num_hidden_layers=6, num_attention_heads=8,
    num_key_value_heads=2,
)  # fmt: skip


def build_small_model(seed: int = 0):
    """`tiny.build_model` at SMALL_SIZES (its wide logits keep greedy replies varied)."""
    original = dict(tiny.TINY_SIZES)
    tiny.TINY_SIZES.update(SMALL_SIZES)
    try:
        return tiny.build_model(seed).eval()
    finally:
        tiny.TINY_SIZES.clear()
        tiny.TINY_SIZES.update(original)


def write_small_checkpoint(out_dir: str | Path, seed: int = 0) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    build_small_model(seed).save_pretrained(out)
    tiny.build_tokenizer().save_pretrained(out)
    (out / tiny.TINY_MARKER).write_text(
        "Small random-weight Mistral for CPU benchmarks (bench/small_model.py).\n"
    )
    return out


if __name__ == "__main__":
    print(write_small_checkpoint(sys.argv[1]))
