"""Prompt-lookup speculative decoding: drafts from the text itself, verified greedily in one forward.

Drafts (``PromptLookup``): the last n tokens (n = 4, then 3, 2, 1) are looked up among the
earlier positions of the prompt + the answer so far; the k tokens that followed their latest
occurrence are the draft (where they run into the end of the text, the loop they form is copied
on: "a b a b" drafts "a b a ...", not the two tokens that followed). Free (no second model) and strong when the answer quotes its prompt
(edits, summaries, RAG answers).

Draft model (``DraftRun``, mode "draft" with ``Engine.open(..., draft_model=...)``): a second,
smaller model with the target's tokenizer drafts greedily over its own KV cache; before each
draft its cache is cropped to what it shares with the answer (rejected drafts' rows go: the
rollback) and it runs the tokens it lacks in one forward.

Self-draft (``SelfDraft``, mode "draft"): a packed MoE drafts with itself routed to fewer of its
experts per token (same attention and KV cache, no second checkpoint); the verify reads the union
of the k+1 positions' experts once per layer (models/moe.py).

Verification (``verify``): one forward over [last token, draft...] (k+1 positions) gives the
target's logits at every drafted position. Greedy: draft token i is accepted while it is the argmax
at position i; the argmax at the first rejected (or the one past the last) position is the next
token, as plain decoding would pick it from the same logits. The KV cache keeps only the accepted
positions (``crop``): positions past it are rewritten before they are read.

Exact greedy output, with one guard: the batched verify's logits are not bitwise the single-token
step's (the prefill path is ~5e-3 from it, docs/engine.md; a model's ``verify_forward``, the
step's fused kernels over several rows, is closer). Where the top two logits at a decided
position are closer than ``TIE_MARGIN``, that position is re-run as a single step (the path plain
decoding takes), so a near-tie is broken the way plain decoding breaks it.

Sampling (``verify_sampled``, temperature > 0): the standard speculative-sampling rule. A draft
token d at position i is accepted with probability min(1, p_i(d) / q_i(d)), and at the first
rejection the token is drawn from norm(max(0, p_i - q_i)); p_i is the sampler's distribution
there (temperature, top-k, top-p, repetition penalty over the history with the accepted drafts).
Prompt lookup proposes one token per position, so q_i is a point mass: accept with p_i(d), else
draw from p_i without d, renormalised. After k accepted drafts the next token is drawn from
position k's p as plain decoding would. The output distribution is the target's (a chi-square
test in tests/engine/test_speculative.py); p_i comes from the verify's logits, which are within
the batched path's rounding (~1e-3) of the single step's. Not with a grammar mask: the engine does
not speculate then.

``speculative: auto`` picks k (0 = no draft) per verify from measured costs and acceptance:
local_engine/spec_control.py.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, Protocol, runtime_checkable

import torch

Mode = Literal["off", "prompt-lookup", "auto", "draft"]
MODES: tuple[str, ...] = ("off", "prompt-lookup", "auto", "draft")
# tokens drafted per verify (llama.cpp's prompt lookup uses ~10): 7, so a verify is 8 rows, two
# full tiles of qkernel's several-row path (9 rows cost 1.28x the instructions of 8 there)
DRAFT_K = 7
# a self-draft or a draft model costs a forward per drafted token: fewer per verify
SELF_DRAFT_K = 3
# a 4-token match continues a quote far more often than a 3-token one (the controller keys its
# acceptance by match length: spec_control.py)
NGRAM_MAX, NGRAM_MIN = 4, 1
# the batched and the single-step paths differ by ~5e-3 on logits (measured 0.0049-0.0054)
TIE_MARGIN = 0.02


def check_mode(mode: str, model: Any = None, draft_model: Any = None) -> Mode:
    """``mode`` if known (and, for "draft", if there is a ``draft_model`` or ``model`` drafts for
    itself), else ValueError."""
    if mode not in MODES:
        raise ValueError(f"speculative must be one of {', '.join(MODES)}, not {mode!r}")
    if mode == "draft" and model is not None and draft_model is None and not isinstance(model, SelfDraft):
        raise ValueError("speculative 'draft' needs a draft model (draft_model: a smaller model with the same "
                         "tokenizer) or a model that drafts for itself (a packed MoE: fewer experts per token); "
                         "use prompt-lookup or auto")
    return mode  # type: ignore[return-value]


class PromptLookup:
    """Latest end position of every 1..3-gram of ``tokens`` that has a token after it."""

    def __init__(self, tokens: list[int], n_max: int = NGRAM_MAX, n_min: int = NGRAM_MIN) -> None:
        self.tokens = tokens  # the caller's history list: it appends, ``sync`` indexes what is new
        self.n_max, self.n_min = n_max, n_min
        self._index: dict[tuple[int, ...], int] = {}
        self._done = 0  # n-grams ending before this position are indexed
        self.matched = 0  # the length of the n-gram the last proposal matched

    def sync(self) -> None:
        t = self.tokens
        # an n-gram ending at e is indexed once t[e + 1] exists (it has a continuation to propose)
        for e in range(self._done, len(t) - 1):
            for n in range(self.n_min, self.n_max + 1):
                if e - n + 1 >= 0:
                    self._index[tuple(t[e - n + 1:e + 1])] = e
        self._done = max(self._done, len(t) - 1)

    def propose(self, k: int) -> list[int]:
        """``k`` tokens after the latest earlier occurrence of the longest suffix (what followed
        it, repeated where that runs into the end), or none."""
        if k <= 0:
            return []
        self.sync()
        t = self.tokens
        for n in range(self.n_max, self.n_min - 1, -1):
            if len(t) < n:
                continue
            e = self._index.get(tuple(t[-n:]))
            if e is not None:
                self.matched = n
                out = t[e + 1:e + 1 + k]
                # the match ends p tokens back, so the text is taken to repeat with period p: a
                # continuation that runs into the end goes on copying itself (a loop "a b a b"
                # drafts k tokens, not the one or two that followed the latest match)
                p = len(t) - 1 - e
                while len(out) < k:
                    out.append(out[-p])
                return out
        return []


@runtime_checkable
class FastVerify(Protocol):
    """A model with a forward made for a few tokens after a cached prefix (models/llama.py)."""

    def verify_forward(self, ids: torch.Tensor, cache: Any) -> torch.Tensor: ...


@runtime_checkable
class VerifyCostPrior(Protocol):
    """A model whose verify cost does not grow like the dense kernel's staircase (a packed MoE: a
    verify reads the union of its positions' experts) prices one before measuring it."""

    def verify_cost_prior(self, max_rows: int) -> list[float] | None:
        """Index m (1 .. ``max_rows``): an m-row forward's seconds in single steps, from what the
        model measured so far (spec_control.moe_prior); None until it has decoded a step."""
        ...


