"""Builds the presidio AnalyzerEngine once, tuned for latency, never touching the network.

Measured on this 2-core machine for a 1 KB prompt (benchmarks/pii_eval.py has the figures):
presidio's defaults spend most of their time in places we replace here:
- the full spaCy pipeline (tagger, parser, lemmatizer, and the shared tok2vec that only feeds
  them): we keep only ner, which carries its own tok2vec;
- spaCy's NER decoding loop: fast_ner.FastNer decodes the same entities vectorised;
- thinc's matrix products through the `blis` wheel, 3-5x slower here than numpy's OpenBLAS for
  NER's small matrices: the pipeline is loaded with numpy's, single-threaded (see load_spacy);
- CreditCardRecognizer, whose prefixes are a subset of cards.py's issuer table: CardNumberRecognizer;
- PhoneRecognizer, which runs phonenumbers' matcher once per region: FastPhoneRecognizer;
- the lemma context enhancer, which re-iterates the spaCy Doc for every finding and deep-copies
  every result: FastContextEnhancer;
"""

from __future__ import annotations

import bisect
import copy
from pathlib import Path
from typing import Any

import regex
import spacy
import structlog
from presidio_analyzer import (
    AnalyzerEngine,
    EntityRecognizer,
    PatternRecognizer,
    RecognizerRegistry,
    RecognizerResult,
)
from presidio_analyzer.context_aware_enhancers import ContextAwareEnhancer, LemmaContextAwareEnhancer
from presidio_analyzer.nlp_engine import NerModelConfiguration, NlpArtifacts, SpacyNlpEngine
from presidio_analyzer.predefined_recognizers import (
    CryptoRecognizer,
    DateRecognizer,
    IbanRecognizer,
    IpRecognizer,
    MacAddressRecognizer,
    MedicalLicenseRecognizer,
    SpacyRecognizer,
    UrlRecognizer,
    UsBankRecognizer,
    UsItinRecognizer,
    UsLicenseRecognizer,
    UsPassportRecognizer,
    UsSsnRecognizer,
    UuidRecognizer,
)
from spacy.attrs import IDX, IS_PUNCT, IS_STOP, LEMMA, LENGTH, LOWER
from spacy.tokens import Doc
from thinc.api import use_ops
from threadpoolctl import threadpool_limits

from gateway.privacy.config import PrivacyConfig
from gateway.privacy.credentials import CREDENTIAL_FORMATS
from gateway.privacy.fast_ner import FastNer
from gateway.privacy.ner_fixes import NER_SCORE, corrected_entities
from gateway.privacy.ner_windows import candidate_windows
from gateway.privacy.overlaps import by_priority
from gateway.privacy.recognizers import (
    CardNumberRecognizer,
    FastPhoneRecognizer,
    NationalityRecognizer,
    OfflineEmailRecognizer,
    PersonCueRecognizer,
    PlaceRecognizer,
    SecretRecognizer,
    StreetAddressRecognizer,
    custom_recognizers,
)
from gateway.privacy.regex_gate import gate

log = structlog.get_logger("gateway.privacy.engine")

# Components that NER does not need; excluding them roughly halves spaCy's time per request.
_NON_NER_PIPES = ("tagger", "morphologizer", "parser", "attribute_ruler", "lemmatizer", "senter", "trainable_lemmatizer")

# spaCy labels that never become findings (presidio's own defaults, plus ORG: too many false positives).
_IGNORED_LABELS = [
    "ORGANIZATION",
    "ORG",
    "CARDINAL",
    "EVENT",
    "LANGUAGE",
    "LAW",
    "MONEY",
    "ORDINAL",
    "PERCENT",
    "PRODUCT",
    "QUANTITY",
    "WORK_OF_ART",
]


# What spaCy NER contributes (DATE_TIME too, but it is not sensitive by default).
_NER_ENTITIES = ("PERSON", "LOCATION", "NRP")


class PrivacyStartupError(RuntimeError):
    """The privacy configuration cannot be turned into a working analyzer (e.g. model missing)."""


