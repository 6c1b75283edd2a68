"""A GGUF Mixture-of-Experts file as a source for ``pack`` (``local-engine pack model.gguf DST``).

llama.cpp stores each MoE layer's experts as three 3-D tensors, ``blk.N.ffn_{gate,up,down}_exps``
(numpy order ``[E, I, H]`` / ``[E, H, I]``), and everything else under its own names. This view
presents them under the Hugging Face names ``pack`` already reads (the transformers-5 fused
layout ``mlp.experts.gate_up_proj`` / ``down_proj``, one expert at a time) plus an HF-style
config built from the GGUF metadata, so the packer itself does not change.

Supported: ``qwen3moe`` (Qwen3-MoE; llama.cpp does not permute its q/k rows and always
renormalises the top-k weights). Quantised GGUF tensors (Q8_0, Q4_K, ...) are dequantised to
fp32 with ``gguf.quants``, one expert slice at a time, so memory stays at one expert; F32/F16/BF16
tensors keep their dtype. The tokenizer is not converted: a packed GGUF works at the token level
(``MoEModel``); put a ``tokenizer.json`` next to the manifest for ``Engine.open`` to chat.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from local_engine.formats.pack import PackError, UnsupportedArchitecture

# GGUF tensor name (after "blk.N.") -> HF name (after "model.layers.N.")
_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q_norm.weight": "self_attn.q_norm.weight",
    "attn_k_norm.weight": "self_attn.k_norm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate_inp.weight": "mlp.gate.weight",
}
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_EXPERTS = ("ffn_gate_exps.weight", "ffn_up_exps.weight", "ffn_down_exps.weight")
_LOSSLESS = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


class GGUFSource:
    """What ``pack`` needs from a source (``config``, ``where``, ``has``, ``get``, ``get_row``)."""

    def __init__(self, path: Path) -> None:
        import gguf

        self.src = path
        try:
            self._r = gguf.GGUFReader(str(path))
        except Exception as e:  # gguf raises ValueError / struct errors on a bad file
            raise PackError(f"{path}: cannot read GGUF file: {e}") from None
        self._t = {t.name: t for t in self._r.tensors}
        arch = self._meta("general.architecture")
        if arch != "qwen3moe":
            raise UnsupportedArchitecture(
                f"{path}: GGUF architecture {arch!r} cannot be packed (supported GGUF MoE: qwen3moe; "
                "or pack the Hugging Face safetensors checkpoint)")
        self.where: dict[str, str] = {}  # HF name -> GGUF name (experts: the layer's gate tensor)
        for name in self._t:
            if name in _GLOBAL_NAMES:
                self.where[_GLOBAL_NAMES[name]] = name
                continue
            m = re.fullmatch(r"blk\.(\d+)\.(.+)", name)
            if m is None:
                continue
            layer, rest = m.groups()
            if rest in _LAYER_NAMES:
                self.where[f"model.layers.{layer}.{_LAYER_NAMES[rest]}"] = name
            elif rest == _EXPERTS[0]:
                self.where[f"model.layers.{layer}.mlp.experts.gate_up_proj"] = name
                self.where[f"model.layers.{layer}.mlp.experts.down_proj"] = f"blk.{layer}.{_EXPERTS[2]}"
        self.config = self._config(arch)

    def _meta(self, key: str, default: Any = None) -> Any:
        f = self._r.get_field(key)
        return default if f is None else f.contents()

    def _config(self, arch: str) -> dict[str, Any]:
        def need(key: str) -> Any:
            v = self._meta(f"{arch}.{key}")
            if v is None:
                raise PackError(f"{self.src}: GGUF metadata {arch}.{key} missing")
            return v

        n_layers = int(need("block_count"))
        hidden = int(need("embedding_length"))
        heads = int(need("attention.head_count"))
        emb = self._t.get("token_embd.weight")
        if emb is None:
            raise PackError(f"{self.src}: tensor token_embd.weight missing")
        theta = float(self._meta(f"{arch}.rope.freq_base", 10000.0))
        return {
            "model_type": "qwen3_moe",
            "architectures": ["Qwen3MoeForCausalLM"],
            "vocab_size": int(emb.shape[-1]),  # GGUF shapes are [in, out]
            "hidden_size": hidden,
            "num_hidden_layers": n_layers,
            "num_attention_heads": heads,
            "num_key_value_heads": int(self._meta(f"{arch}.attention.head_count_kv", heads)),
            "head_dim": int(self._meta(f"{arch}.attention.key_length", hidden // heads)),
            "num_experts": int(need("expert_count")),
            "num_experts_per_tok": int(need("expert_used_count")),
            "moe_intermediate_size": int(need("expert_feed_forward_length")),
            "intermediate_size": int(self._meta(f"{arch}.feed_forward_length", 0) or 0),
            "norm_topk_prob": bool(self._meta(f"{arch}.expert_weights_norm", True)),
            "decoder_sparse_step": 1,
            "mlp_only_layers": [],
            "rms_norm_eps": float(self._meta(f"{arch}.attention.layer_norm_rms_epsilon", 1e-6)),
            "rope_theta": theta,
            "rope_parameters": {"rope_type": "default", "rope_theta": theta},
            "max_position_embeddings": int(self._meta(f"{arch}.context_length", 4096)),
            "tie_word_embeddings": "output.weight" not in self._t,
            "hidden_act": "silu",
            "source_gguf": self.src.name,
        }

    # ------------------------------------------------------------------ tensors
    def has(self, name: str) -> bool:
        return name in self.where

    def _array(self, t: Any, data: np.ndarray) -> torch.Tensor:
        """A tensor (or an expert slice of it) in HF order, lossless dtypes kept."""
        import gguf

        q = t.tensor_type.name
        if q in _LOSSLESS:
            # a copy: the reader's arrays are read-only views of the memory-mapped file
            if q == "BF16":  # numpy has no bfloat16: the reader hands out raw uint16
                return torch.from_numpy(np.array(data).view(np.int16)).view(torch.bfloat16)
            return torch.from_numpy(np.array(data))
        try:
            arr = gguf.quants.dequantize(np.ascontiguousarray(data), t.tensor_type)
        except NotImplementedError:
            raise PackError(f"{self.src}: tensor {t.name}: GGUF type {q} cannot be dequantised") from None
        return torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))

    def get(self, name: str) -> torch.Tensor:
        g = self.where.get(name)
        if g is None:
            raise PackError(f"{self.src}: tensor {name} missing from checkpoint")
        t = self._t[g]
        return self._array(t, t.data)

    def get_row(self, name: str, e: int) -> torch.Tensor:
        """Expert ``e`` of a fused layer tensor, dequantised alone (one expert in memory)."""
        g = self.where[name]
        if name.endswith("gate_up_proj"):
            up = self._t[g.replace(_EXPERTS[0], _EXPERTS[1])]
            gate = self._t[g]
            return torch.cat([self._array(gate, gate.data[e]), self._array(up, up.data[e])], dim=0)
        t = self._t[g]
        return self._array(t, t.data[e])
