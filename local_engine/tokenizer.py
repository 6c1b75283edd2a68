"""Tokenizer from the model itself: GGUF metadata (byte-level BPE, or SentencePiece BPE for
``tokenizer.ggml.model = llama``) or an HF ``tokenizer.json``.

The GGUF path mirrors what ``transformers`` builds for the same file (GPT-2 style byte-level BPE,
the pre-tokenizer split named by ``tokenizer.ggml.pre``, control tokens as special tokens), so
token ids match HF's tokenization of the same GGUF.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

from local_engine.errors import ModelFileError, UnsupportedModel

_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_SPLITS = {"llama3": _LLAMA3_SPLIT, "llama-v3": _LLAMA3_SPLIT, "llama-bpe": _LLAMA3_SPLIT,
           "smaug-bpe": _LLAMA3_SPLIT, "dbrx": _LLAMA3_SPLIT, "qwen2": _QWEN2_SPLIT,
           "deepseek-r1-qwen": _QWEN2_SPLIT}

# tokens that end an assistant turn in the chat formats we know
END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "</s>", "<|eom_id|>")


def _bytes_to_unicode() -> dict[int, str]:
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs), strict=True))


@dataclass
class Tokenizer:
    tok: HFTokenizer
    bos_id: int | None = None
    eos_id: int | None = None
    add_bos: bool = False
    stop_ids: set[int] = field(default_factory=set)
    bos_token: str = ""
    eos_token: str = ""
    chat_template: str | None = None

    @property
    def vocab_size(self) -> int:
        return int(self.tok.get_vocab_size(with_added_tokens=True))

    def encode(self, text: str, add_special: bool = False) -> list[int]:
        ids = self.tok.encode(text, add_special_tokens=False).ids
        if add_special and self.add_bos and self.bos_id is not None:
            ids = [self.bos_id, *ids]
        return list(ids)

    def decode(self, ids: list[int], skip_special: bool = True) -> str:
        return str(self.tok.decode(ids, skip_special_tokens=skip_special))

    def token_str(self, i: int) -> str:
        return str(self.tok.id_to_token(i) or "")

    def _finish(self) -> Tokenizer:
        for t in END_OF_TURN:
            i = self.tok.token_to_id(t)
            if i is not None:
                self.stop_ids.add(int(i))
        if self.eos_id is not None:
            self.stop_ids.add(self.eos_id)
        if self.bos_id is not None:
            self.bos_token = self.token_str(self.bos_id)
        if self.eos_id is not None:
            self.eos_token = self.token_str(self.eos_id)
        return self


def _merges_from_scores(vocab: dict[str, int], scores: dict[str, float]) -> list[tuple[str, str]]:
    """The BPE merges a SentencePiece vocabulary implies: every split of a piece into two pieces,
    best piece score first (transformers' ``generate_merges``, so ids match HF's)."""
    merges: list[tuple[str, str, float]] = []
    for piece, score in scores.items():
        local = [(piece[:i], piece[i:], score) for i in range(1, len(piece))
                 if piece[:i] in vocab and piece[i:] in vocab]
        merges.extend(sorted(local, key=lambda x: (vocab[x[0]], vocab[x[1]])))
    merges.sort(key=lambda v: (v[2], len(v[0]), len(v[1])), reverse=True)
    return [(a, b) for a, b, _ in merges]


def _sentencepiece_from_gguf(store: Any, tokens: list[str], types: list[int]) -> HFTokenizer:
    """``tokenizer.ggml.model = llama`` (Llama 1/2, Mistral, TinyLlama...): SentencePiece BPE with
    byte fallback, built the way transformers' ``LlamaTokenizer`` is for the same GGUF."""
    m = store.info.metadata
    vocab = {t: i for i, t in enumerate(tokens)}
    # (large arrays are left out of info.metadata: ask the store)
    merges = store.array("tokenizer.ggml.merges")
    if merges:
        pairs = [tuple(mg.split(" ", 1)) for mg in merges]
    else:
        scores = store.array("tokenizer.ggml.scores")
        if not scores:
            raise ModelFileError(store.path, "SentencePiece tokenizer with neither merges nor scores")
        pairs = _merges_from_scores(vocab, dict(zip(tokens, (float(x) for x in scores), strict=False)))
    tok = HFTokenizer(models.BPE(vocab=vocab, merges=pairs, fuse_unk=True, byte_fallback=True))
    prefix = bool(m.get("tokenizer.ggml.add_space_prefix", True))
    tok.normalizer = None
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first" if prefix else "never",
                                                 split=False)
    steps = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    if prefix:
        steps.append(decoders.Strip(content=" ", left=1))
    tok.decoder = decoders.Sequence(steps)
    control = [AddedToken(t, normalized=False, special=True) for t, ty in zip(tokens, types, strict=False) if ty == 3]
    if control:
        tok.add_special_tokens(control)
    user = [AddedToken(t, normalized=False, special=False) for t, ty in zip(tokens, types, strict=False) if ty == 4]
    if user:
        tok.add_tokens(user)
    return tok


