"""SentencePiece (``tokenizer.ggml.model = llama``) tokenizers from GGUF metadata, against
transformers reading the same tiny GGUF that the test writes with the ``gguf`` writer."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest

from local_engine.store import GGUFStore
from local_engine.tokenizer import StreamDecoder, from_gguf

PIECES = ["\u2581", "e", "h", "l", "o", "w", "r", "d", "t", "s", "\u2581h", "he", "ll", "\u2581he", "llo",
          "\u2581hello", "\u2581w", "or", "\u2581wor", "ld", "\u2581world", "\u2581t", "\u2581te", "st", "\u2581test",
          "\u2581\u2581", "\u2581\u2581\u2581"]
SAMPLES = ["hello world", " hello  world", "test\nworld", "héllo wörld ✓", "hello<s>world</s>", "",
           "   ", "t e s t", "hello 🌍"]


def _write(path: Path, *, with_merges: bool, add_space_prefix: bool | None = None) -> Path:
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + PIECES
    types = [2, 3, 3] + [6] * 256 + [1] * len(PIECES)  # UNKNOWN, CONTROL, BYTE, NORMAL
    scores = [0.0] * (3 + 256) + [-float(i) for i in range(len(PIECES))]
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(1)
    w.add_context_length(64)
    w.add_embedding_length(32)
    w.add_feed_forward_length(64)
    w.add_head_count(2)
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    if with_merges:  # some converters write merges for SentencePiece vocabularies too
        w.add_token_merges(["\u2581 h", "h e", "l l", "\u2581h e", "ll o", "\u2581he llo", "\u2581 w", "o r",
                            "\u2581w or", "l d", "\u2581wor ld"])
    if add_space_prefix is not None:
        w.add_add_space_prefix(add_space_prefix)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_tensor("token_embd.weight", np.zeros((len(tokens), 32), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.mark.parametrize("with_merges", [False, True])
def test_matches_transformers(tmp_path: Path, with_merges: bool) -> None:
    from transformers import AutoTokenizer

    path = _write(tmp_path / "spm.gguf", with_merges=with_merges)
    ours = from_gguf(GGUFStore(path))
    ref = AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
    for text in SAMPLES:
        want = ref(text)["input_ids"]
        assert ours.encode(text, add_special=True) == want, text
        assert ours.decode(want) == ref.decode(want, skip_special_tokens=True), text
    assert ours.bos_id == 1 and ours.eos_id == 2 and 2 in ours.stop_ids
    # merged pieces are used (not just bytes), unknown characters fall back to byte tokens
    ids = ours.encode("hello world")
    assert [ours.token_str(i) for i in ids] == ["\u2581hello", "\u2581world"]
    assert "<0xC3>" in [ours.token_str(i) for i in ours.encode("é")]


def test_no_space_prefix_flag(tmp_path: Path) -> None:
    path = _write(tmp_path / "spm.gguf", with_merges=False, add_space_prefix=False)
    tok = from_gguf(GGUFStore(path))
    assert tok.token_str(tok.encode("hello")[0]) != "\u2581hello"
    assert tok.decode(tok.encode(" hello world")) == " hello world"


def test_streaming_decoder_rebuilds_text(tmp_path: Path) -> None:
    tok = from_gguf(GGUFStore(_write(tmp_path / "spm.gguf", with_merges=False)))
    text = "hello wörld 🌍 test"
    dec = StreamDecoder(tok)
    out = "".join(dec.push(i) for i in tok.encode(text)) + dec.flush()
    assert out == text
