"""FastNer must find exactly the entities spaCy's own decoder finds, on real prompts and edge cases."""

from __future__ import annotations

import json

import numpy as np
import pytest
import spacy
from thinc.api import Linear, chain

from gateway.classify.sensitivity import PresidioSensitivityClassifier
from gateway.privacy.fast_ner import FastNer
from gateway.privacy.fast_tok2vec import FastTok2Vec
from gateway.privacy.ner_windows import MARGIN, candidate_windows
from tests.routing_data import LABELLED_PROMPTS

ROUTING = LABELLED_PROMPTS


def _ents(doc: spacy.tokens.Doc) -> list[tuple[int, int, str]]:
    return [(e.start, e.end, e.label_) for e in doc.ents]


@pytest.fixture(scope="module")
def nlp(classifier: PresidioSensitivityClassifier) -> spacy.Language:
    return classifier.ner_pipeline()


@pytest.fixture(scope="module")
def fast(nlp: spacy.Language) -> FastNer:
    f = FastNer.for_pipe(nlp)
    assert f is not None, "the default model's NER should have the shape FastNer decodes"
    return f


def _prompts(n: int) -> list[str]:
    # MMLU history/law/geography questions and GSM8K word problems: many names, places, dates.
    lines = ROUTING.read_text(encoding="utf-8").splitlines()
    return [json.loads(line)["prompt"][:1500] for line in lines[:: max(1, len(lines) // n)][:n]]


def test_same_entities_as_spacy_on_real_prompts(nlp: spacy.Language, fast: FastNer) -> None:
    texts = _prompts(250)
    found = 0
    for text in texts:
        expected = _ents(nlp(text))
        assert _ents(fast(nlp.make_doc(text))) == expected, text[:200]
        found += len(expected)
    assert found > 300  # the comparison means something only if spaCy found plenty


@pytest.mark.parametrize(
    "text",
    [
        "",
        " ",
        "Paris",
        "John Smith",  # an entity ending on the last token (Last is the only valid move there)
        "Hello  \n\n John Smith\n",  # whitespace tokens: no entity may begin on them
        "Flights from New York City to the United States of America\n\nMaria Garcia",
        "Call Dr. Ana María López-Ortega at the Hôpital Saint-Louis in Paris on 3 May 2024.",
        "EU US UK NASA IBM, Germans and Norwegians met in Tromsø on Monday.",
    ],
)
def test_same_entities_as_spacy_on_edge_cases(nlp: spacy.Language, fast: FastNer, text: str) -> None:
    assert _ents(fast(nlp.make_doc(text))) == _ents(nlp(text))


def test_other_pipelines_are_left_to_spacy() -> None:
    assert FastNer.for_pipe(spacy.blank("en")) is None


def test_the_analyzer_parses_with_it(classifier: PresidioSensitivityClassifier, nlp: spacy.Language) -> None:
    text = "Maria Garcia flew from Lisbon to Boston with two Canadians."
    doc = classifier.parse(text)
    assert _ents(doc) == _ents(nlp(text))
    assert {e.label_ for e in doc.ents} >= {"PERSON", "GPE", "NORP"}


def test_windows_cover_only_the_stretches_around_capitalised_words(nlp: spacy.Language) -> None:
    plain = nlp.make_doc("please summarise the report and list the follow-up actions for the team. " * 4)
    assert candidate_windows(plain) == []  # nothing NER could call a name: NER does not run
    doc = nlp.make_doc("Hi, I am Maria Gonzalez. " + "please summarise the report and list the actions. " * 6)
    (start, end), = candidate_windows(doc)
    maria = next(t.i for t in doc if t.text == "Maria")
    assert start == 0 and end == next(t.i for t in doc if t.text == "Gonzalez") + 1 + MARGIN
    assert maria < end < len(doc) // 2
    dense = nlp.make_doc("Maria met Ahmed in Lisbon, then Olga in Kyiv and Tomás in Quito.")
    assert candidate_windows(dense) == [(0, len(dense))]  # nearly all of it: one exact whole pass


def test_windowed_decoding_finds_the_same_names_and_places(nlp: spacy.Language, fast: FastNer) -> None:
    keep = {"PERSON", "GPE", "LOC", "FAC", "NORP"}
    same = total = 0
    for text in _prompts(250):
        doc = nlp.make_doc(text)
        whole = {(e.start, e.end, e.label_) for e in fast(nlp.make_doc(text)).ents if e.label_ in keep}
        windowed = {(e.start, e.end, e.label_) for e in fast(doc, candidate_windows(doc)).ents if e.label_ in keep}
        same += len(whole & windowed)
        total += len(whole | windowed)
    # Measured 0.988 on a 1,020-prompt sample; the differences are lower-case words spaCy calls
    # places or people in maths and code ("pqr", "f(x)$"), which windows skip.
    assert total > 200 and same / total >= 0.97


def test_token_vectors_are_bitwise_thincs(nlp: spacy.Language) -> None:
    tok2vec = nlp.get_pipe("ner").model.get_ref("tok2vec")
    fast_tok2vec = FastTok2Vec.for_model(tok2vec)
    assert fast_tok2vec is not None, "the default model's tok2vec should have the shape FastTok2Vec runs"
    for text in [*_prompts(120), "Paris", "Hi, I am Maria Gonzalez. " + "please list the actions. " * 6]:
        doc = nlp.make_doc(text)
        for windows in ([(0, len(doc))], candidate_windows(doc)):
            if not windows:
                continue
            expected = tok2vec.predict([doc[a:b].as_doc() for a, b in windows])  # thinc, one Doc per window
            features = doc.to_array(fast_tok2vec.columns).astype("uint64")
            got = fast_tok2vec([features[a:b] for a, b in windows])
            assert got.dtype == expected.dtype and np.array_equal(got, expected), text[:100]


def test_other_tok2vec_shapes_are_left_to_thinc() -> None:
    assert FastTok2Vec.for_model(chain(Linear(4, 4), Linear(4, 4), Linear(4, 4))) is None
    assert FastTok2Vec.for_model(Linear(4, 4)) is None
