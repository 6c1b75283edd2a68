"""One request inside the scheduler (local_engine/scheduler.py): its token loop as a state machine.

``Generation._run`` (generation.py) is the same loop written as one generator over a model it holds
alone; here each call does one piece so the scheduler can interleave many sequences on one model:
``prefill`` one chunk of the prompt, then ``choose`` a token from the latest logits (sampling,
grammar mask, stop tokens and strings, text emission: the same order and rules as
``Generation._decode``), after which the scheduler runs the chosen token, batched with the others.
Results land on the ``Generation`` itself (text, finish_reason, stop_sequence, stats), so its
``parsed()`` and ``usage`` read as after a serial run.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import torch

from local_engine import kv_cache
from local_engine.errors import EngineError
from local_engine.sampling import Sampler
from local_engine.tokenizer import StreamDecoder

if TYPE_CHECKING:
    from local_engine.engine import Engine
    from local_engine.generation import Generation


@runtime_checkable
class ChunksPrefill(Protocol):
    """A model whose ``forward`` runs a long prompt in chunks of ``prefill_chunk`` tokens
    (models/llama.py, models/moe.py): a serial run steps through the same chunks and checks for a
    cancel between them. A model without it gets the whole prompt in one call."""

    prefill_chunk: int


def prefill_end(total: int, done: int, chunk: int) -> int:
    """Where the prefill piece starting at ``done`` of ``total`` prompt tokens ends.

    A last piece of one token would take the model's decode step (other arithmetic than the
    prefill path's): it runs with the chunk before, which ``forward`` splits as one call would."""
    return total if total - done <= chunk + 1 else done + chunk


class Sequence:
    """States: waiting -> prefilling -> decoding -> done (``reason`` set)."""

    def __init__(self, gen: Generation, on_delta: Callable[[str], None], enqueued: float) -> None:
        self.gen, self.on_delta, self.enqueued = gen, on_delta, enqueued
        p = gen.params
        self.sampler = Sampler(p)
        self.history = list(gen.prompt_ids)
        self.stops = [s for s in p.stop if s]
        self.hold = max((len(s) for s in self.stops), default=1) - 1
        self.pending = ""  # text held back because it may be the start of a stop string
        self.cut_by_stop_string = False
        self.cache: Any = None
        self.prefilled = 0  # prompt tokens whose K/V are in the cache (reused ones included)
        self.max_new = 0
        self.step = 0  # tokens chosen so far
        self.logits: torch.Tensor | None = None  # the next position's, once the prompt is in
        self.reason: str | None = None
        self.ttft_s: float | None = None  # enqueue -> first token chosen
        self.ttft_recorded = False
        self.served = 0  # prefill chunks run: the scheduler serves the least served first
        self._t_decode = 0.0
        self.dec: StreamDecoder | None = None

    @property
    def prefilling(self) -> bool:
        return self.reason is None and self.logits is None

    def cancelled(self) -> bool:
        stop = self.gen.should_stop
        return stop is not None and stop()

    # ---------------------------------------------------------------------------- start
    def begin(self, eng: Engine) -> bool:
        """Take a cache (the prefix cache's longest match); False when nothing is to be run."""
        gen, p = self.gen, self.gen.params
        room = p.max_tokens if eng.kv_config.bounded else eng.max_seq - len(gen.prompt_ids)
        if room <= 0:
            raise EngineError(f"prompt of {len(gen.prompt_ids)} tokens does not fit the context "
                              f"({eng.max_seq} tokens)")
        self.max_new = min(p.max_tokens, room)
        self.dec = StreamDecoder(eng.tokenizer)
        if self.max_new == 0:
            self.reason = "length"
            return False
        self.cache, cached = eng.prefix_cache.take(gen.prompt_ids, eng.model.new_cache)
        self.prefilled = gen.stats.cached_tokens = cached
        gen.start_step = eng.steps
        return True

    def prefill(self, model: Any, chunk: int) -> None:
        """Run the next ``chunk`` prompt tokens; the last chunk leaves the first logits."""
        ids = self.gen.prompt_ids
        end = prefill_end(len(ids), self.prefilled, chunk)
        t0 = time.perf_counter()
        out = model.forward(torch.tensor(ids[self.prefilled:end], dtype=torch.long), self.cache, last_only=True)
        self.gen.stats.prefill_s += time.perf_counter() - t0
        self.prefilled = end
        self.served += 1
        if end == len(ids):
            self.logits = out[-1]

    # ---------------------------------------------------------------------------- decode
    def choose(self, stop_ids: set[int] | frozenset[int]) -> int | None:
        """The next token from ``logits`` (emitting its text), or None when the sequence ended."""
        gen, gram, dec = self.gen, self.gen.grammar, self.dec
        assert self.logits is not None and dec is not None
        if self.step >= self.max_new:
            self.reason = "length"
            return None
        if self.cancelled():
            self.reason = "cancelled"
            return None
        if self.step == 0:
            self.ttft_s = time.monotonic() - self.enqueued
            self._t_decode = time.perf_counter()
        nxt = self.sampler(gram.mask(self.logits) if gram is not None else self.logits, self.history)
        if nxt in stop_ids:
            self.reason = "stop"
            return None
        if gram is not None:
            gram.advance(nxt)
        self.history.append(nxt)
        gen.stats.completion_tokens += 1
        self.pending += dec.push(nxt)
        self.step += 1
        if self.stops and (gram is None or gram.grammar.stops_apply(gen.text + self.pending)):
            cut = min((i for i in (self.pending.find(s) for s in self.stops) if i >= 0), default=-1)
            if cut >= 0:
                gen.stop_sequence = next(s for s in self.stops if self.pending.find(s) == cut)
                self.pending, self.cut_by_stop_string = self.pending[:cut], True
                self.reason = "stop"
                return None
        emit = self.pending[:len(self.pending) - self.hold] if self.hold else self.pending
        if emit:
            self.pending = self.pending[len(emit):]
            gen.text += emit
            self.on_delta(emit)
        if gram is not None and (gram.finished or gram.no_room_for_more(
                gen.text + self.pending, gen.stats.completion_tokens, self.max_new - self.step)):
            self.reason = "stop"  # the grammar is complete, or another call would not fit
            return None
        if self.step >= self.max_new:
            self.reason = "length"  # the last token needs no forward pass
            return None
        return nxt

    # ---------------------------------------------------------------------------- finish
    def finish(self, eng: Engine) -> None:
        """Hand the cache to the prefix cache, flush held-back text, fill the stats."""
        gen = self.gen
        if self.reason is None:
            self.reason = "cancelled"
        if self.cache is not None:
            if self.cache.length > len(self.history):
                self.cache.crop(len(self.history))
            gen.stats.extra["kv_bytes"] = kv_cache.kv_bytes(self.cache)
            eng.prefix_cache.put(gen.prompt_ids, self.cache)
            self.cache = None
        if self._t_decode:
            gen.stats.decode_s = time.perf_counter() - self._t_decode
        if self.dec is not None and not self.cut_by_stop_string:
            self.pending += self.dec.flush()
        if self.pending:
            gen.text += self.pending
            self.on_delta(self.pending)
            self.pending = ""
        gen.finish_reason = self.reason
        if gen.grammar is not None:
            gen.stats.extra["grammar_mask_s"] = round(gen.grammar.mask_s, 4)
        if self.ttft_s is not None:
            gen.stats.extra["ttft_s"] = round(self.ttft_s, 4)
