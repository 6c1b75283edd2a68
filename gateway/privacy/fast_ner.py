"""spaCy's greedy NER decoding, vectorised: the same entities in a fraction of the time.

spaCy's transition-based NER scores one state at a time in a C loop that, measured on this
machine with en_core_web_sm, costs about 50 us per token (half of NER's time on a 1 KB prompt;
most of it in checking which of the 74 moves are valid). The network itself is small: per token
a sum of three precomputed feature vectors, a maxout and a 64 x 74 layer. Outside an entity the
features do not depend on earlier decisions (the "entity start" and "previous token" slots hold
padding), so those scores are computed for every token in one matrix product; only tokens inside
an open entity need a step of their own. The decisions, including spaCy's validity rules and its
tie-breaking (first best move wins), are spaCy's own, so the result is identical; the test suite
checks that on a corpus against spaCy's decoder.

Only the architecture this was written against is accepted (`spacy.TransitionBasedParser.v2`,
state type `ner`, three features, a maxout of 2+ pieces, no unseen classes, no preset entities);
anything else is left to spaCy, see `FastNer.for_pipe`.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from spacy.language import Language
from spacy.pipeline import EntityRecognizer
from spacy.tokens import Doc, Span

from gateway.privacy.fast_tok2vec import FastTok2Vec

_ARCHITECTURE = "spacy.TransitionBasedParser.v2"


class FastNer:
    """Decodes a Doc's entities with the weights of a spaCy `ner` pipe."""

    def __init__(self, pipe: EntityRecognizer) -> None:
        model = pipe.model
        self._tok2vec = model.get_ref("tok2vec")
        self._fast_tok2vec = FastTok2Vec.for_model(self._tok2vec)
        lower, upper = model.get_ref("lower"), model.get_ref("upper")
        w = lower.get_param("W")  # (nF, nO, nP, nI)
        self._nf, self._no, self._np, ni = w.shape
        # (nI, nF * nO * nP): one product gives every token's contribution to every feature slot.
        self._lower_w = np.ascontiguousarray(w.reshape(-1, ni).T)
        self._lower_b = lower.get_param("b").reshape(-1)
        self._pad = lower.get_param("pad").reshape(self._nf, -1)
        self._upper_w = np.ascontiguousarray(upper.get_param("W").T)  # (nO, n_moves)
        self._upper_b = upper.get_param("b")
        names = [pipe.moves.get_class_name(i) for i in range(pipe.moves.n_moves)]
        acts = [n.split("-", 1)[0] for n in names]
        labels = [n.split("-", 1)[1] if "-" in n else "" for n in names]
        n_moves = len(names)
        self._labels = labels
        self._acts = acts

        def mask(pred: Callable[[str, str], object]) -> np.ndarray:
            return np.array([bool(pred(a, lab)) for a, lab in zip(acts, labels, strict=True)], dtype=bool)

        # Validity masks when no entity is open, by position kind (Out/Begin/Unit rules of
        # spacy/pipeline/_parser_internals/ner.pyx; no preset entities, no sentence starts set).
        self._closed_ok = mask(lambda a, lab: a == "O" or (a in ("B", "U") and lab))
        self._closed_last = mask(lambda a, lab: a == "O" or (a == "U" and lab))
        self._closed_space = mask(lambda a, lab: a == "O")
        # Inside an entity of label L: In (not on the last token) or Last, same label only.
        def inside(lab: str) -> Callable[[str, str], bool]:
            return lambda a, l2: a in ("I", "L") and l2 == lab

        def last(lab: str) -> Callable[[str, str], bool]:
            return lambda a, l2: a == "L" and l2 == lab

        self._open_ok = {lab: mask(inside(lab)) for lab in set(labels) if lab}
        self._open_last = {lab: mask(last(lab)) for lab in set(labels) if lab}
        self._neg = np.full(n_moves, -np.inf, dtype="f")

    @classmethod
    def for_pipe(cls, nlp: Language, name: str = "ner") -> FastNer | None:
        """A FastNer for the pipeline's NER, or None when its shape is not the one handled here."""
        if name not in nlp.pipe_names:
            return None
        pipe = nlp.get_pipe(name)
        cfg = nlp.config["components"][name].get("model", {})
        if not isinstance(pipe, EntityRecognizer) or cfg.get("@architectures") != _ARCHITECTURE:
            return None
        if cfg.get("state_type") != "ner" or pipe.cfg.get("beam_width", 1) != 1:
            return None
        model = pipe.model
        if model.attrs.get("unseen_classes") or not model.attrs.get("has_upper", False):
            return None
        n_features, _, n_pieces, _ = model.get_ref("lower").get_param("W").shape
        if n_features != 3 or n_pieces < 2:  # the NER feature set, and a real maxout (as tested)
            return None
        return cls(pipe)

    def _scores(self, pre: np.ndarray) -> np.ndarray:
        hidden = pre.reshape(*pre.shape[:-1], self._no, self._np).max(axis=-1)
        return hidden @ self._upper_w + self._upper_b

    def __call__(self, doc: Doc, windows: list[tuple[int, int]] | None = None) -> Doc:
        """Sets doc.ents. With `windows` (token ranges), NER reads only those (see ner_windows)."""
        n = len(doc)
        if windows is None:
            windows = [(0, n)] if n else []
        if not windows:
            doc.ents = []
            return doc
        tokvecs = self._tokvecs(doc, windows)  # the windows' rows, one after the other
        feats_all = (tokvecs @ self._lower_w).reshape(len(tokvecs), self._nf, -1)  # (tokens, nF, nO*nP)
        spaces = {t.i for t in doc if t.is_space}
        ents: list[Span] = []
        row = 0
        for start, end in windows:
            feats = feats_all[row : row + end - start]
            row += end - start
            for a, b, label in self._decode(feats, [i - start for i in spaces if start <= i < end]):
                ents.append(Span(doc, start + a, start + b, label=label))
        doc.ents = ents
        return doc

    def _tokvecs(self, doc: Doc, windows: list[tuple[int, int]]) -> np.ndarray:
        if self._fast_tok2vec is None:
            # Copies: spaCy's feature extractor reads Docs (Span.to_array refuses its attribute names).
            n = len(doc)
            return self._tok2vec.predict([doc if w == (0, n) else doc[w[0] : w[1]].as_doc() for w in windows])
        # A window's rows of the Doc's feature array are what its copy would give (the columns
        # are lexical attributes), without building a Doc per window (~2 ms per KB of prompt).
        features = doc.to_array(self._fast_tok2vec.columns).astype("uint64", copy=False)
        return self._fast_tok2vec([features[start:end] for start, end in windows])

    def _decode(self, feats: np.ndarray, spaces: list[int]) -> list[tuple[int, int, str]]:
        n = len(feats)
        # Scores when no entity is open: features (token, pad, pad); the best valid move of every
        # token in that state comes out of one masked argmax.
        closed = self._scores(feats[:, 0] + self._pad[1] + self._pad[2] + self._lower_b)
        ok = np.broadcast_to(self._closed_ok, closed.shape).copy()
        ok[n - 1] = self._closed_last
        ok[spaces] = self._closed_space
        best_closed = np.argmax(np.where(ok, closed, self._neg), axis=1).tolist()
        acts, labels = self._acts, self._labels
        ents: list[tuple[int, int, str]] = []
        i = 0
        while i < n:
            move = best_closed[i]
            act, label = acts[move], labels[move]
            if act == "U":
                ents.append((i, i + 1, label))
            if act != "B":
                i += 1
                continue
            start = i
            i += 1
            # Inside the entity: features (token, entity start, previous token), one step each.
            while i < n:
                pre = feats[i, 0] + feats[start, 1] + feats[i - 1, 2] + self._lower_b
                masks = self._open_last if i == n - 1 else self._open_ok
                move = int(np.argmax(np.where(masks[label], self._scores(pre), self._neg)))
                i += 1
                if acts[move] == "L":
                    break
            ents.append((start, i, label))
        return ents