@runtime_checkable
class SelfDraft(Protocol):
    """A model that drafts with a cheaper version of itself over its own KV cache (models/moe.py:
    fewer experts per token), leaving the cache as it found it."""

    def self_draft(self, last: int, cache: Any, k: int) -> list[int]: ...


class DraftRun:
    """One generation's drafting with a separate draft model (same tokenizer as the target): its
    own KV cache, kept in step with the answer."""

    def __init__(self, model: Any, max_seq: int) -> None:
        self.model, self.max_seq = model, max_seq
        self.cache: Any = None
        self.tokens: list[int] = []  # the tokens whose K/V ``cache`` holds
        self.caught_up = 0  # tokens the last ``propose`` ran to catch up (the prompt, the first time)
        # the last ``propose``'s one-token forwards and their seconds: what a drafted token costs
        # (the catch-up runs whatever the answer gained since the last draft, so it is left out
        # unless it was one token)
        self.steps, self.step_s = 0, 0.0

    def propose(self, history: list[int], k: int) -> list[int]:
        """``k`` greedy tokens after ``history`` (the prompt + the answer so far, its last token
        included). The cache is first cropped to the longest prefix it shares with ``history``:
        drafts the target rejected are rolled back, accepted ones kept."""
        m = self.model
        if k <= 0 or len(history) + k > self.max_seq:
            return []
        if self.cache is None:
            self.cache = m.new_cache()
        common = 0
        for a, b in zip(self.tokens, history, strict=False):
            if a != b:
                break
            common += 1
        common = min(common, len(history) - 1)  # the last token runs again: its logits are the first draft's
        self.cache.crop(common)
        del self.tokens[common:]
        ids = history[common:]
        self.caught_up = len(ids)
        t = time.perf_counter()
        logits = m.forward(torch.tensor(ids, dtype=torch.long), self.cache, last_only=True)[-1]
        self.tokens.extend(ids)
        self.steps, self.step_s = (1, time.perf_counter() - t) if len(ids) == 1 else (0, 0.0)
        out: list[int] = []
        while True:
            out.append(int(logits.argmax()))
            if len(out) == k:
                return out
            t = time.perf_counter()
            logits = m.forward(torch.tensor(out[-1:], dtype=torch.long), self.cache, last_only=True)[-1]
            self.steps, self.step_s = self.steps + 1, self.step_s + time.perf_counter() - t
            self.tokens.append(out[-1])


