"""``router-lfu``: the expert cache's policy that scores experts from the router's probabilities
over all of a layer's experts, not only the ones it picked (``RouterLFU``)."""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence
from collections.abc import Set as AbstractSet

from local_engine.cache_policies import Key, Policy


class RouterScores:
    """The scores of one ``RouterLFU`` configuration: they depend only on the requests and the
    router's probabilities, never on what is cached, so ``adaptive``'s real cache and its shadow
    share them (``RouterLFU.twin``). ``ver[g]`` changes whenever a score of group g may have moved."""

    def __init__(self, decay: float, used: float, mean_prob: float, now_prob: float, logit: float,
                 logit_now: float) -> None:
        if not 0.0 < decay <= 1.0:
            raise ValueError("decay must be in (0, 1]")
        if not 0.0 <= logit_now <= 1.0:
            raise ValueError("logit_now must be in [0, 1]")
        self.d, self.a, self.b, self.c = decay, used, mean_prob, now_prob
        self.lw, self.lam = logit, logit_now
        self.ids: dict[Key, int] = {}  # index of a key that is not (layer, int)
        self.used: dict[Hashable, list[float]] = {}  # group -> decayed selections per expert
        self.mp: dict[Hashable, list[float]] = {}  # group -> decayed probabilities per expert
        self.now: dict[Hashable, list[float]] = {}  # group -> this step's probabilities
        self.lmean: dict[Hashable, list[float]] = {}  # group -> decayed sum of centred log-probabilities
        self.lwt: dict[Hashable, float] = {}  # group -> decayed sum of weights (for the mean)
        self.lsc: dict[Hashable, list[float]] = {}  # group -> P(in the next top-k) per expert
        self.tot: dict[Hashable, list[float]] = {}  # group -> score per expert
        self.w: dict[Hashable, float] = {}  # weight of the group's current step: n tokens = n steps
        self.n: dict[Hashable, int] = {}
        self.k = 1.0  # experts per token, learned: sum of uses / tokens over the last step
        self.step_uses = 0
        self.step_tokens = 0
        self.ver: dict[Hashable, int] = {}
        self.kver = 0  # bumped when k changes (every score has a k term)

    def split(self, key: Key) -> tuple[Hashable, int]:
        if type(key) is tuple and len(key) == 2 and type(key[1]) is int and key[1] >= 0:
            return key[0], key[1]
        return None, self.ids.setdefault(key, len(self.ids))

    @staticmethod
    def _grow(lst: list[float], n: int) -> list[float]:
        if len(lst) < n:
            lst.extend([0.0] * (n - len(lst)))
        return lst

    def _retotal(self, g: Hashable) -> None:
        u = self._grow(self.used.setdefault(g, []), max(len(self.mp.get(g, ())), len(self.now.get(g, ()))))
        n = len(u)
        a, kb, kc = self.a, self.k * self.b, self.k * self.c
        tot = [a * x for x in u]
        for coef, src in ((kb, self.mp.get(g)), (kc, self.now.get(g)), (self.lw, self.lsc.get(g))):
            if coef and src:
                tot = [t + coef * x for t, x in zip(tot, self._grow(src, n), strict=False)]
        self.tot[g] = tot
        self.ver[g] = self.ver.get(g, 0) + 1

    def _logit_scores(self, g: Hashable, probs: Sequence[float]) -> None:
        """P(expert in the layer's next top-k), from the router's log-probabilities: the next logit is
        predicted as ``logit_now`` x this step's + the rest x its decayed mean (a slowly drifting
        hidden state pulls towards the expert's usual score), and an expert is in if its prediction
        clears the k-th best of the layer: score = sigmoid(prediction - threshold). Comparable
        across layers (a probability), unlike raw router probabilities (flat vs peaked layers)."""
        lp = [math.log(max(p, 1e-12)) for p in probs]
        c = sum(lp) / len(lp)
        lp = [x - c for x in lp]  # logits up to a constant: centre them
        f, w = self.d ** self.n.get(g, 1), self.w.get(g, 1.0)
        m = self.lmean.get(g)
        m = [w * x for x in lp] if m is None or len(m) != len(lp) else [f * y + w * x for y, x in zip(m, lp, strict=True)]
        self.lmean[g] = m
        wt = self.lwt[g] = self.lwt.get(g, 0.0) * f + w
        lam, rest = self.lam, (1.0 - self.lam) / wt
        mu = [lam * x + rest * y for x, y in zip(lp, m, strict=True)]
        k = min(max(round(self.k), 1), len(mu) - 1) if len(mu) > 1 else 0
        srt = sorted(mu, reverse=True)
        tau = 0.5 * (srt[k - 1] + srt[k]) if k else srt[0]
        self.lsc[g] = [1.0 / (1.0 + math.exp(min(tau - x, 700.0))) for x in mu]

    def step(self, group: Hashable, n_tokens: int) -> None:
        if self.step_tokens and self.step_uses and self.step_uses / self.step_tokens != self.k:
            self.k = self.step_uses / self.step_tokens
            self.kver += 1
            for g in list(self.tot):
                if g != group:
                    self._retotal(g)
        n = max(n_tokens, 1)
        d = self.d
        self.n[group] = n
        self.w[group] = float(n) if d == 1.0 else (1.0 - d**n) / (1.0 - d)
        self.step_uses, self.step_tokens = 0, n
        f = d**n
        if group in self.used:
            self.used[group] = [x * f for x in self.used[group]]
        if group in self.mp:
            self.mp[group] = [x * f for x in self.mp[group]]
        self.now.pop(group, None)
        self._retotal(group)

    def observe(self, group: Hashable, probs: Sequence[float]) -> None:
        if not probs:
            return
        if self.b:
            w = self.w.get(group, 1.0)
            mp = self._grow(self.mp.get(group, []), len(probs))
            self.mp[group] = [x + w * p for x, p in zip(mp, probs, strict=False)] + mp[len(probs):]
        self.now[group] = list(probs)
        if self.lw:
            self._logit_scores(group, probs)
        self._retotal(group)

    def access(self, key: Key, uses: int) -> None:
        g, e = self.split(key)
        self.step_uses += uses
        add = uses / self.n.get(g, 1) * self.w.get(g, 1.0)
        self._grow(self.used.setdefault(g, []), e + 1)[e] += add
        self._grow(self.tot.setdefault(g, []), e + 1)[e] += self.a * add
        self.ver[g] = self.ver.get(g, 0) + 1

    def score(self, g: Hashable, e: int) -> float:
        t = self.tot.get(g)
        return t[e] if t is not None and e < len(t) else 0.0


