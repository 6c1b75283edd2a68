"""A fast GGUF header parser (metadata + tensor directory) over a memory map.

``gguf.GGUFReader`` builds a numpy view per metadata item; on a 49k-token vocabulary that takes
tens of seconds on a busy 2-core machine. This reads the same header with ``struct`` in well under
a second and leaves tensor data memory-mapped. Dequantisation still uses ``gguf.quants``.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from local_engine.errors import ModelFileError

_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_NP = {0: np.uint8, 1: np.int8, 2: np.uint16, 3: np.int16, 4: np.uint32, 5: np.int32, 6: np.float32,
       7: np.bool_, 10: np.uint64, 11: np.int64, 12: np.float64}


# The one GGUF <-> Hugging Face tensor-name table (formats/llama_weights.py, formats/gguf_moe.py): GGUF name
# (after "blk.N.") -> HF name (after "model.layers.N."); "{moe}" is an MoE block's prefix ("mlp",
# or "block_sparse_moe" for Mixtral)
GGUF_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q_norm.weight": "self_attn.q_norm.weight",
    "attn_k_norm.weight": "self_attn.k_norm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate_inp.weight": "{moe}.gate.weight",
    "ffn_gate_inp_shexp.weight": "{moe}.shared_expert_gate.weight",
    "ffn_gate_shexp.weight": "{moe}.shared_expert.gate_proj.weight",
    "ffn_up_shexp.weight": "{moe}.shared_expert.up_proj.weight",
    "ffn_down_shexp.weight": "{moe}.shared_expert.down_proj.weight",
    # a dense layer inside an MoE model (Qwen2/3-MoE mlp_only_layers)
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
GGUF_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}

@dataclass
class GGUFTensorInfo:
    name: str
    shape: tuple[int, ...]  # PyTorch order (rows, cols)
    type_id: int
    type_name: str
    offset: int  # absolute byte offset in the file
    n_bytes: int


class GGUFFile:
    def __init__(self, path: str | Path) -> None:
        from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

        self.path = Path(path)
        size = self.path.stat().st_size
        if size < 24:
            raise ModelFileError(self.path, f"truncated: {size} bytes is smaller than a GGUF header")
        with open(self.path, "rb") as f:  # the map stays valid after the file is closed
            self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        buf = self._mm
        if buf[:4] != b"GGUF":
            raise ModelFileError(self.path, f"not a GGUF file (magic {bytes(buf[:4])!r}, expected b'GGUF')")
        self.version, n_tensors, n_kv = struct.unpack_from("<IQQ", buf, 4)
        if self.version not in (2, 3):
            raise ModelFileError(self.path, f"unsupported GGUF version {self.version}")
        self._pos = 24
        try:
            self.metadata: dict[str, Any] = {}
            for _ in range(n_kv):
                key = self._str()
                (vtype,) = self._unpack("<I")
                self.metadata[key] = self._value(vtype)
            infos = []
            for _ in range(n_tensors):
                name = self._str()
                (nd,) = self._unpack("<I")
                dims = self._unpack(f"<{nd}Q")
                tid, off = self._unpack("<IQ")
                infos.append((name, dims, tid, off))
        except (struct.error, UnicodeDecodeError, ValueError, MemoryError) as e:
            raise ModelFileError(self.path, f"corrupt or truncated GGUF header ({e})") from None
        align = int(self.metadata.get("general.alignment", 32))
        data_start = -(-self._pos // align) * align
        self.tensors: dict[str, GGUFTensorInfo] = {}
        for name, dims, tid, off in infos:
            try:
                qt = GGMLQuantizationType(tid)
            except ValueError:
                raise ModelFileError(self.path, f"tensor {name} has unknown type id {tid}") from None
            block, tbytes = GGML_QUANT_SIZES[qt]
            n = int(np.prod(dims)) if dims else 1
            n_bytes = n // block * tbytes
            start = data_start + off
            if start + n_bytes > size:
                raise ModelFileError(self.path, f"truncated: tensor {name} ends at byte {start + n_bytes}, "
                                                f"file has {size}")
            self.tensors[name] = GGUFTensorInfo(name, tuple(int(d) for d in reversed(dims)), tid, qt.name,
                                                start, n_bytes)

    def _unpack(self, fmt: str) -> tuple[Any, ...]:
        out = struct.unpack_from(fmt, self._mm, self._pos)
        self._pos += struct.calcsize(fmt)
        return out

    def _str(self) -> str:
        (n,) = struct.unpack_from("<Q", self._mm, self._pos)
        s = self._mm[self._pos + 8:self._pos + 8 + n]
        if len(s) != n:
            raise ValueError("string runs past the end of the file")
        self._pos += 8 + n
        return s.decode("utf-8", errors="replace")

    def _value(self, vtype: int) -> Any:
        if vtype == 8:
            return self._str()
        if vtype == 9:
            (etype, n) = self._unpack("<IQ")
            if etype in _NP:  # numeric arrays: one numpy read, not n struct calls
                arr: np.ndarray = np.frombuffer(self._mm, dtype=_NP[etype], count=n, offset=self._pos)
                self._pos += arr.nbytes
                return arr.tolist()
            return [self._value(etype) for _ in range(n)]
        fmt = _SCALARS.get(vtype)
        if fmt is None:
            raise ValueError(f"unknown metadata value type {vtype}")
        return self._unpack(fmt)[0]

    def data(self, name: str) -> np.ndarray:
        """Memory-mapped bytes of a tensor as uint8 [rows, row_bytes] (or float32/16 for F32/F16)."""
        t = self.tensors[name]
        raw = np.frombuffer(self._mm, dtype=np.uint8, count=t.n_bytes, offset=t.offset)
        if t.type_name == "F32":
            return raw.view(np.float32).reshape(t.shape)
        if t.type_name == "F16":
            return raw.view(np.float16).reshape(t.shape)
        rows = int(np.prod(t.shape[:-1])) if len(t.shape) > 1 else 1
        return raw.reshape(rows, -1)


def dequantize_blocks(data: np.ndarray, qtype: str) -> torch.Tensor:
    """fp32 values of GGUF-quantised bytes (``qtype`` a ``GGMLQuantizationType`` name; ``data``
    rows of whole blocks), as ``gguf.quants`` computes them: the engine's one dequantiser. KeyError
    or NotImplementedError for a type it has no dequantiser for."""
    import gguf

    arr = gguf.quants.dequantize(data, gguf.GGMLQuantizationType[qtype])
    return torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))


def unpermute_rows(n_rows: int, n_head: int) -> np.ndarray:
    """Row order that undoes llama.cpp's ``LlamaModel.permute`` (its converter interleaves the two
    RoPE halves of each q/k head, HF's layout splits them): ``w_hf = w_gguf[idx]``."""
    half = n_rows // n_head // 2
    return np.arange(n_rows).reshape(n_head, half, 2).swapaxes(1, 2).reshape(-1)
