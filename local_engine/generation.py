"""One generation: the prefill, the token loop (sampling, stop strings, grammar, speculative drafts
and verifies) and its stats, run against an ``Engine``'s model under its lock
(``Engine.chat`` / ``Engine.generate`` return a ``Generation``; engine.py)."""

from __future__ import annotations

import resource
import time
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from local_engine import grammar as grammar_mod
from local_engine import kv_cache, spec_control, speculative
from local_engine import tools as tools_mod
from local_engine.errors import EngineError
from local_engine.sampling import Sampler, SamplingParams
from local_engine.sequence import ChunksPrefill, prefill_end
from local_engine.tokenizer import StreamDecoder

if TYPE_CHECKING:
    from local_engine.engine import Engine


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
                if ctl.budgeted:  # what is not verified: learn its acceptance from the tokens decided next
                    ctl.shadow(source, avail, k)
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
