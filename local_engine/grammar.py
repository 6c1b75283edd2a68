"""Grammar-constrained decoding: a per-sequence token mask from llguidance.

    g = Grammar.json_schema({"type": "object", ...})      # or Grammar.lark(src, ...)
    g.check()                                               # GrammarError naming what cannot compile
    proc = GrammarProcessor(g, grammar_tokenizer(tok))      # one per generated sequence
    proc.prime(ids_already_written)                         # continue_final_message: the text so far
    logits = proc.mask(logits)                              # before sampling: disallowed -> -inf
    proc.advance(token)                                     # after sampling

The mask goes on the raw logits, before the sampling chain (repetition penalty, temperature,
top-k, top-p, draw), so every choice the sampler can make is one the grammar allows and the
sampling options keep their meaning within the allowed set. End-of-turn tokens are allowed exactly
when the grammar accepts what was written; once the grammar can take nothing more
(``finished``) the answer ends. Why llguidance (measured against xgrammar and outlines-core on
this CPU with the SmolLM2 tokenizer): docs/engine.md, "Structured output".
"""

from __future__ import annotations

import functools
import json
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from llguidance import LLMatcher, LLTokenizer

from local_engine.errors import EngineError
from local_engine.tokenizer import Tokenizer

if TYPE_CHECKING:
    from llguidance._lib import JsonCompileOptions  # declared in the stub only

# JSON as the model writes it under a grammar: one line, ", " and ": " (the spacing these models
# were trained on), no free whitespace, which a small model would otherwise fill with newlines.
JSON_STYLE: JsonCompileOptions = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


class GrammarError(EngineError):
    """The requested format cannot be compiled (the message names the schema keyword)."""


@dataclass(frozen=True)
class Grammar:
    """What the answer must match, in llguidance's grammar format (tokenizer-independent).

    ``stop_strings``: whether ``stop`` strings may cut the answer. False for JSON and tool calls: a
    cut would break the structure the grammar guarantees, so there the grammar alone ends it.
    ``free_text_unless``: for "text or tool calls" grammars, stop strings apply to the text
    answer, i.e. unless the answer starts with this marker.
    """

    source: str
    stop_strings: bool = False
    free_text_unless: str | None = None

    @classmethod
    def json_schema(cls, schema: dict[str, Any]) -> Grammar:
        return cls(LLMatcher.grammar_from_json_schema(json_for_generation(schema), defaults=JSON_STYLE))

    @classmethod
    def lark(cls, source: str, *, free_text_unless: str | None = None) -> Grammar:
        return cls(LLMatcher.grammar_from_lark(source), stop_strings=free_text_unless is not None,
                   free_text_unless=free_text_unless)

    def check(self) -> None:
        """Compile without a tokenizer; raise GrammarError with llguidance's reason."""
        err = LLMatcher.validate_grammar(self.source)
        if err:
            raise GrammarError(_reason(err))

    def stops_apply(self, text: str) -> bool:
        if self.free_text_unless is None:
            return self.stop_strings
        return not (text.startswith(self.free_text_unless) or self.free_text_unless.startswith(text))


def _reason(err: str) -> str:
    # llguidance: 'Unimplemented keys: ["uniqueItems"]' plus context lines; keep the first line
    first = err.strip().splitlines()[0] if err.strip() else "invalid grammar"
    return f"cannot constrain the output to this schema: {first}"


# Bounds the grammar adds where a schema sets none (any output within them is valid against the
# schema as written). Measured on the built-in model: unbounded, greedy decoding repeated array
# items ("black", "black", ...) or string text until max_tokens, and a cut answer is not JSON.
MAX_ITEMS = 8
MAX_STRING = 64


# json_object: any JSON object, written as a recursive schema so that the bounds above reach the
# values inside it too (a bare {"type": "object"} leaves them open)
_ANY = {"anyOf": [{"type": "string"}, {"type": "number"}, {"type": "boolean"}, {"type": "null"},
                  {"type": "array", "items": {"$ref": "#/$defs/any"}},
                  {"type": "object", "additionalProperties": {"$ref": "#/$defs/any"}, "maxProperties": MAX_ITEMS}]}