class RouterLFU(Policy):
    """Keep the experts with the highest predicted use at their layer's next steps, from the router.

    The MoE layer computes the router's softmax over ALL its experts for every token; only the
    top-k are used, but an expert that scored high and just missed the cut is a likely pick of the
    next tokens when hidden states drift slowly, and the probabilities of all E experts estimate
    each expert's popularity from E numbers per token instead of k selections. The score, per
    expert, on its own layer's clock (see ``LayerLFU`` for why per layer):

        score = used * EMA(selected) + k * (mean_prob * EMA(p) + now_prob * p_now) + logit * P(next top-k)

    EMA: decayed sum with ``decay`` per step of the layer (a micro-batch of n tokens counts as n
    steps), p: the router's probability (mean over the step's tokens), scaled by k (experts per
    token, learned from the steps: uses / tokens) so it counts like a selection (both sum to k
    over a layer's experts). P(next top-k): see ``RouterScores._logit_scores``. ``used`` alone is
    ``LayerLFU``'s score. Victim: the lowest score over all layers; admission: a miss enters only
    if it out-scores the victim.

    Scores live in per-layer lists indexed by expert and only move at their layer's steps, so each
    layer's minimum is cached until that layer changes. Cost: O(E) per layer step, O(layers) per
    victim plus a scan of the current layer's cached experts. Keys that are not ``(layer, int)``
    (tests, other users) share one group and get no router term.
    """

    def __init__(self, decay: float = 0.8, used: float = 1.0, mean_prob: float = 0.0, now_prob: float = 0.0,
                 logit: float = 0.0, logit_now: float = 0.5, scores: RouterScores | None = None) -> None:
        self._own = scores is None  # a twin reads its scores, the owner updates them
        self.s = scores or RouterScores(decay, used, mean_prob, now_prob, logit, logit_now)
        self._in: dict[Hashable, dict[int, Key]] = {}  # cached keys per group, by expert index
        # cached minimum per group: (score version, k version, score, expert)
        self._min: dict[Hashable, tuple[int, int, float, int]] = {}

    def twin(self) -> RouterLFU:
        """Another cache's view over the same scores (same requests, other contents)."""
        return RouterLFU(scores=self.s)

    def step(self, group: Hashable, n_tokens: int = 1) -> None:
        if self._own:
            self.s.step(group, n_tokens)

    def observe(self, group: Hashable, probs: Sequence[float]) -> None:
        if self._own:
            self.s.observe(group, probs)

    def access(self, key: Key, uses: int = 1) -> None:
        if self._own:
            self.s.access(key, uses)

    def score(self, key: Key) -> float:
        return self.s.score(*self.s.split(key))

    def admit(self, key: Key, victim: Key) -> bool:
        return self.score(key) > self.score(victim)

    def insert(self, key: Key) -> None:
        g, e = self.s.split(key)
        self._in.setdefault(g, {})[e] = key
        m = self._min.get(g)
        if m is not None:
            sc = self.s.score(g, e)
            if sc < m[2]:
                self._min[g] = (m[0], m[1], sc, e)

    def remove(self, key: Key) -> None:
        g, e = self.s.split(key)
        self._in.get(g, {}).pop(e, None)
        m = self._min.get(g)
        if m is not None and m[3] == e:
            del self._min[g]

    def _pinned_groups(self, pinned: AbstractSet[Key]) -> set[Hashable]:
        # every call: remembering the last set by id() handed a later, different set of the same
        # size (a new step's, at the freed one's address) the old groups, and pinned keys were evicted
        return {self.s.split(k)[0] for k in pinned}

    def victim(self, pinned: AbstractSet[Key]) -> Key | None:
        s = self.s
        pg = self._pinned_groups(pinned)
        best_sc, best_e, best_g = math.inf, -1, None
        for g, cached in self._in.items():
            if not cached:
                continue
            t = s.tot.get(g) or []
            nt = len(t)
            if g in pg:  # scan, skipping this step's keys (only the current layer)
                for e, k in cached.items():
                    if k not in pinned:
                        sc = t[e] if e < nt else 0.0
                        if sc < best_sc or best_e < 0:
                            best_sc, best_e, best_g = sc, e, g
                continue
            m = self._min.get(g)
            v = s.ver.get(g, 0)
            if m is None or m[0] != v or m[1] != s.kver:
                sc, e = min((t[e] if e < nt else 0.0, e) for e in cached)
                m = self._min[g] = (v, s.kver, sc, e)
            if m[2] < best_sc or best_e < 0:
                best_sc, best_e, best_g = m[2], m[3], g
        return None if best_e < 0 else self._in[best_g][best_e]


# ``router``'s candidates: selections only with a short, mid and long memory (``adaptive``'s), and the
# calibrated next-top-k probability from the router's log-probabilities with a long-memory mean and