class _LoadedSpacyEngine(SpacyNlpEngine):
    """presidio's spaCy engine around a pipeline we loaded ourselves.

    presidio's `load()` downloads a missing model; ours is handed an already-loaded pipeline.
    Without a lemmatizer, lemmas are the lower-cased tokens, which is what context words need.
    Artifacts carry precomputed token ends and a keyword set for FastContextEnhancer.
    A NER-only pipeline of the usual shape is decoded by FastNer; any other runs as spaCy runs it.
    """

    def __init__(self, nlp: spacy.Language, name: str, windowed: bool = False) -> None:
        super().__init__(
            models=[{"lang_code": "en", "model_name": name}],
            ner_model_configuration=NerModelConfiguration(labels_to_ignore=_IGNORED_LABELS),
        )
        self._loaded = nlp
        self._fast_ner = FastNer.for_pipe(nlp) if nlp.pipe_names == ["ner"] else None
        self._windowed = windowed
        self.context_words: frozenset[str] = frozenset()  # set by build_analyzer from the recognizers

    def load(self) -> None:
        self.nlp = {"en": self._loaded}  # type: ignore[assignment]  # presidio types it None until load()

    def parse(self, text: str) -> Doc:
        """The Doc presidio reads: tokens, and entities where the pipeline has NER."""
        if self._fast_ner is None:
            return self._loaded(text)
        doc = self._loaded.make_doc(text)
        return self._fast_ner(doc, candidate_windows(doc) if self._windowed else None)

    def process_text(self, text: str, language: str) -> NlpArtifacts:
        return self._doc_to_nlp_artifact(self.parse(text), language)

    def _doc_to_nlp_artifact(self, doc: spacy.tokens.Doc, language: str) -> NlpArtifacts:
        # presidio walks the Doc token by token several times (lemmas, offsets, keywords); on a
        # 1 KB prompt that costs as much as NER itself. One vectorised to_array pass instead.
        cols = doc.to_array([IDX, LENGTH, LOWER, LEMMA, IS_STOP, IS_PUNCT])
        strings = doc.vocab.strings
        has_lemma = bool(cols[:, 3].any())  # doc.has_annotation("LEMMA"), without a Token object per word
        lemmas = [strings[int(h)].lower() for h in (cols[:, 3] if has_lemma else cols[:, 2])]
        starts = cols[:, 0].tolist()
        ends = (cols[:, 0] + cols[:, 1]).tolist()
        # presidio drops stop words from the context keywords, but spaCy's stop list holds context
        # words recognizers rely on ("call" for phones, "name" for names): those are kept.
        wanted = self.context_words
        keywords = [
            part
            for lemma, stop, punct in zip(lemmas, cols[:, 4].tolist(), cols[:, 5].tolist(), strict=True)
            if (not stop or lemma in wanted) and not punct and lemma not in ("-pron-", "be")
            for part in lemma.split(":")
        ]
        score = self.ner_model_configuration.default_score
        entities, scores = self._get_updated_entities(*corrected_entities(doc, NER_SCORE if score is None else score))
        artifacts = NlpArtifacts(
            entities=entities,
            tokens=doc,
            tokens_indices=starts,
            lemmas=lemmas,
            nlp_engine=None,  # skips presidio's per-token keyword pass; we set keywords below
            language=language,
            scores=scores,
        )
        artifacts.nlp_engine = self
        artifacts.keywords = keywords
        artifacts._fast_ctx = (ends, lemmas, set(keywords))  # type: ignore[attr-defined]
        return artifacts