def from_gguf(store: Any) -> Tokenizer:
    m = store.info.metadata
    kind = m.get("tokenizer.ggml.model")
    if kind not in ("gpt2", "llama"):
        raise UnsupportedModel(store.path, f"tokenizer type {kind!r} (supported: byte-level BPE 'gpt2', "
                                           "SentencePiece BPE 'llama')")
    tokens: list[str] = store.array("tokenizer.ggml.tokens")
    types: list[int] = store.array("tokenizer.ggml.token_type")
    if not tokens:
        raise ModelFileError(store.path, "GGUF has no tokenizer vocabulary")
    if kind == "llama":
        bos, eos = m.get("tokenizer.ggml.bos_token_id"), m.get("tokenizer.ggml.eos_token_id")
        # llama.cpp (and transformers) add BOS to a SentencePiece vocabulary unless the file says not to
        t = Tokenizer(_sentencepiece_from_gguf(store, tokens, types), None if bos is None else int(bos),
                      None if eos is None else int(eos), bool(m.get("tokenizer.ggml.add_bos_token", True)),
                      chat_template=m.get("tokenizer.chat_template"))
        eot = m.get("tokenizer.ggml.eot_token_id")
        if eot is not None:
            t.stop_ids.add(int(eot))
        return t._finish()
    merges: list[str] = store.array("tokenizer.ggml.merges")
    if not merges:
        raise ModelFileError(store.path, "GGUF has no tokenizer vocabulary/merges")
    spelling = _bytes_to_unicode()
    alphabet = set(spelling.values())
    vocab = {(t if set(t) <= alphabet else "".join(spelling[b] for b in t.encode())): i for i, t in enumerate(tokens)}
    pairs = [(left, right) for left, _, right in (mg.partition(" ") for mg in merges)]
    bpe = models.BPE(vocab=vocab, merges=pairs, fuse_unk=False)
    tok = HFTokenizer(bpe)
    split = _SPLITS.get(m.get("tokenizer.ggml.pre", ""))
    if split is None:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    else:
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(split), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
    tok.decoder = decoders.ByteLevel()
    control = [AddedToken(t, normalized=False, special=True)
               for t, ty in zip(tokens, types, strict=False) if ty == 3 and set(t) <= alphabet]
    if control:
        tok.add_special_tokens(control)
    user = [AddedToken(t, normalized=False, special=False)
            for t, ty in zip(tokens, types, strict=False) if ty == 4 and t in vocab]
    if user:
        tok.add_tokens(user)
    bos = m.get("tokenizer.ggml.bos_token_id")
    eos = m.get("tokenizer.ggml.eos_token_id")
    eot = m.get("tokenizer.ggml.eot_token_id")
    t = Tokenizer(tok, None if bos is None else int(bos), None if eos is None else int(eos),
                  bool(m.get("tokenizer.ggml.add_bos_token", False)),
                  chat_template=m.get("tokenizer.chat_template"))
    if eot is not None:
        t.stop_ids.add(int(eot))
    return t._finish()


def _token_content(v: Any) -> str | None:
    if isinstance(v, dict):
        return v.get("content")
    return v if isinstance(v, str) else None


def from_hf_dir(path: Path) -> Tokenizer:
    tj = path / "tokenizer.json"
    if not tj.is_file():
        raise ModelFileError(path, "no tokenizer.json in the model directory")
    try:
        tok = HFTokenizer.from_file(str(tj))
    except Exception as e:
        raise ModelFileError(tj, f"cannot load tokenizer ({e})") from None
    cfg: dict[str, Any] = {}
    tc = path / "tokenizer_config.json"
    if tc.is_file():
        cfg = json.loads(tc.read_text())
    template = cfg.get("chat_template")
    jt = path / "chat_template.jinja"
    if template is None and jt.is_file():
        template = jt.read_text()
    bos_s, eos_s = _token_content(cfg.get("bos_token")), _token_content(cfg.get("eos_token"))
    bos = tok.token_to_id(bos_s) if bos_s else None
    eos = tok.token_to_id(eos_s) if eos_s else None
    t = Tokenizer(tok, bos, eos, bool(cfg.get("add_bos_token", False)), chat_template=template)
    gc = path / "generation_config.json"
    if gc.is_file():
        eos_ids = json.loads(gc.read_text()).get("eos_token_id")
        for i in eos_ids if isinstance(eos_ids, list) else [eos_ids] if eos_ids is not None else []:
            t.stop_ids.add(int(i))
    return t._finish()


class StreamDecoder:
    """Turns token ids into text deltas without splitting a UTF-8 character across deltas.

    Byte-level BPE tokens can end inside a multi-byte character; decoding such a prefix yields
    U+FFFD. We hold text back until the decoded window no longer ends in a replacement char.
    """

    def __init__(self, tok: Tokenizer) -> None:
        self.tok = tok
        self.ids: list[int] = []
        self.prefix = 0  # start of the window re-decoded each step (keeps it O(window))
        self.read = 0  # ids before this are already emitted

    def push(self, i: int) -> str:
        self.ids.append(i)
        prev = self.tok.decode(self.ids[self.prefix:self.read])
        cur = self.tok.decode(self.ids[self.prefix:])
        if len(cur) > len(prev) and not cur.endswith("\ufffd"):
            self.prefix, self.read = self.read, len(self.ids)
            return cur[len(prev):]
        return ""

    def flush(self) -> str:
        prev = self.tok.decode(self.ids[self.prefix:self.read])
        cur = self.tok.decode(self.ids[self.prefix:])
        self.prefix = self.read = len(self.ids)
        return cur[len(prev):]
