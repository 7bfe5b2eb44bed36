"""Random-weight Mistrals bigger than the tiny one, for CPU benchmarks where prefill must cost real
time, with the real vocabulary and tokenizer.

    python bench/small_model.py OUT_DIR [small|mid|wide]    # a checkpoint `app.py --model OUT_DIR` serves

Three shapes. `mid` (hidden 512, 8 layers, head dim 64) is issue 31's model for the scheduling
benchmark (`scheduling.py`). `small` (hidden 256, 6 layers, head dim 32) is the issue's reference model. Its
attention is far heavier against the rest than the real model's: a prompt token at position L costs
about 4hL attention FLOPs per layer against 26h^2 for the matrix products (Mistral's widths, in
units of the hidden size h), a ratio of 0.154 L/h, which at L = 3,000 is 1.8 for h = 256 but 0.11
for Mistral 7B (h = 4096). `wide` (hidden 1024, 2 layers, head dim 128 as in Mistral 7B) brings it
to 0.45: still attention-heavier than the real model, but a fairer stand-in for what a long
conversation costs it, at about the same CPU time per prompt token.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from orca_space import tiny  # noqa: E402

SIZES = {
    "small": dict(
        tiny.TINY_SIZES, hidden_size=256, intermediate_size=768, num_hidden_layers=6, num_attention_heads=8,
        num_key_value_heads=2,
    ),
    "mid": dict(
        tiny.TINY_SIZES, hidden_size=512, intermediate_size=1792, num_hidden_layers=8, num_attention_heads=8,
        num_key_value_heads=2,
    ),
    "wide": dict(
        tiny.TINY_SIZES, hidden_size=1024, intermediate_size=3584, num_hidden_layers=2, num_attention_heads=8,
        num_key_value_heads=2,
    ),
}  # fmt: skip
SMALL_SIZES = SIZES["small"]


def build_small_model(seed: int = 0, size: str = "small"):
    """`tiny.build_model` at SIZES[size] (its wide logits keep greedy replies varied)."""
    original = dict(tiny.TINY_SIZES)
    tiny.TINY_SIZES.update(SIZES[size])
    try:
        return tiny.build_model(seed).eval()
    finally:
        tiny.TINY_SIZES.clear()
        tiny.TINY_SIZES.update(original)


def write_small_checkpoint(out_dir: str | Path, seed: int = 0, size: str = "small") -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    build_small_model(seed, size).save_pretrained(out)
    tiny.build_tokenizer().save_pretrained(out)
    (out / tiny.TINY_MARKER).write_text(
        f"Random-weight Mistral ({size}) for CPU benchmarks (bench/small_model.py).\n"
    )
    return out


if __name__ == "__main__":
    print(write_small_checkpoint(sys.argv[1], size=sys.argv[2] if len(sys.argv) > 2 else "small"))