class FastContextEnhancer(LemmaContextAwareEnhancer):
    """presidio's lemma context enhancer with O(log n) token lookup and set membership.

    The original scans the spaCy Doc from the start for every finding and checks keywords
    against a list: quadratic in practice, tens of ms on a 1 KB prompt with many findings.
    """

    def enhance_using_context(
        self,
        text: str,
        raw_results: list[RecognizerResult],
        nlp_artifacts: NlpArtifacts,
        recognizers: list[EntityRecognizer],
        context: list[str] | None = None,
    ) -> list[RecognizerResult]:
        # The parent deep-copies every result before looking at it (~1-2 ms per KB of prompt):
        # only results of recognizers that declare context words can change, and of those only
        # the score, the explanation and the metadata, so only those are copied.
        if nlp_artifacts is None:
            return list(raw_results)
        by_id = {r.id: r for r in recognizers if r.context}
        key = RecognizerResult.RECOGNIZER_IDENTIFIER_KEY
        enhanced_key = RecognizerResult.IS_SCORE_ENHANCED_BY_CONTEXT_KEY
        extra = [w.lower() for w in context or ()]
        out: list[RecognizerResult] = []
        for raw in raw_results:
            meta = raw.recognition_metadata or {}
            recognizer = by_id.get(meta.get(key))
            if recognizer is None or meta.get(enhanced_key):
                out.append(raw)
                continue
            words = self._extract_surrounding_words(nlp_artifacts, text[raw.start : raw.end], raw.start) + extra
            support = self._find_supportive_word_in_context(words, recognizer.context, self.context_matching_mode)
            if not support:
                out.append(raw)
                continue
            result = copy.copy(raw)
            result.recognition_metadata = dict(meta)
            score = min(max(raw.score + self.context_similarity_factor, self.min_score_with_context_similarity),
                        ContextAwareEnhancer.MAX_SCORE)
            result.score = score
            if raw.analysis_explanation is not None:
                result.analysis_explanation = copy.copy(raw.analysis_explanation)
                result.analysis_explanation.set_supportive_context_word(support)
                result.analysis_explanation.set_improved_score(score)
            out.append(result)
        return out

    def _extract_surrounding_words(self, nlp_artifacts: NlpArtifacts, word: str, start: int) -> list[str]:
        if not nlp_artifacts.tokens:
            return [""]
        cache = getattr(nlp_artifacts, "_fast_ctx", None)
        if cache is None:
            ends = [i + len(t) for i, t in zip(nlp_artifacts.tokens_indices, nlp_artifacts.tokens, strict=False)]
            lemmas = [lemma.lower() for lemma in nlp_artifacts.lemmas]
            cache = (ends, lemmas, set(nlp_artifacts.keywords))
            nlp_artifacts._fast_ctx = cache  # type: ignore[attr-defined]
        ends, lemmas, keywords = cache
        index = min(bisect.bisect_right(ends, start), len(ends) - 1)
        words: set[str] = set()
        for step, count in ((-1, self.context_prefix_count), (1, self.context_suffix_count)):
            i, remaining = index, count + 1
            while 0 <= i < len(lemmas) and remaining > 0:
                if lemmas[i] in keywords:
                    words.add(lemmas[i])
                    remaining -= 1
                i += step
        return list(words)


class PrivacyAnalyzer(AnalyzerEngine):
    """presidio's engine, with overlaps resolved by type first: a secret, then a card number,
    keeps its whole span against any other finding (gateway/privacy/overlaps.py)."""

    SECRET_ENTITIES = frozenset(f.entity for f in CREDENTIAL_FORMATS)

    def analyze(self, text: str, language: str, *args: Any, **kwargs: Any) -> list[RecognizerResult]:
        return by_priority(text, super().analyze(text, language, *args, **kwargs), self.SECRET_ENTITIES)


def _check_installed(name: str) -> None:
    if name != "none" and not (spacy.util.is_package(name) or Path(name).is_dir()):
        raise PrivacyStartupError(
            f"privacy.nlp_model: spaCy model {name!r} is not installed. Install its package "
            "(nothing is downloaded at run time), or set `nlp_model: none` for pattern recognizers only."
        )


def load_spacy(name: str) -> spacy.Language:
    """The NER-only pipeline of an installed model, or a blank English tokenizer for `none`."""
    if name == "none":
        return spacy.blank("en")
    _check_installed(name)
    # NER multiplies small matrices (a few hundred rows by 64-384 columns). OpenBLAS does that
    # 3-5x faster than blis here, but only single-threaded: its worker threads spin on the cores
    # the event loop needs, and under load a 1 KB analysis took 4x longer with them.
    threadpool_limits(1, user_api="blas")
    try:
        with use_ops("numpy", use_blis=False):
            nlp = spacy.load(name, exclude=list(_NON_NER_PIPES))
    except Exception as exc:  # a broken package is a configuration problem, report it as one
        raise PrivacyStartupError(f"privacy.nlp_model: cannot load spaCy model {name!r}: {exc}") from exc
    _drop_unheard_embedders(nlp)
    return nlp