def same_tokenizer(a: Any, b: Any) -> bool:
    """Whether two ``tokenizer.Tokenizer`` map text to the same ids (a draft model must share the
    target's vocabulary: its drafts are the target's token ids)."""
    return bool(a.vocab_size == b.vocab_size and a.tok.get_vocab(with_added_tokens=True)
                == b.tok.get_vocab(with_added_tokens=True))


def verify(model: Any, cache: Any, last: int, draft: list[int]) -> tuple[torch.Tensor, list[int]]:
    """Run ``[last, *draft]`` after ``cache``; return (logits for the next position, accepted drafts).

    The cache ends holding ``last`` and the accepted drafts; the next token is the argmax of the
    returned logits (plain greedy decoding's choice there)."""
    ids = [last, *draft]
    base = cache.length
    fwd = model.verify_forward if isinstance(model, FastVerify) else model.forward
    rows = fwd(torch.tensor(ids, dtype=torch.long), cache)
    top = torch.topk(rows, 2, dim=-1)
    best = top.indices[:, 0].tolist()
    margin = (top.values[:, 0] - top.values[:, 1]).tolist()
    for i in range(len(ids)):
        if margin[i] < TIE_MARGIN:
            # a near-tie: decide it from the single-step path's logits, like plain decoding
            cache.crop(base + i)
            return model.forward(torch.tensor(ids[i:i + 1], dtype=torch.long), cache, last_only=True)[-1], draft[:i]
        if i == len(draft) or best[i] != draft[i]:
            cache.crop(base + i + 1)
            return rows[i], draft[:i]
    raise AssertionError("unreachable: the last position always decides")


def accept_sampled(probs_at: Callable[[int], torch.Tensor], draft: list[int],
                   uniform: Callable[[], float]) -> tuple[int, torch.Tensor | None]:
    """Speculative sampling against a point-mass draft: (drafts accepted, the distribution to draw the
    token at the first rejected position from, or None when every draft was accepted).

    ``probs_at(i)``: the target's sampling distribution at draft position i (computed only as far
    as the drafts get); ``uniform()``: a U[0, 1) draw."""
    for i, d in enumerate(draft):
        p = probs_at(i)
        pd = float(p[d])
        if uniform() < pd:  # min(1, p(d) / q(d)) with q(d) = 1
            continue
        residual = p.clone()
        residual[d] = 0.0  # max(0, p - q): q is 1 at d and 0 elsewhere
        return i, residual / residual.sum()
    return len(draft), None


def verify_sampled(model: Any, cache: Any, last: int, draft: list[int],
                   probs: Callable[[torch.Tensor, list[int]], torch.Tensor],
                   uniform: Callable[[], float]) -> tuple[torch.Tensor, list[int], torch.Tensor | None]:
    """``verify`` for sampling: run ``[last, *draft]`` after ``cache``; return (logits for the position
    after the accepted drafts, accepted drafts, the residual distribution the next token must be
    drawn from instead of those logits, or None). ``probs(logits, accepted_so_far)``: the sampler's
    distribution at a position. The cache ends holding ``last`` and the accepted drafts."""
    ids = [last, *draft]
    base = cache.length
    fwd = model.verify_forward if isinstance(model, FastVerify) else model.forward
    rows = fwd(torch.tensor(ids, dtype=torch.long), cache)
    n, residual = accept_sampled(lambda i: probs(rows[i], draft[:i]), draft, uniform)
    cache.crop(base + n + 1)
    return rows[n], draft[:n], residual


@dataclass
class SpecTotals:
    """An engine's speculation counters since load, summed over its generations (the gateway's
    /metrics exports them per target: hybrid_speculative_*)."""

    drafted: int = 0  # draft tokens verified
    accepted: int = 0  # of those, accepted
    verifies: int = 0  # verify forwards
    steps: int = 0  # single-step decode forwards (speculating or not)

    def add(self, drafted: int, accepted: int, verifies: int, steps: int) -> None:
        self.drafted += drafted
        self.accepted += accepted
        self.verifies += verifies
        self.steps += steps

    def as_dict(self) -> dict[str, float]:
        forwards = self.verifies + self.steps
        return {"drafted_tokens": self.drafted, "accepted_tokens": self.accepted, "verifies": self.verifies,
                "acceptance_rate": self.accepted / self.drafted if self.drafted else 0.0,
                # tokens decided per decode forward: a step decides one, a verify its accepted drafts + 1
                "tokens_per_forward": (forwards + self.accepted) / forwards if forwards else 0.0}