ANY_OBJECT: dict[str, Any] = {"$defs": {"any": _ANY}, "type": "object",
                              "additionalProperties": {"$ref": "#/$defs/any"}, "maxProperties": MAX_ITEMS}


def json_for_generation(schema: dict[str, Any]) -> dict[str, Any]:
    """The schema the grammar is built from: the caller's, narrowed where it is open-ended, so
    that anything it allows is valid against the original: ``additionalProperties: false`` where
    an object lists its properties and says nothing about others (else a small model invents keys
    until max_tokens), at most MAX_ITEMS array items and MAX_STRING characters in a free string
    (one with no maxLength, enum, const or format; with a pattern, where a match fits under the cap),
    unless the schema's minimum needs more."""

    def walk(node: Any) -> Any:
        if isinstance(node, list):
            return [walk(x) for x in node]
        if not isinstance(node, dict):
            return node
        out = {k: (v if k in ("enum", "const", "default", "examples") else walk(v)) for k, v in node.items()}
        if isinstance(out.get("properties"), dict) and "additionalProperties" not in out \
                and "patternProperties" not in out:
            out["additionalProperties"] = False
        declared = out.get("type")
        kinds = declared if isinstance(declared, list) else [declared]
        if "array" in kinds and "maxItems" not in out:
            out["maxItems"] = max(MAX_ITEMS, int(out.get("minItems") or 0))
        if "string" in kinds and not any(k in out for k in ("maxLength", "enum", "const", "format")):
            cap = max(MAX_STRING, int(out.get("minLength") or 0))
            # a pattern's own repeats may be unbounded too ([a-z]+ ran to max_tokens); capped only
            # where some match fits, so the cap never empties what the pattern allows
            if not isinstance(out.get("pattern"), str) or _pattern_fits(out["pattern"], cap):
                out["maxLength"] = cap
        return out

    if not isinstance(schema, dict):
        raise GrammarError("the JSON schema must be an object")
    return walk(schema)  # type: ignore[no-any-return]


@functools.lru_cache(maxsize=256)
def _pattern_fits(pattern: str, max_length: int) -> bool:
    """Whether some string of at most ``max_length`` characters matches ``pattern``."""
    capped = {"type": "string", "pattern": pattern, "maxLength": max_length}
    return not LLMatcher.validate_grammar(LLMatcher.grammar_from_json_schema(capped))


def json_schema_lark(schema: dict[str, Any]) -> str:
    """A lark rule body for one JSON value matching ``schema`` (embedded in a larger grammar)."""
    return "%json " + json.dumps({**json_for_generation(schema), "x-guidance": JSON_STYLE})


_NEG_INF = torch.tensor(float("-inf"))
_TOKENIZERS: dict[int, tuple[Tokenizer, LLTokenizer]] = {}
_TOK_LOCK = threading.Lock()


def grammar_tokenizer(tok: Tokenizer) -> LLTokenizer:
    """llguidance's view of the engine's tokenizer (built once per tokenizer: ~0.5 s)."""
    with _TOK_LOCK:
        hit = _TOKENIZERS.get(id(tok))
        if hit is not None and hit[0] is tok:
            return hit[1]
        eos = sorted(tok.stop_ids) or ([tok.eos_id] if tok.eos_id is not None else [])
        lt = LLTokenizer(tok.tok.to_str(), n_vocab=tok.vocab_size, eos_token=eos or None)
        _TOKENIZERS[id(tok)] = (tok, lt)
        return lt


