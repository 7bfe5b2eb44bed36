"""Counting the aten ops one call runs: on CUDA each is (at least) one kernel launch, so the count
per decode step is what fusing parts of the step is meant to bring down, measured on any device.

    python bench/op_count.py            # the tiny checkpoint's decode step, per variant, on the CPU
"""

from __future__ import annotations

import collections
from collections.abc import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode

# Ops that only describe a tensor (no kernel on any device).
METADATA_OPS = {
    "aten.view", "aten._unsafe_view", "aten.t", "aten.transpose", "aten.unsqueeze", "aten.squeeze",
    "aten.expand", "aten.slice", "aten.select", "aten.narrow", "aten.unflatten", "aten.alias",
    "aten.permute", "aten.split", "aten.split_with_sizes", "aten.chunk", "aten.as_strided",
    "aten.detach", "aten._reshape_alias", "aten.unbind", "aten.lift_fresh",
}  # fmt: skip


class OpCounter(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))


def count_aten_ops(call: Callable[[], object]) -> tuple[int, collections.Counter[str]]:
    """(ops that run a kernel, every op by name) for one `call()`."""
    with OpCounter() as counter:
        call()
    kernels = sum(n for name, n in counter.ops.items() if name not in METADATA_OPS)
    return kernels, counter.ops


def mistral_shaped_model(dtype=torch.float16):
    """Mistral-7B's structure (32 layers, 32 query heads over 8 key/value heads, its vocabulary)
    at tiny widths: the same ops per step as the 7B, built in a second on the CPU."""
    from transformers import MistralConfig, MistralForCausalLM

    config = MistralConfig(
        vocab_size=32002, hidden_size=512, intermediate_size=1024, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, sliding_window=4096, tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(0)
    return MistralForCausalLM(config).to(dtype).eval()


def main() -> None:
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from orca_space.engines import decode_step, hf_weights, kv_cache
    from orca_space.engines.step_options import BASELINE, FUSED, StepOptions

    weights = hf_weights.weights_from_hf(mistral_shaped_model())
    variants = {
        "today": BASELINE,
        "fused norm+rope": FUSED,
        "+ additive mask": StepOptions(mask="additive", norm="fused", rope="fused"),
        "+ split-KV": StepOptions(mask="additive", norm="fused", rope="fused", split_kv_up_to=64),
    }
    batch, kv_len = 4, 256
    with torch.inference_mode():
        cache = kv_cache.allocate_kv_cache(weights.shape, batch, kv_len, weights.dtype, "cpu")
        buffers = decode_step.DecodeBuffers.allocate(batch, weights.shape.vocab, "cpu", weights.dtype)
        buffers.positions.copy_(torch.arange(batch) * 50)
        print(
            f"aten ops per decode step, fp16, {weights.shape.layers} layers, batch {batch} (sampling included):"
        )
        for name, options in variants.items():
            kernels, ops = count_aten_ops(
                lambda: decode_step.decode_and_sample(weights, cache, buffers, batch, kv_len, options=options)
            )
            print(f"  {name:18s} {kernels:5d} ops that run a kernel  ({sum(ops.values())} with views)")


if __name__ == "__main__":
    main()
