"""A GGUF Mixture-of-Experts file as a source for ``pack`` (``local-engine pack model.gguf DST``).

llama.cpp stores each MoE layer's experts as three 3-D tensors, ``blk.N.ffn_{gate,up,down}_exps``
(numpy order ``[E, I, H]`` / ``[E, H, I]``; or ``ffn_gate_up_exps`` ``[E, 2I, H]`` when the
converter fused them), and everything else under its own names. This view presents them under
the Hugging Face names ``pack`` already reads (the transformers-5 fused layout
``experts.gate_up_proj`` / ``down_proj``, one expert at a time) plus an HF-style config built from
the GGUF metadata, so the packer itself does not change.

Supported ``general.architecture`` values:

``qwen3moe``  Qwen3-MoE. No q/k permutation; llama.cpp always renormalises the top-k weights
              (``expert_weights_norm`` is honoured when present).
``qwen2moe``  Qwen2-MoE (Qwen1.5-MoE): q/k/v biases, a shared expert ``ffn_{gate,up,down}_shexp``
              with its sigmoid gate ``ffn_gate_inp_shexp`` (``[1, H]`` or ``[H]``), top-k weights
              not renormalised. Layers without experts (HF ``mlp_only_layers``) are read as dense
              ``ffn_{gate,up,down}``.
``llama``     with ``llama.expert_count`` > 0: Mixtral. llama.cpp's converter permutes the q/k rows
              of llama-arch models (its RoPE pairs adjacent dims, HF's pairs the two halves); the
              permutation is undone here, so the pack matches ``MixtralForCausalLM``. Experts may
              also be stored the pre-2024 way, one 2-D tensor per expert
              (``blk.N.ffn_{gate,up,down}.E.weight``).

Quantised GGUF tensors (Q8_0, Q4_K, ...) are dequantised to fp32 with ``gguf.quants``, one expert
slice at a time, so memory stays at one expert; F32/F16/BF16 tensors keep their dtype. The header
is parsed by ``formats.gguf.GGUFFile`` (fast on large vocabularies) and tensors stay memory-mapped.

The tokenizer: ``write_tokenizer(dst)`` (called by ``pack``) builds the one the dense engine builds
from the same GGUF metadata (``local_engine.tokenizer.from_gguf``: byte-level BPE ``gpt2`` or
SentencePiece ``llama``) and saves it as ``tokenizer.json`` + ``tokenizer_config.json`` (BOS/EOS,
``add_bos_token``, the GGUF's chat template) + ``generation_config.json`` (every stop id), so
``Engine.open(packed_dir)`` tokenises and chats exactly as ``Engine.open(model.gguf)`` would.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch

from local_engine.errors import EngineError, PackError, UnsupportedArchitecture
from local_engine.formats.gguf import (
    GGUF_GLOBAL_NAMES,
    GGUF_LAYER_NAMES,
    GGUFFile,
    dequantize_blocks,
    unpermute_rows,
)
from local_engine.formats.sources import PackSource
from local_engine.tokenizer import from_gguf

_EXPS = ("ffn_gate_exps.weight", "ffn_up_exps.weight", "ffn_down_exps.weight", "ffn_gate_up_exps.weight")
_LEGACY_EXPERT = re.compile(r"ffn_(gate|up|down)\.(\d+)\.weight")  # pre-2024 Mixtral GGUFs
_LOSSLESS = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}

# GGUF architecture -> (HF model_type, HF class, MoE block prefix, default top-k renormalisation)
_ARCHS = {
    "qwen3moe": ("qwen3_moe", "Qwen3MoeForCausalLM", "mlp", True),
    "qwen2moe": ("qwen2_moe", "Qwen2MoeForCausalLM", "mlp", False),
    "llama": ("mixtral", "MixtralForCausalLM", "block_sparse_moe", True),
}


def _decode(raw: np.ndarray, type_name: str, shape: tuple[int, ...], where: str) -> torch.Tensor:
    """Bytes of a tensor (or of one expert's slice) -> a tensor of ``shape``; lossless dtypes kept."""
    if type_name in _LOSSLESS:
        # a copy: the array is a read-only view of the memory-mapped file
        view = {"F32": np.float32, "F16": np.float16, "BF16": np.int16}[type_name]
        t = torch.from_numpy(np.array(raw.view(view))).reshape(shape)
        return t.view(torch.bfloat16) if type_name == "BF16" else t  # numpy has no bfloat16
    try:
        rows = int(np.prod(shape[:-1])) if len(shape) > 1 else 1
        return dequantize_blocks(np.ascontiguousarray(raw).reshape(rows, -1), type_name).reshape(shape)
    except (KeyError, NotImplementedError):
        raise PackError(f"{where}: GGUF type {type_name} cannot be dequantised") from None


class GGUFSource(PackSource):
    """A GGUF MoE file as a ``PackSource`` (HF names and config from the GGUF's own)."""

    def __init__(self, path: Path) -> None:
        self.src = path
        try:
            self._f = GGUFFile(path)
        except EngineError as e:  # ModelFileError: names the file and what is wrong
            raise PackError(f"cannot read GGUF file: {e}") from None
        self._meta = self._f.metadata
        self._t = self._f.tensors
        arch = self._meta.get("general.architecture")
        self.arch = str(arch)
        supported = "supported GGUF MoE: qwen3moe, qwen2moe, llama with llama.expert_count > 0 (Mixtral)"
        if arch not in _ARCHS:
            raise UnsupportedArchitecture(f"{path}: GGUF architecture {arch!r} cannot be packed ({supported}; "
                                          "or pack the Hugging Face safetensors checkpoint)")
        n_exp = int(self._meta.get(f"{arch}.expert_count") or 0)
        if n_exp == 0:
            raise UnsupportedArchitecture(f"{path}: GGUF architecture {arch!r} without experts ({arch}.expert_count "
                                          f"missing or 0): a dense model, open it with Engine.open ({supported})")
        self.model_type, self._hf_class, self._moe, self._norm_default = _ARCHS[self.arch]
        self._permute = self.arch == "llama"
        self.where: dict[str, str] = {}  # HF name -> GGUF name (fused experts: the layer's gate tensor)
        self._moe_layers: set[int] = set()
        unknown: list[str] = []
        for name in self._t:
            if name in GGUF_GLOBAL_NAMES:
                self.where[GGUF_GLOBAL_NAMES[name]] = name
                continue
            m = re.fullmatch(r"blk\.(\d+)\.(.+)", name)
            if m is None:
                unknown.append(name)
                continue
            layer, rest = int(m.group(1)), m.group(2)
            hp = f"model.layers.{layer}."
            experts = f"{hp}{self._moe}.experts."
            legacy = _LEGACY_EXPERT.fullmatch(rest)
            if rest in GGUF_LAYER_NAMES:
                self.where[hp + GGUF_LAYER_NAMES[rest].format(moe=self._moe)] = name
            elif rest in (_EXPS[0], _EXPS[3]):  # gate (+ up, down alongside) or the fused gate|up
                self.where[experts + "gate_up_proj"] = name
                self.where[experts + "down_proj"] = f"blk.{layer}.{_EXPS[2]}"
                self._moe_layers.add(layer)
            elif rest in _EXPS[1:3]:
                self._moe_layers.add(layer)  # read through the gate's entry
            elif legacy is not None:
                w = {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"}[legacy.group(1)]
                if self.model_type == "mixtral":
                    w = {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}[w]
                self.where[f"{experts}{legacy.group(2)}.{w}.weight"] = name
                self._moe_layers.add(layer)
            else:
                unknown.append(name)
        if unknown:  # silently dropping a tensor would give a model that runs but answers wrong
            shown = ", ".join(unknown[:4]) + (f" (+{len(unknown) - 4} more)" if len(unknown) > 4 else "")
            raise PackError(f"{path}: GGUF tensors this packer does not know how to map: {shown}")
        for hf, g in self.where.items():  # a layer's fused entry reads its siblings too: check them now
            if hf.endswith("gate_up_proj"):
                siblings = [self.where[hf.replace("gate_up_proj", "down_proj")]]
                if g.endswith(_EXPS[0]):
                    siblings.append(g.replace(_EXPS[0], _EXPS[1]))
                for need in siblings:
                    if need not in self._t:
                        raise PackError(f"{path}: tensor {need} missing (its layer has {g})")
        self.config = self._config(n_exp)
        self.tokenizer = self._tokenizer()

    # ------------------------------------------------------------------ config
    def _config(self, n_exp: int) -> dict[str, Any]:
        arch = self.arch

        def need(key: str) -> Any:
            v = self._meta.get(f"{arch}.{key}")
            if v is None:
                raise PackError(f"{self.src}: GGUF metadata {arch}.{key} missing")
            return v

        def opt(key: str, default: Any = None) -> Any:
            v = self._meta.get(f"{arch}.{key}")
            return default if v is None else v

        n_layers = int(need("block_count"))
        hidden = int(need("embedding_length"))
        heads = int(need("attention.head_count"))
        emb = self._t.get("token_embd.weight")
        if emb is None:
            raise PackError(f"{self.src}: tensor token_embd.weight missing")
        if not self._moe_layers:
            raise PackError(f"{self.src}: no expert tensors (blk.N.ffn_gate_exps / ffn_gate.E) found")
        # the expert width from the tensors themselves (Mixtral GGUFs only say feed_forward_length)
        inter = self._expert_inter()
        theta = float(opt("rope.freq_base", 10000.0))
        rope: dict[str, Any] = {"rope_type": "default", "rope_theta": theta}
        scaling = opt("rope.scaling.type")
        if scaling and scaling != "none":
            rope.update(rope_type=str(scaling), factor=float(opt("rope.scaling.factor", 1.0)))
            if opt("rope.scaling.original_context_length"):
                rope["original_max_position_embeddings"] = int(opt("rope.scaling.original_context_length"))
        dense = [i for i in range(n_layers) if i not in self._moe_layers]
        if dense and self.model_type == "mixtral":
            raise PackError(f"{self.src}: Mixtral layers {dense} have no experts")
        head_dim = opt("attention.key_length") or opt("rope.dimension_count") or hidden // heads
        cfg: dict[str, Any] = {
            "model_type": self.model_type,
            "architectures": [self._hf_class],
            "vocab_size": int(emb.shape[0]),
            "hidden_size": hidden,
            "num_hidden_layers": n_layers,
            "num_attention_heads": heads,
            "num_key_value_heads": int(opt("attention.head_count_kv", heads)),
            "head_dim": int(head_dim),
            "num_experts_per_tok": int(need("expert_used_count")),
            "norm_topk_prob": bool(opt("expert_weights_norm", self._norm_default)),
            "rms_norm_eps": float(opt("attention.layer_norm_rms_epsilon", 1e-6)),
            "rope_theta": theta,
            "rope_parameters": rope,
            "max_position_embeddings": int(opt("context_length", 4096)),
            "tie_word_embeddings": "output.weight" not in self._t,
            "hidden_act": "silu",
            "source_gguf": self.src.name,
        }
        if self.model_type == "mixtral":
            cfg.update(num_local_experts=n_exp, intermediate_size=inter)
        else:
            cfg.update(num_experts=n_exp, moe_intermediate_size=inter, decoder_sparse_step=1, mlp_only_layers=dense,
                       intermediate_size=int(opt("feed_forward_length", 0) or 0))
            shexp = opt("expert_shared_feed_forward_length")
            if shexp:
                cfg["shared_expert_intermediate_size"] = int(shexp)
        return cfg

    def _expert_inter(self) -> int:
        layer = min(self._moe_layers)
        for name, col in ((_EXPS[0], 1), (_EXPS[3], 1), ("ffn_gate.0.weight", 0)):
            t = self._t.get(f"blk.{layer}.{name}")
            if t is not None:
                return t.shape[col] // (2 if name == _EXPS[3] else 1)
        raise PackError(f"{self.src}: layer {layer}: no gate expert tensor")

    # ------------------------------------------------------------------ tensors
    @property
    def config_where(self) -> str:
        return str(self.src)

    def _raw(self, g: str) -> np.ndarray:
        return self._f.data(g).view(np.uint8).reshape(-1)  # the tensor's bytes, memory-mapped

    def get(self, name: str) -> torch.Tensor:
        g = self.where.get(name)
        if g is None:
            raise PackError(f"{self.src}: tensor {name} missing from checkpoint")
        t = self._t[g]
        out = _decode(self._raw(g), t.type_name, t.shape, f"{self.src}: tensor {g}")
        if name.endswith("shared_expert_gate.weight") and out.dim() == 1:
            out = out.reshape(1, -1)  # llama.cpp declares it [H]; HF's Linear(H, 1) is [1, H]
        if self._permute and (".q_proj." in name or ".k_proj." in name):
            heads = self.config["num_attention_heads"] if ".q_proj." in name else self.config["num_key_value_heads"]
            out = out[torch.from_numpy(unpermute_rows(out.shape[0], heads))]
        return out

    def get_row(self, name: str, e: int) -> torch.Tensor:
        """Expert ``e`` of a fused layer tensor, decoded alone (one expert in memory)."""
        g = self.where[name]
        if name.endswith("gate_up_proj") and g.endswith(_EXPS[0]):
            return torch.cat([self._expert(g, e), self._expert(g.replace(_EXPS[0], _EXPS[1]), e)], dim=0)
        return self._expert(g, e)

    def _expert(self, g: str, e: int) -> torch.Tensor:
        # experts are the outermost (slowest) dim, so expert e is one contiguous byte range
        t = self._t[g]
        n = t.shape[0]
        if not 0 <= e < n:
            raise PackError(f"{self.src}: tensor {g} has {n} experts, expert {e} asked for")
        step = t.n_bytes // n
        raw = self._raw(g)[e * step:(e + 1) * step]
        return _decode(raw, t.type_name, tuple(t.shape[1:]), f"{self.src}: tensor {g}")

    # ------------------------------------------------------------------ tokenizer
    def _tokenizer(self) -> Any:
        """The dense engine's tokenizer for this GGUF (None without one); built at open so that a
        tokenizer we cannot convert fails the pack before any data is written."""
        meta = self._meta
        if "tokenizer.ggml.model" not in meta:
            return None
        # what from_gguf reads of a GGUFStore
        store = SimpleNamespace(path=self.src, info=SimpleNamespace(metadata=meta),
                                array=lambda key: list(meta.get(key) or []))
        try:
            return from_gguf(store)
        except EngineError as e:
            raise PackError(f"{self.src}: tokenizer cannot be converted: {e}") from None

    def write_tokenizer(self, dst: Path) -> bool:
        """Save the GGUF's tokenizer in HF form into ``dst`` (see module docstring); False when the
        file has none (the pack then works on token ids only, through ``MoEModel``)."""
        tok = self.tokenizer
        if tok is None:
            return False
        tok.tok.save(str(dst / "tokenizer.json"))
        config = {"bos_token": tok.bos_token or None, "eos_token": tok.eos_token or None,
                  "add_bos_token": tok.add_bos, "chat_template": tok.chat_template,
                  "source": f"converted from {self.src.name} GGUF metadata"}
        (dst / "tokenizer_config.json").write_text(json.dumps(config, indent=1, ensure_ascii=False))
        # every stop id (eos, eot, end-of-turn tokens): from_hf_dir reads them back from here
        (dst / "generation_config.json").write_text(json.dumps({"eos_token_id": sorted(tok.stop_ids)}))
        return True
