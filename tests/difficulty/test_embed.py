"""The static embedder: MiniLM's input word-piece table, mean-pooled, read from the installed wheel."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from safetensors.numpy import load_file

from gateway.classify.difficulty.embed import (
    EmbeddingUnavailable,
    StaticEmbedder,
    model_dir,
    shared_embedder,
)


@pytest.fixture(scope="module")
def static() -> StaticEmbedder:
    return StaticEmbedder(max_tokens=16)


@pytest.fixture(scope="module")
def table_and_vocab() -> tuple[np.ndarray, dict[str, int]]:
    # read independently of the embedder: the raw tensor file and the plain-text vocabulary
    path = model_dir()
    table = load_file(str(path / "model.safetensors"))["embeddings.word_embeddings.weight"]
    vocab = {w: i for i, w in enumerate((path / "vocab.txt").read_text(encoding="utf-8").splitlines())}
    return table, vocab


def test_embedding_is_the_normalised_mean_of_the_word_piece_rows(static, table_and_vocab):
    table, vocab = table_and_vocab
    expected = table[[vocab["prove"], vocab["the"], vocab["theorem"]]].mean(0)
    expected /= np.linalg.norm(expected)
    got = static.embed("Prove the THEOREM")  # the tokenizer lower-cases; no [CLS] / [SEP] rows
    assert got.dtype == np.float32 and got.shape == (384,)
    assert np.allclose(got, expected, atol=1e-6)


def test_no_padding_rows_and_truncation_at_max_tokens(static, table_and_vocab):
    table, vocab = table_and_vocab
    one = table[vocab["hello"]] / np.linalg.norm(table[vocab["hello"]])
    assert np.allclose(static.embed("hello"), one, atol=1e-6)  # the shipped tokenizer.json pads to 128
    long = " ".join(["cat"] * 16 + ["dog"] * 50)
    assert np.allclose(static.embed(long), static.embed("cat " * 16), atol=1e-6)  # only 16 pieces kept


def test_empty_text_is_a_zero_vector(static):
    assert not static.embed("").any() and not static.embed("   ").any()


def test_batched_rows_equal_single_calls_and_threads_agree(static):
    texts = ["What is 2 + 2?", "Summarise the causes of the French revolution.", "", "日本の首都はどこですか"] * 3
    batched = static.embed_many(texts, batch_size=5)
    with ThreadPoolExecutor(4) as pool:
        threaded = list(pool.map(static.embed, texts))
    assert np.array_equal(batched, np.asarray(threaded))  # bit-identical: no batching effects


def test_shared_embedder_is_one_object_per_kind_and_cap():
    a = shared_embedder(max_tokens=256, kind="static")
    assert shared_embedder(max_tokens=256, kind="static") is a
    assert shared_embedder(max_tokens=64, kind="static") is not a
    with pytest.raises(EmbeddingUnavailable, match="unknown embedding kind"):
        shared_embedder(kind="word2vec")


def test_missing_package_is_a_clear_error():
    with pytest.raises(EmbeddingUnavailable, match="no_such_pkg"):
        StaticEmbedder("no_such_pkg")


def test_huge_prompt_costs_no_more_than_its_first_pieces():
    emb = StaticEmbedder(max_tokens=256)
    huge = "Explain the proof of the theorem in detail. " * 25_000  # ~1.1 MB
    assert np.array_equal(emb.embed(huge), emb.embed(huge[:10_000]))
    t = time.perf_counter()
    emb.embed(huge)
    assert time.perf_counter() - t < 0.05  # tokenising the whole megabyte takes ~100+ ms
