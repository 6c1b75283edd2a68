"""The loader registry: which code opens which kind of model path (``Engine.open`` walks it).

``LOADERS`` is tried in order and the first whose ``matches(path)`` is true loads the model;
``register_loader(name, matches, load, first=True)`` adds one (``first`` puts it before the
built-in GGUF / HF-directory loaders, e.g. for a packed MoE dir that contains ``manifest.json``).
``load(path: Path, **opts) -> Loaded``: the model (a ``models.base.CausalLM``), its tokenizer and
the format's name; ``Engine.open`` builds the ``Engine`` around them, so a loader never needs the
engine (and ``engine.py`` imports this module, not the other way round).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from local_engine import kv_cache
from local_engine.cache import DEFAULT_POLICY
from local_engine.errors import EngineError
from local_engine.formats.llama_weights import config_from_gguf, config_from_hf
from local_engine.formats.pack import PACK_FORMAT
from local_engine.models.base import CausalLM
from local_engine.models.llama import LlamaModel
from local_engine.models.moe import DEFAULT_STANDIN_BELOW, MoEModel
from local_engine.store import GGUFStore, SafetensorsStore
from local_engine.tokenizer import Tokenizer, from_gguf, from_hf_dir


@dataclass
class Loaded:
    """What a loader opened: ``Engine.open`` wraps it."""

    model: CausalLM
    tokenizer: Tokenizer
    format: str
    kv: kv_cache.KVConfig  # the KV cache layout the model was built for


@dataclass
class Loader:
    name: str
    matches: Callable[[Path], bool]
    load: Callable[..., Loaded]


LOADERS: list[Loader] = []


def register_loader(name: str, matches: Callable[[Path], bool], load: Callable[..., Loaded],
                    first: bool = True) -> None:
    global LOADERS
    LOADERS = [ld for ld in LOADERS if ld.name != name]
    if first:
        LOADERS.insert(0, Loader(name, matches, load))
    else:
        LOADERS.append(Loader(name, matches, load))


def find(path: Path) -> Loader | None:
    """The first registered loader that takes ``path``."""
    return next((ld for ld in LOADERS if ld.matches(path)), None)


def load_gguf(path: Path, **opts: Any) -> Loaded:
    store = GGUFStore(path)
    cfg = config_from_gguf(store)  # architecture first: the clearest error for a foreign model
    tok = from_gguf(store)
    model = LlamaModel(store, cfg, weights=opts.get("weights", "auto"), max_seq=int(opts.get("max_seq") or 4096),
                       kv=opts.get("kv_cache"))
    return Loaded(model, tok, "gguf", model.kv_config)


def load_hf(path: Path, **opts: Any) -> Loaded:
    store = SafetensorsStore(path)
    cfg = config_from_hf(store)
    tok = from_hf_dir(path)
    model = LlamaModel(store, cfg, weights=opts.get("weights", "auto"), max_seq=int(opts.get("max_seq") or 4096),
                       kv=opts.get("kv_cache"))
    return Loaded(model, tok, "safetensors", model.kv_config)


def load_packed(path: Path, **opts: Any) -> Loaded:
    """``Engine.open(packed_dir, memory_budget="2GiB", policy=..., readers=..., direct=..., verify=...)``.

    Without ``memory_budget`` the env var ``LOCAL_ENGINE_MOE_BUDGET`` applies (so ``local-engine
    generate`` can set it), else 2GiB. The tokenizer comes from the packed dir (``pack`` copies it).
    """
    budget = opts.get("memory_budget") or os.environ.get("LOCAL_ENGINE_MOE_BUDGET") or "2GiB"
    try:
        model = MoEModel.open(path, memory_budget=budget, policy=opts.get("policy", DEFAULT_POLICY),
                              readers=int(opts.get("readers", 8)), direct=bool(opts.get("direct", True)),
                              verify=opts.get("verify", "first"), prefetch=opts.get("prefetch", "auto"),
                              standins=opts.get("standins"),
                              standin_below=float(opts.get("standin_below", DEFAULT_STANDIN_BELOW)))
    except EngineError:  # PackError, BudgetError: already in the tree
        raise
    except ValueError as e:  # a bad option (prefetch, verify, standin_below)
        raise EngineError(str(e)) from None
    if opts.get("max_seq"):
        model.max_seq = int(opts["max_seq"])
    kv = opts.get("kv_cache")
    if kv is not None:
        try:
            kv_cache.check(kv, model.hd, int(model.config.get("max_position_embeddings") or model.max_seq))
        except ValueError as e:
            model.close()
            raise EngineError(f"{path}: {e}") from None
        model.kv_config = kv
    try:
        tok = from_hf_dir(path)
    except BaseException:
        model.close()
        raise
    return Loaded(model, tok, PACK_FORMAT, model.kv_config)


register_loader(PACK_FORMAT, lambda p: p.is_dir() and (p / "manifest.json").is_file(), load_packed)
register_loader("hf-dir", lambda p: p.is_dir() and (p / "config.json").is_file(), load_hf, first=False)
register_loader("gguf", lambda p: p.is_file(), load_gguf, first=False)
