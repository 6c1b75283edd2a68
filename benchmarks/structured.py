"""Grammar-constrained decoding cost on the built-in model (issue #19).

1. Decode tok/s of the same model, same prompt, greedy, with and without the grammar (a JSON
   schema via response_format, and a required tool call), best of R runs each. Target: the
   constrained decode at >= 0.85x the unconstrained one. The unconstrained run decodes as many
   tokens as the constrained one produced (max_tokens set to that count), so both average over
   the same number of steps.
2. Mask cost per token: llguidance's bitmask for each step of a 50-token JSON document of a
   nested schema, then the token consumed (`GrammarProcessor.mask` includes turning the bitmask
   into -inf on the logits); mean / p50 / max.
3. If xgrammar and outlines-core are importable (install them into a scratch dir with
   `pip install --target /tmp/cand xgrammar==0.2.8 apache-tvm-ffi outlines-core==0.2.14` and run
   with PYTHONPATH=/tmp/cand), the same document's mask cost and the JSON-Schema feature
   coverage of all three: the comparison behind the choice of llguidance (docs/engine.md).

llama.cpp's grammar decode (the anchor the issue names) is not measured here: llama-cpp-python is
not in this environment (see benchmarks/engine_dense.py for its hour-long build).

Run:  OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/structured.py [--reps 3]
      | tee benchmarks/results/structured.txt
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from local_engine import grammar
from local_engine.engine import Engine

SCHEMA: dict[str, Any] = {"type": "object", "properties": {
    "name": {"type": "string"}, "age": {"type": "integer", "minimum": 0, "maximum": 150},
    "tags": {"type": "array", "items": {"type": "string", "enum": ["a", "bb", "ccc"]}},
    "address": {"type": "object", "properties": {"city": {"type": "string"}, "zip": {"type": "string"}},
                "required": ["city"], "additionalProperties": False},
    "score": {"type": "number"}}, "required": ["name", "age", "tags", "address"], "additionalProperties": False}
DOC = json.dumps({"name": "Ada Lovelace of London", "age": 36, "tags": ["a", "ccc", "bb"],
                  "address": {"city": "London", "zip": "W1 2AB"}, "score": 3.25})
RECIPE = {"type": "object", "properties": {
    "title": {"type": "string"}, "servings": {"type": "integer", "minimum": 1, "maximum": 12},
    "steps": {"type": "array", "items": {"type": "string"}, "minItems": 3, "maxItems": 5}},
    "required": ["title", "servings", "steps"], "additionalProperties": False}
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}, "unit": {"type": "string", "enum": ["c", "f"]}},
    "required": ["city"]}}}
FEATURES: dict[str, dict[str, Any]] = {
    "enum": {"type": "string", "enum": ["x", "y"]}, "const": {"const": 3},
    "anyOf": {"anyOf": [{"type": "string"}, {"type": "integer"}]},
    "oneOf": {"oneOf": [{"type": "string"}, {"type": "integer"}]},
    "allOf": {"allOf": [{"type": "object", "properties": {"a": {"type": "integer"}}}, {"required": ["a"]}]},
    "pattern": {"type": "string", "pattern": "^[a-z]{2,4}$"},
    "format:date-time": {"type": "string", "format": "date-time"},
    "minLength/maxLength": {"type": "string", "minLength": 2, "maxLength": 5},
    "minimum/maximum": {"type": "integer", "minimum": 1, "maximum": 10},
    "exclusiveMinimum": {"type": "number", "exclusiveMinimum": 0},
    "multipleOf": {"type": "integer", "multipleOf": 5},
    "minItems/maxItems": {"type": "array", "items": {"type": "integer"}, "minItems": 1, "maxItems": 3},
    "uniqueItems": {"type": "array", "items": {"type": "integer"}, "uniqueItems": True},
    "prefixItems": {"type": "array", "prefixItems": [{"type": "integer"}, {"type": "string"}]},
    "$ref": {"$defs": {"p": {"type": "integer"}}, "type": "object", "properties": {"a": {"$ref": "#/$defs/p"}}},
    "$ref recursive": {"$defs": {"n": {"type": "object", "properties": {
        "kids": {"type": "array", "items": {"$ref": "#/$defs/n"}}}}}, "$ref": "#/$defs/n"},
    "additionalProperties schema": {"type": "object", "additionalProperties": {"type": "integer"}},
    "patternProperties": {"type": "object", "patternProperties": {"^x": {"type": "integer"}}},
    "not": {"not": {"type": "string"}},
    "if/then": {"type": "object", "if": {"properties": {"a": {"const": 1}}}, "then": {"required": ["b"]}},
    "minProperties": {"type": "object", "minProperties": 1},
    "type list": {"type": ["string", "null"]},
}


def _dist(ts: list[float]) -> str:
    ts = sorted(ts)
    return f"mean {statistics.mean(ts) * 1e6:6.0f} us  p50 {ts[len(ts) // 2] * 1e6:5.0f} us  max {ts[-1] * 1e6:6.0f} us"


def decode_speed(eng: Engine, reps: int) -> None:
    print("\n1. decode tok/s, greedy, 1 thread, best of", reps, "(free and constrained runs interleaved)")
    print(f"{'answer':24} | {'tokens':>6} | {'free tok/s':>10} | {'grammar tok/s':>13} | ratio | mask in decode")
    cases = [("json_schema (recipe)", [{"role": "user", "content": "A pancake recipe."}],
              {"response_format": {"type": "json_schema", "json_schema": {"name": "r", "schema": RECIPE}}}),
             ("tool call (required)", [{"role": "user", "content": "Weather in Paris?"}],
              {"tools": [WEATHER], "tool_choice": "required"})]
    for name, msgs, fmt in cases:
        best_g = best_f = 0.0
        n = 0
        mask_us = []
        for _ in range(reps):
            g = eng.chat(msgs, max_tokens=200, temperature=0, **fmt)
            "".join(g)
            n = g.stats.completion_tokens
            best_g = max(best_g, g.stats.decode_tok_s)
            mask_us.append(g.stats.extra["grammar_mask_s"] / n * 1e6)
            # the same prompt (tools rendered the same way), no grammar, the same number of tokens
            text = eng.render_chat(*_prompt(msgs, fmt))
            f = eng.generate(text, max_tokens=n, temperature=0)
            "".join(f)
            best_f = max(best_f, f.stats.decode_tok_s)
        print(f"{name:24} | {n:6d} | {best_f:10.1f} | {best_g:13.1f} | {best_g / best_f:5.2f} | "
              f"{min(mask_us):.0f} us/token (best run)")


def _prompt(msgs: list[dict[str, Any]], fmt: dict[str, Any]) -> tuple[list[dict[str, Any]], Any]:
    from local_engine import tools

    spec = tools.parse_spec(fmt.get("tools"), fmt.get("tool_choice"))
    return tools.prompt_messages(msgs, spec, template_has_tools=False)


def mask_cost(eng: Engine) -> None:
    tok = eng.tokenizer
    ids = tok.encode(DOC)  # json.dumps' ", " and ": ": the style the grammar writes
    t0 = time.perf_counter()
    lt = grammar.grammar_tokenizer(tok)
    setup = time.perf_counter() - t0
    t0 = time.perf_counter()
    proc = grammar.GrammarProcessor(grammar.Grammar.json_schema(SCHEMA), lt)
    compile_s = time.perf_counter() - t0
    logits = torch.zeros(tok.vocab_size)
    bitmask, full = [], []
    for i in [*ids, min(tok.stop_ids)]:
        t0 = time.perf_counter()
        proc.matcher.unsafe_compute_mask_ptr(proc._bits.ctypes.data, proc._bits.nbytes)
        bitmask.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        masked = proc.mask(logits)
        full.append(time.perf_counter() - t0)
        assert torch.isfinite(masked[i]), f"the grammar refused token {i} of the document"
        if i not in tok.stop_ids:
            proc.advance(i)
    print(f"2. llguidance mask per token ({len(ids)}-token JSON document, vocab {tok.vocab_size})")
    print(f"tokenizer setup {setup:.2f} s (once per model), schema compile {compile_s * 1e3:.1f} ms")
    print(f"bitmask only          {_dist(bitmask)}")
    print(f"mask() on the logits  {_dist(full)}")


def compare(eng: Engine) -> None:
    print("\n3. candidates (same document, compact separators; features compiled one by one)")
    tok = eng.tokenizer
    doc = json.dumps(json.loads(DOC), separators=(",", ":"))
    ids = tok.encode(doc)
    eos = min(tok.stop_ids)
    from llguidance import LLMatcher

    lt = grammar.grammar_tokenizer(tok)
    proc = grammar.GrammarProcessor(grammar.Grammar(LLMatcher.grammar_from_json_schema(
        SCHEMA, defaults={"whitespace_flexible": False})), lt)
    ts = []
    for i in [*ids, eos]:
        t0 = time.perf_counter()
        proc.matcher.unsafe_compute_mask_ptr(proc._bits.ctypes.data, proc._bits.nbytes)
        ts.append(time.perf_counter() - t0)
        if i != eos:
            proc.advance(i)
    bad = [k for k, s in FEATURES.items() if LLMatcher(lt, LLMatcher.grammar_from_json_schema(s), log_level=0).is_error()]
    print(f"llguidance     {_dist(ts)}  features {len(FEATURES) - len(bad)}/{len(FEATURES)}  refused: {bad}")
    try:
        import transformers
        import xgrammar as xgr

        info = xgr.TokenizerInfo.from_huggingface(transformers.PreTrainedTokenizerFast(tokenizer_object=tok.tok),
                                                  vocab_size=tok.vocab_size, stop_token_ids=[eos])
        comp = xgr.GrammarCompiler(info)
        xm = xgr.GrammarMatcher(comp.compile_json_schema(json.dumps(SCHEMA), any_whitespace=False,
                                                         separators=(",", ":")))
        bm = xgr.allocate_token_bitmask(1, tok.vocab_size)
        ts = []
        for i in [*ids, eos]:
            t0 = time.perf_counter()
            xm.fill_next_token_bitmask(bm)
            ts.append(time.perf_counter() - t0)
            xm.accept_token(i)
        bad = []
        for k, s in FEATURES.items():
            try:
                comp.compile_json_schema(json.dumps(s))
            except Exception:
                bad.append(k)
        nm = xgr.GrammarMatcher(comp.compile_json_schema(json.dumps(FEATURES["not"]), any_whitespace=False))
        ignored = all(nm.accept_token(i) for i in tok.encode('"x"'))
        print(f"xgrammar       {_dist(ts)}  features {len(FEATURES) - len(bad)}/{len(FEATURES)}  refused: {bad}"
              f"{'  (not: compiled but ignored)' if ignored else ''}")
    except ImportError:
        print("xgrammar       not importable (see the docstring)")
    try:
        from outlines_core import Guide, Index, Vocabulary, json_schema

        from local_engine.tokenizer import _bytes_to_unicode

        inv = {c: b for b, c in _bytes_to_unicode().items()}
        vocab: dict[bytes, list[int]] = {}
        for i in range(tok.vocab_size):
            s = tok.token_str(i)
            if i in tok.stop_ids or not s or tok.decode([i]) == "":
                continue
            try:
                vocab.setdefault(bytes(inv[c] for c in s), []).append(i)
            except KeyError:
                continue
        voc = Vocabulary(eos, vocab)
        guide = Guide(Index(json_schema.build_regex_from_schema(json.dumps(SCHEMA), r""), voc))
        ts = []
        for i in [*ids, eos]:
            t0 = time.perf_counter()
            guide.get_tokens()
            ts.append(time.perf_counter() - t0)
            if i != eos:
                guide.advance(i)
        bad = []
        for k, s in FEATURES.items():
            try:
                Index(json_schema.build_regex_from_schema(json.dumps(s)), voc)
            except Exception:
                bad.append(k)
        print(f"outlines-core  {_dist(ts)}  features {len(FEATURES) - len(bad)}/{len(FEATURES)}  refused: {bad}")
    except ImportError:
        print("outlines-core  not importable (see the docstring)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    eng = Engine.open("builtin:smollm2-135m", threads=1)
    print(f"# {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, load avg {os.getloadavg()[0]:.2f}, "
          f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', '-')}")
    mask_cost(eng)
    decode_speed(eng, args.reps)
    compare(eng)


if __name__ == "__main__":
    main()