def _drop_unheard_embedders(nlp: spacy.Language) -> None:
    """Remove shared embedding components (tok2vec, transformer) that no loaded pipe listens to.

    In the en_core_web_sm/md/lg 3.x packages the NER has its own internal tok2vec; the shared
    `tok2vec` only feeds the tagger and parser we exclude. Running it anyway cost ~13 ms CPU per
    1 KB prompt here (a third of the whole analysis) for output nobody reads. Models whose NER
    does listen to it (e.g. transformer pipelines) keep it.
    """
    for pipe_name, pipe in list(nlp.pipeline):
        listeners = getattr(pipe, "listening_components", None)
        if listeners is not None and not listeners:
            nlp.remove_pipe(pipe_name)


def _recognizers(cfg: PrivacyConfig, with_ner: bool) -> list[EntityRecognizer]:
    recs: list[EntityRecognizer] = [
        UsBankRecognizer(),
        UsLicenseRecognizer(),
        UsItinRecognizer(),
        UsPassportRecognizer(),
        UsSsnRecognizer(),
        CryptoRecognizer(),
        DateRecognizer(),
        OfflineEmailRecognizer(),
        IbanRecognizer(),
        IpRecognizer(),
        MedicalLicenseRecognizer(),
        MacAddressRecognizer(),
        UuidRecognizer(),
        UrlRecognizer(),
        FastPhoneRecognizer(),
        SecretRecognizer(),
        CardNumberRecognizer(),
        StreetAddressRecognizer(),
        PlaceRecognizer(),
        NationalityRecognizer(),
        PersonCueRecognizer(),
        *custom_recognizers(cfg.recognizers),
    ]
    if with_ner:
        recs.append(SpacyRecognizer(supported_entities=[*_NER_ENTITIES, "DATE_TIME"]))
    return recs


def _gate_patterns(rec: PatternRecognizer) -> None:
    """Compile the recognizer's patterns as presidio would, each behind its regex gate (the same
    matches, found only where a match is possible: gateway/privacy/regex_gate.py)."""
    for pattern in rec.patterns:  # type: ignore[has-type]  # presidio sets it untyped
        pattern.compiled_regex = gate(regex.compile(pattern.regex, flags=rec.global_regex_flags))
        pattern.compiled_with_flags = rec.global_regex_flags


def build_analyzer(cfg: PrivacyConfig) -> tuple[AnalyzerEngine, list[str]]:
    """The engine and the entities worth asking it for (those whose level is above `none`)."""
    levels = cfg.effective_levels()
    # NER is most of the analysis time; a policy that grades none of its entities does not pay it.
    ner_wanted = any(levels.get(e, cfg.default_level) != "none" for e in _NER_ENTITIES)
    _check_installed(cfg.nlp_model)
    nlp = load_spacy(cfg.nlp_model if ner_wanted else "none")
    with_ner = "ner" in nlp.pipe_names
    registry = RecognizerRegistry(supported_languages=["en"])
    for rec in _recognizers(cfg, with_ner):
        if isinstance(rec, PatternRecognizer):
            _gate_patterns(rec)
        registry.add_recognizer(rec)
    supported = {e for r in registry.recognizers for e in r.supported_entities}
    wanted = sorted(e for e in supported if levels.get(e, cfg.default_level) != "none")
    # NER may read only the stretches around capitalised words (ner_windows) when what it finds
    # there is all the policy grades: names, places, nationalities, but not dates ("last week").
    windowed = levels.get("DATE_TIME", cfg.default_level) == "none"
    engine = _LoadedSpacyEngine(nlp, cfg.nlp_model, windowed=windowed)
    engine.context_words = frozenset(w.lower() for r in registry.recognizers for w in (r.context or ()))
    analyzer = PrivacyAnalyzer(
        registry=registry,
        nlp_engine=engine,
        supported_languages=["en"],
        default_score_threshold=cfg.score_threshold,
        context_aware_enhancer=FastContextEnhancer(),
    )
    decoder = "none" if not with_ner else "spacy" if engine._fast_ner is None else "fast-windowed" if windowed else "fast"
    log.info("privacy_analyzer_ready", model=cfg.nlp_model, pipes=",".join(nlp.pipe_names), ner=decoder,
             entities=len(wanted))
    return analyzer, wanted
