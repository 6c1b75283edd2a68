"""Sensitivity classifier: presidio in-process over everything a request would send out.

`classify(body)` is synchronous and may be called from several worker threads at once. The
analyzer is built once; the spaCy pipeline inside it is not documented as thread-safe, so calls
into it are serialised by a lock (on 2 cores there is nothing to gain from running two at once).
Segments already analysed (the resent history of a chat) come from an LRU cache keyed by a hash
of the text, so each turn analyses only what is new.

Errors never carry the analysed text: presidio's own exceptions can quote it, so only the
exception type is reported, and the finding says `error` so the pipeline fails closed.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import structlog

from gateway.features import SENSITIVITY_LEVELS, Entity, SensitivityFinding, level_rank
from gateway.privacy.config import PrivacyConfig
from gateway.privacy.walk import Segment, walk

if TYPE_CHECKING:
    from presidio_analyzer import AnalyzerEngine

log = structlog.get_logger("gateway.classify.sensitivity")

_SEPARATOR = "\n\n"
_MAX_BATCH_CHARS = 100_000  # keeps each spaCy call well under its max_length
# A raw result: (entity type, start, end, score), offsets within one segment. Never the text.
Raw = tuple[str, int, int, float]


class _LRU:
    def __init__(self, size: int) -> None:
        self._size = size
        self._data: OrderedDict[bytes, tuple[Raw, ...]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: bytes) -> tuple[Raw, ...] | None:
        with self._lock:
            value = self._data.get(key)
            if value is not None:
                self._data.move_to_end(key)
            return value

    def put(self, key: bytes, value: tuple[Raw, ...]) -> None:
        if self._size <= 0:
            return
        with self._lock:
            self._data[key] = value
            self._data.move_to_end(key)
            while len(self._data) > self._size:
                self._data.popitem(last=False)


def _key(text: str) -> bytes:
    return hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16).digest()


def _max_level(levels: list[str]) -> str:
    return max(levels, key=lambda lv: level_rank(SENSITIVITY_LEVELS, lv), default="none")


class PresidioSensitivityClassifier:
    runs_inline = False  # spaCy and presidio: milliseconds, in a worker thread

    def __init__(self, cfg: PrivacyConfig) -> None:
        self._cfg = cfg
        self._levels = cfg.effective_levels()
        # Imported here: presidio pulls in spaCy (and torch); a gateway with privacy disabled
        # never pays for it, in start-up time or memory.
        from gateway.privacy.engine import build_analyzer

        self._analyzer: AnalyzerEngine
        self._analyzer, self._entities = build_analyzer(cfg)
        self._lock = threading.Lock()
        self._cache = _LRU(cfg.cache_size)
        self._rank = lambda etype: level_rank(SENSITIVITY_LEVELS, self._levels.get(etype, cfg.default_level))
        self._allow = {k: {v.casefold() for v in vals} for k, vals in cfg.allow.items()}
        # The first call pays spaCy's lazy initialisation; pay it at startup, not on a request.
        self._analyze_texts(["Warm-up: Jane Doe wrote to jane@example.com from Paris."])

    @property
    def entities(self) -> list[str]:
        return list(self._entities)

    def ner_pipeline(self) -> Callable[[str], Any]:
        """The spaCy pipeline inside the analyzer."""
        return self._analyzer.nlp_engine.nlp["en"]  # type: ignore[attr-defined]

    def parse(self, text: str) -> Any:
        """Text -> spaCy Doc exactly as the analyzer parses it, so a benchmark can time NER alone."""
        return self._analyzer.nlp_engine.parse(text)  # type: ignore[attr-defined]

    def classify(self, body: dict[str, Any]) -> SensitivityFinding:
        t0 = time.perf_counter()
        try:
            segments, unscanned = walk(body)
            entities, cached = self._find(segments)
        except Exception as exc:
            log.error("sensitivity_analysis_failed", error=type(exc).__name__)
            return SensitivityFinding(level="high", error=f"sensitivity analysis failed ({type(exc).__name__})")
        elapsed_ms = (time.perf_counter() - t0) * 1000
        levels = [e.level for e in entities]
        if unscanned:
            levels.append(self._cfg.unscanned_level)
        counts: dict[str, int] = {}
        for e in entities:
            counts[e.type] = counts.get(e.type, 0) + 1
        evidence = {
            "counts": counts,
            "segments": len(segments),
            "cached_segments": cached,
            "unscanned": len(unscanned),
            "ms": round(elapsed_ms, 2),
        }
        error = None
        if elapsed_ms > self._cfg.analysis_budget_ms:
            error = f"sensitivity analysis took {elapsed_ms:.0f} ms, over its {self._cfg.analysis_budget_ms:.0f} ms budget"
        return SensitivityFinding(
            level="high" if error else _max_level(levels),
            entities=tuple(entities),
            unscanned=tuple(unscanned),
            evidence=evidence,
            error=error,
        )

    # -- analysis ----------------------------------------------------------------------------
    def _find(self, segments: list[Segment]) -> tuple[list[Entity], int]:
        raws: list[tuple[Raw, ...] | None] = [self._cache.get(_key(s.text)) for s in segments]
        todo = [i for i, r in enumerate(raws) if r is None]
        cached = len(segments) - len(todo)
        if todo:
            fresh = self._analyze_texts([segments[i].text for i in todo])
            for i, r in zip(todo, fresh, strict=True):
                raws[i] = r
                self._cache.put(_key(segments[i].text), r)
        out: list[Entity] = []
        for seg, seg_raws in zip(segments, raws, strict=True):
            for etype, start, end, score in seg_raws or ():
                value = seg.text[start:end]
                if self._allowed(etype, value):
                    continue
                out.append(
                    Entity(
                        type=etype,
                        location=seg.location,
                        start=start,
                        end=end,
                        score=round(score, 3),
                        level=self._levels.get(etype, self._cfg.default_level),
                        text=value,
                    )
                )
        return out, cached

    def _allowed(self, etype: str, value: str) -> bool:
        v = value.strip().casefold()
        return v in self._allow.get(etype, ()) or v in self._allow.get("*", ())

    def _analyze_texts(self, texts: list[str]) -> list[tuple[Raw, ...]]:
        """Analyse several texts in as few analyzer calls as possible (joined by blank lines)."""
        results: list[tuple[Raw, ...]] = []
        batch: list[str] = []
        size = 0
        for text in texts:
            if batch and size + len(text) > _MAX_BATCH_CHARS:
                results.extend(self._analyze_batch(batch))
                batch, size = [], 0
            batch.append(text)
            size += len(text) + len(_SEPARATOR)
        if batch:
            results.extend(self._analyze_batch(batch))
        return results

    def _analyze_batch(self, texts: list[str]) -> list[tuple[Raw, ...]]:
        joined = _SEPARATOR.join(texts)
        with self._lock:
            found = self._analyzer.analyze(joined, language="en", entities=self._entities)
        starts = []
        pos = 0
        for t in texts:
            starts.append(pos)
            pos += len(t) + len(_SEPARATOR)
        per: list[list[Raw]] = [[] for _ in texts]
        for r in found:
            threshold = self._cfg.score_thresholds.get(r.entity_type, self._cfg.score_threshold)
            if r.score < threshold:
                continue
            # A match across a separator is split: each piece is redacted in its own segment.
            for i, (s0, text) in enumerate(zip(starts, texts, strict=True)):
                a, b = max(r.start, s0), min(r.end, s0 + len(text))
                if a < b:
                    per[i].append((r.entity_type, a - s0, b - s0, float(r.score)))
        return [tuple(_drop_overlaps(p, self._rank)) for p in per]


def _drop_overlaps(raws: list[Raw], rank: Callable[[str], int]) -> list[Raw]:
    """Keep the best of overlapping findings: most sensitive level, then score, then longest.

    (The password inside `https://user:pw@host` also looks like an e-mail; the secret wins.)
    """
    kept: list[Raw] = []
    for r in sorted(raws, key=lambda r: (-rank(r[0]), -r[3], -(r[2] - r[1]), r[1])):
        if all(r[2] <= k[1] or r[1] >= k[2] for k in kept):
            kept.append(r)
    return sorted(kept, key=lambda r: r[1])


class NullSensitivityClassifier:
    """`privacy.enabled: false`: nothing is scanned, every request is level `none`."""

    runs_inline = True

    def classify(self, body: dict[str, Any]) -> SensitivityFinding:
        return SensitivityFinding(level="none", evidence={"disabled": True})


def build_sensitivity_classifier(cfg: PrivacyConfig) -> PresidioSensitivityClassifier | NullSensitivityClassifier:
    """Built once per policy (slow: loads spaCy). Raises PrivacyStartupError on a bad model."""
    if not cfg.enabled:
        return NullSensitivityClassifier()
    return PresidioSensitivityClassifier(cfg)
