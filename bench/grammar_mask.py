"""What a grammar's token mask costs per token, on the real 32,002-token vocabulary.

Constrained decoding (tools, `response_format`) computes one token mask per step for each
constrained request, on the host, between two decode steps. This measures that cost for the two
libraries vLLM and SGLang use, xgrammar and llguidance, with the tiny checkpoint's tokenizer
(the real Mistral SentencePiece vocabulary plus the two ChatML tokens), on two grammars:

- `schema`: a tool call (`{"name": ..., "arguments": {...}}`, one of three tools, nested
  objects, arrays, enums, numbers, strings), the shape `orca_space/grammar.py` compiles;
- `free JSON`: any JSON object (`response_format: {"type": "json_object"}`).

For each it replays a valid document token by token (as the model would write it after
`<|im_start|>assistant\\n`): per token, fill the mask, check the next token is allowed, advance
the matcher. It reports the compile time, the matcher's creation, and the mask fill and
advance per token (median, 90th and 99th percentile, in microseconds), and checks
reliability: every document token allowed, `<|im_end|>` (EOS) allowed at the end only.

    python bench/grammar_mask.py [--repeats 20]

Either library may be missing; it is then skipped (the comparison needs both installed).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

VOCAB = 32002
EOS = 32000  # <|im_end|>
SEPARATORS = (", ", ": ")  # json.dumps's, as orca_space/grammar.py compiles them

TOOL_CALL_SCHEMA = {
    "anyOf": [
        {
            "type": "object",
            "properties": {
                "name": {"const": "get_weather"},
                "arguments": {
                    "type": "object",
                    "properties": {
                        "city": {"type": "string"},
                        "unit": {"enum": ["celsius", "fahrenheit"]},
                        "days": {"type": "integer", "minimum": 1, "maximum": 14},
                    },
                    "required": ["city", "unit", "days"],
                    "additionalProperties": False,
                },
            },
            "required": ["name", "arguments"],
            "additionalProperties": False,
        },
        {
            "type": "object",
            "properties": {
                "name": {"const": "search_flights"},
                "arguments": {
                    "type": "object",
                    "properties": {
                        "origin": {"type": "string"},
                        "destination": {"type": "string"},
                        "passengers": {
                            "type": "array",
                            "items": {
                                "type": "object",
                                "properties": {
                                    "name": {"type": "string"},
                                    "age": {"type": "integer"},
                                    "seat": {"enum": ["window", "aisle", "any"]},
                                },
                                "required": ["name", "age", "seat"],
                                "additionalProperties": False,
                            },
                        },
                        "max_price": {"type": "number"},
                    },
                    "required": ["origin", "destination", "passengers", "max_price"],
                    "additionalProperties": False,
                },
            },
            "required": ["name", "arguments"],
            "additionalProperties": False,
        },
        {
            "type": "object",
            "properties": {
                "name": {"const": "note"},
                "arguments": {
                    "type": "object",
                    "properties": {
                        "text": {"type": "string"},
                        "tags": {"type": "array", "items": {"type": "string"}},
                    },
                    "required": ["text", "tags"],
                    "additionalProperties": False,
                },
            },
            "required": ["name", "arguments"],
            "additionalProperties": False,
        },
    ]
}
TOOL_CALL_DOC = {
    "name": "search_flights",
    "arguments": {
        "origin": "Zürich (ZRH), Switzerland",
        "destination": 'São Paulo / Guarulhos — "GRU"',
        "passengers": [
            {"name": "Ada Lovelace", "age": 36, "seat": "window"},
            {"name": "李小龙", "age": 32, "seat": "aisle"},
        ],
        "max_price": 1234.5,
    },
}
FREE_SCHEMA = {"type": "object"}
FREE_DOC = {
    "title": "A longer free-form reply, as json_object mode gets it",
    "items": [{"id": i, "ok": i % 2 == 0, "score": i * 1.25, "label": f"item number {i}"} for i in range(8)],
    "notes": 'Plain prose inside a string: commas, quotes ("like these"), and emoji 🙂 too.',
    "nested": {"a": {"b": {"c": [None, True, False, -1, 2.5e-3]}}},
}


def load_tokenizer():
    from orca_space.loading import load_tokenizer as load
    from orca_space.tiny import write_tiny_checkpoint

    directory = write_tiny_checkpoint(Path(tempfile.mkdtemp(prefix="grammar-bench-")))
    return load(directory)


def document_ids(tokenizer, doc: dict) -> list[int]:
    """The document as the model writes it after the reply header (no leading `▁`)."""
    from orca_space.chatml import PlainTextEncoder

    return PlainTextEncoder(tokenizer)(json.dumps(doc, ensure_ascii=False, separators=SEPARATORS))


class Library:
    """One library's compile, new matcher, fill mask, advance, is-allowed."""

    name: str

    def compile(self, schema: dict): ...
    def matcher(self, compiled): ...
    def fill(self, matcher) -> None: ...
    def allowed(self, token: int) -> bool: ...
    def advance(self, matcher, token: int) -> bool: ...