class GrammarProcessor:
    """One sequence's matcher: the mask before each sampling step, the token after it."""

    def __init__(self, grammar: Grammar, tokenizer: LLTokenizer) -> None:
        self.grammar = grammar
        self.matcher = LLMatcher(tokenizer, grammar.source, log_level=0)
        if self.matcher.is_error():
            raise GrammarError(_reason(self.matcher.get_error()))
        self.n_vocab = tokenizer.vocab_size
        self.mask_s = 0.0  # time spent computing and applying masks (stats)
        self.units = 0  # times the text became a complete match (one per finished tool call)
        self._accepting = bool(self.matcher.is_accepting())
        self._bits = np.zeros((self.n_vocab + 31) // 32, dtype=np.int32)

    @property
    def finished(self) -> bool:
        """The grammar can take no more tokens: the answer is complete."""
        return bool(self.matcher.is_stopped())

    def prime(self, ids: list[int]) -> None:
        """Consume what was already written (the unfinished message being continued)."""
        if ids and not self.matcher.consume_tokens(ids):
            raise GrammarError("the message being continued does not match the requested format")

    def mask(self, logits: torch.Tensor) -> torch.Tensor:
        """Disallowed tokens to -inf (a new tensor: the caller's logits are left as they were)."""
        t0 = time.perf_counter()
        m = self.matcher
        m.unsafe_compute_mask_ptr(self._bits.ctypes.data, self._bits.nbytes)
        if m.is_error():
            raise GrammarError(f"grammar matcher failed: {m.get_error().splitlines()[0]}")
        # bit i of the mask -> token i; torch.where over the vocab (p50 94 us vs 159 us for a
        # boolean index assignment, measured on a random 49k-token mask)
        allowed = np.unpackbits(self._bits.view(np.uint8), bitorder="little")
        n = logits.shape[-1]
        keep = allowed[:n] if n <= allowed.size else np.pad(allowed, (0, n - allowed.size))
        out = torch.where(torch.from_numpy(keep).bool(), logits.float(), _NEG_INF)
        self.mask_s += time.perf_counter() - t0
        return out

    def advance(self, token: int) -> None:
        if not self.matcher.consume_token(token):
            raise GrammarError(f"grammar matcher refused token {token}: {self.matcher.get_error()[:200]}")
        now = bool(self.matcher.is_accepting())
        if now and not self._accepting:
            self.units += 1
        self._accepting = now

    def no_room_for_more(self, text: str, used: int, left: int) -> bool:
        """At the end of a complete structured unit (a tool call), whether another one of the
        average size so far would not fit in the tokens left: better to end with the complete
        calls than to start one that max_tokens cuts (a cut call is no call)."""
        return (self._accepting and self.units > 0 and not self.grammar.stops_apply(text)
                and left * self.units < used)


def for_response_format(rf: Any) -> Grammar | None:
    """OpenAI ``response_format`` -> the grammar of the answer (None: plain text)."""
    schema = response_schema(rf)
    if schema is None:
        return None
    g = Grammar.json_schema(schema)
    g.check()
    return g


def response_schema(rf: Any) -> dict[str, Any] | None:
    """The JSON Schema an OpenAI ``response_format`` asks for (None: plain text).

    ``json_object``: any JSON object. ``json_schema``: the schema, enforced whether ``strict`` is
    true or not (a small model cannot be trusted to follow a schema it was only shown). A schema
    that is not valid JSON Schema, or uses a keyword llguidance cannot enforce, is a GrammarError
    naming it: never a silent fallback to unconstrained text."""
    if rf is None:
        return None
    if not isinstance(rf, dict):
        raise GrammarError("response_format must be an object")
    kind = rf.get("type")
    if kind in (None, "text"):
        return None
    if kind == "json_object":
        return ANY_OBJECT
    if kind != "json_schema":
        raise GrammarError(f"response_format.type {kind!r} is not supported (text, json_object, json_schema)")
    js = rf.get("json_schema")
    if not isinstance(js, dict) or not isinstance(js.get("schema"), dict):
        raise GrammarError("response_format.json_schema.schema must be a JSON Schema object")
    check_schema(js["schema"], "response_format.json_schema.schema")
    return js["schema"]  # type: ignore[no-any-return]


def check_schema(schema: dict[str, Any], where: str) -> None:
    """The schema is itself valid JSON Schema (2020-12), else a GrammarError saying where."""
    import jsonschema

    try:
        jsonschema.Draft202012Validator.check_schema(schema)
    except jsonschema.SchemaError as e:
        path = "".join(f"[{p!r}]" for p in e.path)
        raise GrammarError(f"{where}{path}: not a valid JSON Schema: {e.message}") from None
