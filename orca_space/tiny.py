"""Build the tiny Mistral-7B-OpenOrca stand-in used by the tests and by `--demo`.

Everything but the sizes is real: the `MistralForCausalLM` class, the Mistral 7B v0.1
SentencePiece tokenizer (shipped offline inside `mistral-common`), the two ChatML control
tokens at their real ids, the official chat template and a generation config whose EOS is
`<|im_end|>`. It is written with `save_pretrained`, so it loads through the same
`from_pretrained` path as the real checkpoint. The weights are random: it talks gibberish.

    python -m orca_space.tiny OUT_DIR
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
from pathlib import Path

MODEL_ID = "Open-Orca/Mistral-7B-OpenOrca"
VOCAB_SIZE = 32002
IM_END, IM_START = "<|im_end|>", "<|im_start|>"
IM_END_ID, IM_START_ID = 32000, 32001
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# The marker file tells the app that a directory holds random weights, so the UI can say so.
TINY_MARKER = "orca_space_tiny.txt"

# Small enough to build in a second and decode hundreds of tokens/s on two CPU cores, but with
# grouped-query attention (4 heads over 2 KV heads) and a sliding window like the real model.
TINY_SIZES = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=8192,
    sliding_window=4096,
)


def sentencepiece_model_path() -> Path:
    """The Mistral 7B v0.1 SentencePiece model that `mistral-common` ships."""
    import mistral_common

    return Path(mistral_common.__file__).parent / "data" / "tokenizer.model.v1"


def build_tokenizer():
    """The Mistral SentencePiece tokenizer plus the ChatML control tokens at 32000 and 32001."""
    from tokenizers import AddedToken
    from transformers import LlamaTokenizer

    with tempfile.TemporaryDirectory() as spm_dir:
        shutil.copy(sentencepiece_model_path(), os.path.join(spm_dir, "tokenizer.model"))
        # Converting SentencePiece to a `tokenizers` pipeline needs protobuf.
        tokenizer = LlamaTokenizer.from_pretrained(spm_dir, add_bos_token=True, add_eos_token=False)
    controls = [AddedToken(t, special=True, normalized=False) for t in (IM_END, IM_START)]
    tokenizer.add_special_tokens({"additional_special_tokens": controls})
    tokenizer.eos_token = IM_END
    tokenizer.chat_template = CHAT_TEMPLATE
    assert tokenizer.convert_tokens_to_ids([IM_END, IM_START]) == [IM_END_ID, IM_START_ID]
    assert len(tokenizer) == VOCAB_SIZE
    return tokenizer


def build_model(seed: int = 0):
    """`MistralForCausalLM` with tiny sizes and random weights over the real vocabulary."""
    import torch
    from transformers import GenerationConfig, MistralConfig, MistralForCausalLM

    config = MistralConfig(
        vocab_size=VOCAB_SIZE,
        bos_token_id=1,
        eos_token_id=IM_END_ID,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        **TINY_SIZES,
    )
    torch.manual_seed(seed)
    model = MistralForCausalLM(config)
    # Wide logits make sampled text vary, so streaming tests see many different tokens.
    with torch.no_grad():
        model.lm_head.weight.normal_(0.0, 0.5)
    model.generation_config = GenerationConfig(bos_token_id=1, eos_token_id=IM_END_ID, pad_token_id=IM_END_ID)
    return model


def write_tiny_checkpoint(out_dir: str | Path, seed: int = 0) -> Path:
    """Write model, tokenizer, chat template and generation config to `out_dir`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    build_model(seed).save_pretrained(out)
    build_tokenizer().save_pretrained(out)
    (out / TINY_MARKER).write_text(
        f"Tiny random-weight stand-in for {MODEL_ID}, written by orca_space.tiny.\n"
    )
    return out


def is_tiny_checkpoint(path: str | Path) -> bool:
    return (Path(path) / TINY_MARKER).is_file()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", help="directory to write the checkpoint to")
    parser.add_argument("--seed", type=int, default=0, help="seed for the random weights")
    args = parser.parse_args(argv)
    out = write_tiny_checkpoint(args.out_dir, args.seed)
    print(f"wrote tiny checkpoint to {out}")


if __name__ == "__main__":
    main()
