"""The tiny checkpoint is the real architecture, tokenizer, template and EOS, loaded the real way."""

from __future__ import annotations

import json
import subprocess
import sys

from transformers import MistralForCausalLM

from orca_space.tiny import CHAT_TEMPLATE, is_tiny_checkpoint


def test_cli_writes_a_loadable_checkpoint(tmp_path):
    out = tmp_path / "tiny"
    done = subprocess.run([sys.executable, "-m", "orca_space.tiny", str(out)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert is_tiny_checkpoint(out)
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["MistralForCausalLM"] and config["vocab_size"] == 32002
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == 32000


def test_real_class_vocabulary_and_control_tokens(tiny_model, tokenizer):
    assert isinstance(tiny_model, MistralForCausalLM)
    assert tiny_model.config.vocab_size == len(tokenizer) == 32002
    assert tokenizer.convert_tokens_to_ids(["<|im_end|>", "<|im_start|>"]) == [32000, 32001]
    assert tokenizer.eos_token_id == 32000 and tokenizer.bos_token_id == 1
    assert tokenizer.chat_template == CHAT_TEMPLATE
    assert tiny_model.generation_config.eos_token_id == 32000


def test_tokenizer_is_mistral_sentencepiece(tokenizer):
    # Known ids of the Mistral 7B v0.1 vocabulary: "▁Hello" is 22557, "<0x0A>" (newline) is 13.
    assert tokenizer.convert_tokens_to_ids(["▁Hello", "<0x0A>", "<s>", "</s>"]) == [22557, 13, 1, 2]