class XGrammar(Library):
    name = "xgrammar"

    def __init__(self, tokenizer) -> None:
        import xgrammar as xgr

        self.xgr = xgr
        self.info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=VOCAB, stop_token_ids=[EOS])
        self.bitmask = xgr.allocate_token_bitmask(1, VOCAB)
        self.version = xgr.__version__ if hasattr(xgr, "__version__") else _version("xgrammar")

    def compile(self, schema: dict):
        compiler = self.xgr.GrammarCompiler(self.info, cache_enabled=False)
        return compiler.compile_json_schema(json.dumps(schema), any_whitespace=False, separators=SEPARATORS)

    def matcher(self, compiled):
        return self.xgr.GrammarMatcher(compiled)

    def fill(self, matcher) -> None:
        matcher.fill_next_token_bitmask(self.bitmask, 0)

    def allowed(self, token: int) -> bool:
        return bool((int(self.bitmask[0, token // 32]) >> (token % 32)) & 1)

    def advance(self, matcher, token: int) -> bool:
        return matcher.accept_token(token)


class LLGuidance(Library):
    name = "llguidance"

    def __init__(self, tokenizer) -> None:
        import llguidance
        import llguidance.hf
        import llguidance.torch

        self.ll = llguidance
        self.tokenizer = llguidance.hf.from_tokenizer(tokenizer, n_vocab=VOCAB, eos_token=EOS)
        self.bitmask = llguidance.torch.allocate_token_bitmask(1, VOCAB)
        self.version = _version("llguidance")

    def compile(self, schema: dict):
        options = {
            "whitespace_flexible": False,
            "item_separator": SEPARATORS[0],
            "key_separator": SEPARATORS[1],
        }
        grammar = self.ll.LLMatcher.grammar_from_json_schema(schema, defaults=options)
        error = self.ll.LLMatcher.validate_grammar(grammar, self.tokenizer)
        assert not error, error
        return grammar

    def matcher(self, compiled):
        matcher = self.ll.LLMatcher(self.tokenizer, compiled)
        assert not matcher.is_error(), matcher.get_error()
        return matcher

    def fill(self, matcher) -> None:
        import llguidance.torch

        llguidance.torch.fill_next_token_bitmask(matcher, self.bitmask, 0)

    def allowed(self, token: int) -> bool:
        return bool((int(self.bitmask[0, token // 32]) >> (token % 32)) & 1)

    def advance(self, matcher, token: int) -> bool:
        return matcher.consume_token(token)


def _version(package: str) -> str:
    from importlib.metadata import version

    return version(package)


def timed(fn: Callable[[], object]) -> tuple[float, object]:
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def measure(library: Library, schema: dict, ids: list[int], repeats: int) -> dict:
    compile_s, compiled = timed(lambda: library.compile(schema))
    fills, advances, news, problems = [], [], [], []
    for _ in range(repeats):
        new_s, matcher = timed(lambda: library.matcher(compiled))
        news.append(new_s)
        for index, token in enumerate(ids):
            fill_s, _ = timed(lambda: library.fill(matcher))
            fills.append(fill_s)
            if not library.allowed(token):
                problems.append(f"token {index} ({token}) not allowed")
            if library.allowed(EOS):
                problems.append(f"EOS allowed before the document ends (token {index})")
            advance_s, ok = timed(lambda: library.advance(matcher, token))
            advances.append(advance_s)
            if not ok:
                problems.append(f"token {index} ({token}) refused by the matcher")
                break
        library.fill(matcher)
        if not library.allowed(EOS):
            problems.append("EOS not allowed at the document's end")
    return {
        "compile_ms": compile_s * 1e3,
        "new_matcher_us": statistics.median(news) * 1e6,
        "mask_us": percentiles(fills),
        "advance_us": percentiles(advances),
        "tokens": len(ids),
        "problems": sorted(set(problems))[:5],
    }


def percentiles(seconds: list[float]) -> dict[str, float]:
    ordered = sorted(seconds)
    at = lambda q: ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1e6  # noqa: E731
    return {"median": at(0.5), "p90": at(0.9), "p99": at(0.99), "mean": statistics.fmean(ordered) * 1e6}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20, help="documents replayed per grammar")
    args = parser.parse_args()
    tokenizer = load_tokenizer()
    cases = {
        "schema (tool call)": (TOOL_CALL_SCHEMA, document_ids(tokenizer, TOOL_CALL_DOC)),
        "free JSON object": (FREE_SCHEMA, document_ids(tokenizer, FREE_DOC)),
    }
    libraries: list[Library] = []
    for kind in (XGrammar, LLGuidance):
        try:
            setup_s, library = timed(lambda kind=kind: kind(tokenizer))
        except ImportError as exc:
            print(f"{kind.name}: not installed ({exc}); skipped")
            continue
        print(f"{library.name} {library.version}: tokenizer set up in {setup_s * 1e3:.0f} ms")
        libraries.append(library)
    results = {}
    print(f"\nper token, in microseconds, {args.repeats} replays of each document; vocabulary {VOCAB:,}")
    header = f"{'library':<11} {'grammar':<19} {'tokens':>6} {'compile ms':>10} {'new us':>7}"
    print(header + f" {'mask med':>8} {'p90':>7} {'p99':>7} {'advance med':>11}  problems")
    for name, (schema, ids) in cases.items():
        for library in libraries:
            result = measure(library, schema, ids, args.repeats)
            results[f"{library.name}/{name}"] = result
            mask, advance = result["mask_us"], result["advance_us"]
            print(
                f"{library.name:<11} {name:<19} {result['tokens']:>6} {result['compile_ms']:>10.1f} "
                f"{result['new_matcher_us']:>7.0f} {mask['median']:>8.1f} {mask['p90']:>7.1f} "
                f"{mask['p99']:>7.1f} {advance['median']:>11.1f}  {'; '.join(result['problems']) or 'none'}"
            )
    print("\n" + json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
