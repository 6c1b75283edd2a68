"""Flash layout for Mixture-of-Experts checkpoints: the format, its manifest and its reader.

The writer is ``formats/pack_writer.py``; the quantisers it stores with, ``formats/pack_quant.py``.
A packed directory holds three files::

    manifest.json   what is where: arch + HF config, quant, tensor/expert offsets, checksums
    resident.bin    every non-expert tensor (embeddings, attention, norms, routers, shared experts),
                    raw little-endian, each 64-byte aligned, kept lossless (source dtype)
    experts.bin     one *bundle* per (layer, expert): gate_up [2I, H] then down [H, I] (plus their
                    group scales when quantised), padded to a 4 KiB multiple and 4 KiB aligned so a
                    miss is ONE positional read, O_DIRECT-able, into an aligned buffer

All bundles share one internal layout (``bundle.parts``: relative offsets/shapes/dtypes), so the
manifest stores it once; bundle ``(l, e)`` sits at ``experts_offset(l, e)`` with a fixed stride.

Dense weights (``dense``: ``f32`` | ``int8`` | ``int4``): the resident matrices every token reads
(attention q/k/v/o, shared experts, dense MLP layers, the vocab head) are kept lossless by default
(``f32``: the source dtype), or stored as GGUF ``Q8_0`` (``int8``) / ``Q4_1`` (``int4``) blocks, the
formats ``qkernel.qmatmul`` multiplies for dense GGUF models (activations quantised to int16 per
block, so Q8_0 is within rounding of fp32). Such a tensor's manifest entry carries ``qtype`` and its
logical ``shape``; its bytes are the rows of blocks. Routers, norms and the embedding table stay
lossless (a router's top-k flips on small errors; the embedding is read one row a token). Why: in
a streamed MoE the resident fp32 attention was read in full every token, ~150 MB on the benchmark
model, more than the int4 experts it streams at a 5% budget, so fewer expert bits could not show.

Checksums: every resident tensor and every expert bundle carries one, under a key named after its
algorithm. Format version 2 (what ``pack`` writes) names it in ``"checksum"`` and uses ``crc32c``;
version 1 packs have no such field and use ``crc32`` (zlib). Readers verify whichever the manifest
names (``Manifest.checksum_fn``), so version 1 packs still open.
"""

from __future__ import annotations

import json
import os
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import crc32c
import torch

from local_engine.errors import PackError, UnsupportedArchitecture
from local_engine.formats.gguf import dequantize_blocks

# The pack format's one name (Engine.info()'s "format", the loader's); FORMAT_NAME is the string
# the manifest carries on disk, kept so packs written before stay readable.
PACK_FORMAT = "flash-moe-pack"
FORMAT_NAME = "hgw-flash-moe"
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
# Checksum algorithms a manifest may name. crc32c (Castagnoli) runs on the CPU's CRC instruction
# (SSE4.2 / ARMv8), ~10x zlib.crc32 on one core, and releases the GIL; at desk scale nearly every
# read is a bundle's first, and zlib.crc32 there was the decode's bottleneck (issue #24).
CHECKSUMS: dict[str, Callable[[Any], int]] = {"crc32": zlib.crc32, "crc32c": crc32c.crc32c}
CHECKSUM = "crc32c"  # what pack() writes
V1_CHECKSUM = "crc32"  # implied by a version 1 manifest
ALIGN = 4096
RESIDENT_ALIGN = 64
MANIFEST = "manifest.json"
RESIDENT_FILE = "resident.bin"
EXPERTS_FILE = "experts.bin"

# safetensors dtype names <-> torch
_DTYPES: dict[str, torch.dtype] = {
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "I32": torch.int32,
    "I64": torch.int64,
}
_DTYPE_NAMES = {v: k for k, v in _DTYPES.items()}


def dtype_from_name(name: str) -> torch.dtype:
    try:
        return _DTYPES[name]
    except KeyError:
        raise PackError(f"unsupported tensor dtype {name!r}") from None


def dtype_name(dt: torch.dtype) -> str:
    return _DTYPE_NAMES[dt]


# --------------------------------------------------------------------------- architectures

@dataclass(frozen=True)
class ArchSpec:
    """How one HF MoE family names its expert tensors.

    ``expert_fmt`` gives per-expert tensor names (the on-disk layout HF checkpoints use);
    ``fused`` gives the transformers-5 in-memory layout ([E, 2I, H] / [E, H, I]) which some
    checkpoints are saved in; both are accepted.
    """

    model_type: str
    moe_prefix: str  # "model.layers.{l}.<moe_prefix>"
    gate: str
    up: str
    down: str
    num_experts_key: str
    # what models/moe.py computes differently per family (its quirks, in one place):
    qk_norm: str = ""  # "head": RMSNorm per q/k head (Qwen3-MoE); "projection": over the whole q/k projection (OLMoE)
    shared_expert: bool = False  # a sigmoid-gated shared expert beside the routed ones (Qwen2-MoE)
    renormalise: bool | None = None  # top-k weights renormalised always (Mixtral); None: config's norm_topk_prob


ARCHS: dict[str, ArchSpec] = {
    "mixtral": ArchSpec("mixtral", "block_sparse_moe", "w1", "w3", "w2", "num_local_experts", renormalise=True),
    "qwen2_moe": ArchSpec("qwen2_moe", "mlp", "gate_proj", "up_proj", "down_proj", "num_experts", shared_expert=True),
    "qwen3_moe": ArchSpec("qwen3_moe", "mlp", "gate_proj", "up_proj", "down_proj", "num_experts", qk_norm="head"),
    "olmoe": ArchSpec("olmoe", "mlp", "gate_proj", "up_proj", "down_proj", "num_experts", qk_norm="projection"),
}


def arch_spec(config: dict[str, Any], where: str) -> ArchSpec:
    mt = config.get("model_type")
    if mt not in ARCHS:
        raise UnsupportedArchitecture(
            f"{where}: unsupported architecture model_type={mt!r} "
            f"(supported MoE families: {', '.join(sorted(ARCHS))})"
        )
    return ARCHS[mt]


def moe_layers(config: dict[str, Any]) -> list[bool]:
    """Which decoder layers carry a sparse MoE block (Qwen2/3-MoE can interleave dense MLPs)."""
    n = int(config["num_hidden_layers"])
    if config.get("model_type") in ("qwen2_moe", "qwen3_moe"):
        step = int(config.get("decoder_sparse_step", 1) or 1)
        only = set(config.get("mlp_only_layers") or [])
        n_exp = num_experts(config)
        return [(i not in only) and n_exp > 0 and (i + 1) % step == 0 for i in range(n)]
    return [True] * n


def num_experts(config: dict[str, Any]) -> int:
    """Expert count; transformers 5 writes ``num_local_experts`` even for Qwen3-MoE."""
    for key in ("num_experts", "num_local_experts"):
        if config.get(key):
            return int(config[key])
    raise PackError(f"config of {config.get('model_type')!r} has no num_experts / num_local_experts")


def expert_dims(config: dict[str, Any]) -> tuple[int, int]:
    """(hidden H, expert intermediate I)."""
    h = int(config["hidden_size"])
    if config.get("model_type") == "mixtral":
        return h, int(config["intermediate_size"])
    return h, int(config.get("moe_intermediate_size") or config["intermediate_size"])


# --------------------------------------------------------------------------- manifest model

@dataclass(frozen=True)
class Part:
    """One array inside a bundle (relative offset)."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    offset: int
    nbytes: int


class _ExpertsInt:
    """A ``Manifest`` attribute read as an int from the manifest's ``experts`` section, under its own name."""

    def __set_name__(self, owner: type, name: str) -> None:
        self.key = name

    def __get__(self, m: Manifest, owner: type | None = None) -> int:
        return int(m.raw["experts"][self.key])


@dataclass(frozen=True)
class Manifest:
    root: Path
    raw: dict[str, Any]

    @property
    def config(self) -> dict[str, Any]:
        return self.raw["config"]

    @property
    def arch(self) -> str:
        return self.raw["arch"]

    @property
    def quant(self) -> str:
        return self.raw["quant"]["method"]

    @property
    def group_size(self) -> int:
        return int(self.raw["quant"]["group_size"])

    @property
    def dense(self) -> str:
        """How the resident matrices are stored (``pack_quant.DENSE_METHODS``); packs before it are lossless."""
        return str(self.raw["quant"].get("dense", "f32"))

    def resident_qtype(self, name: str) -> str | None:
        """The GGUF block type of a resident tensor stored quantised (``dense`` int8 / int4), else None."""
        q = self.raw["resident"]["tensors"][name].get("qtype")
        return None if q is None else str(q)

    # the experts section's sizes: a bundle's stride and used bytes, experts per MoE layer, the hidden
    # width H and an expert's intermediate width I (gate_up is [2I, H], down [H, I])
    stride = _ExpertsInt()
    bundle_nbytes = _ExpertsInt()
    num_experts = _ExpertsInt()
    hidden_size = _ExpertsInt()
    intermediate_size = _ExpertsInt()

    @property
    def parts(self) -> list[Part]:
        return [Part(p["name"], tuple(p["shape"]), p["dtype"], p["offset"], p["nbytes"])
                for p in self.raw["experts"]["parts"]]

    @property
    def moe_layers(self) -> list[int]:
        return [int(x) for x in self.raw["experts"]["layers"]]

    def slot(self, layer: int, expert: int) -> int:
        """Index of (layer, expert)'s bundle in experts.bin."""
        return self.raw["experts"]["layer_slot"][str(layer)] * self.num_experts + expert

    def expert_offset(self, layer: int, expert: int) -> int:
        return self.slot(layer, expert) * self.stride

    @property
    def checksum(self) -> str:
        """The algorithm the manifest's checksums use (a key of CHECKSUMS once read_manifest passed);
        version 1 predates the field."""
        return V1_CHECKSUM if self.raw["version"] == 1 else str(self.raw.get("checksum"))

    @property
    def checksum_fn(self) -> Callable[[Any], int]:
        return CHECKSUMS[self.checksum]

    @property
    def num_bundles(self) -> int:
        return len(self.raw["experts"][self.checksum])

    def expert_crc(self, layer: int, expert: int) -> int:
        return int(self.raw["experts"][self.checksum][self.slot(layer, expert)])

    def tensor_crc(self, name: str) -> int:
        return int(self.raw["resident"]["tensors"][name][self.checksum])

    @property
    def expert_bank_bytes(self) -> int:
        return self.num_bundles * self.stride

    @property
    def resident_bytes(self) -> int:
        return sum(int(t["nbytes"]) for t in self.raw["resident"]["tensors"].values())

    def describe(self) -> dict[str, Any]:
        """What the directory holds, from the manifest alone (``local-engine info``): no weights are
        read and no tokenizer is needed (``tokenizer`` says whether one was packed, to chat)."""
        c = self.config
        tok = self.root / "tokenizer.json"
        return {"source": str(self.root), "format": PACK_FORMAT, "arch": self.arch,
                "quant": self.quant, "group_size": self.group_size if self.quant != "none" else None,
                "dense": self.dense,
                "layers": int(c["num_hidden_layers"]), "moe_layers": len(self.moe_layers),
                "experts": self.num_experts, "top_k": int(c["num_experts_per_tok"]),
                "hidden_size": int(c["hidden_size"]), "vocab_size": c.get("vocab_size"),
                "bundle_bytes": self.stride, "expert_bank_bytes": self.expert_bank_bytes,
                "resident_bytes": self.resident_bytes,
                "tokenizer": str(tok) if tok.is_file() else None}


def read_manifest(root: str | os.PathLike[str]) -> Manifest:
    """Load and validate a packed directory's manifest; checks both data files' sizes."""
    root = Path(root)
    mpath = root / MANIFEST
    if not mpath.is_file():
        raise PackError(f"{root}: not a packed MoE directory (no {MANIFEST})")
    try:
        raw = json.loads(mpath.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise PackError(f"{mpath}: unreadable manifest: {e}") from None
    if raw.get("format") != FORMAT_NAME:
        raise PackError(f"{mpath}: format {raw.get('format')!r} is not {FORMAT_NAME!r}")
    if raw.get("version") not in READABLE_VERSIONS:
        raise PackError(f"{mpath}: format version {raw.get('version')} unsupported (want one of {READABLE_VERSIONS})")
    arch_spec(raw.get("config", {}), str(mpath))
    m = Manifest(root, raw)
    if m.checksum not in CHECKSUMS:
        raise PackError(f"{mpath}: checksum {m.checksum!r} unsupported (want one of {tuple(CHECKSUMS)})")
    if m.checksum not in raw["experts"]:
        raise PackError(f"{mpath}: experts carry no {m.checksum!r} checksums")
    for fname, need in ((RESIDENT_FILE, raw["resident"]["file_nbytes"]),
                        (EXPERTS_FILE, raw["experts"]["file_nbytes"])):
        p = root / fname
        if not p.is_file():
            raise PackError(f"{p}: data file missing")
        have = p.stat().st_size
        if have < need:
            raise PackError(f"{p}: truncated: {have} bytes on disk, manifest expects {need}")
    return m


def load_resident(m: Manifest, verify: bool = True) -> dict[str, torch.Tensor]:
    """Read every resident tensor into RAM (one pass over resident.bin), checking checksums."""
    path = m.root / RESIDENT_FILE
    out: dict[str, torch.Tensor] = {}
    check = m.checksum_fn
    with open(path, "rb") as f:
        for name, t in m.raw["resident"]["tensors"].items():
            f.seek(int(t["offset"]))
            buf = bytearray(int(t["nbytes"]))
            if f.readinto(buf) != len(buf):
                raise PackError(f"{path}: truncated while reading tensor {name}")
            if verify and check(buf) != m.tensor_crc(name):
                raise PackError(f"{path}: checksum mismatch in resident tensor {name} at offset {t['offset']}")
            dt = dtype_from_name(t["dtype"])
            # a quantised matrix (dense int8 / int4) comes back as its rows of GGUF blocks
            shape = [t["shape"][0], -1] if t.get("qtype") else t["shape"]
            out[name] = torch.frombuffer(buf, dtype=dt).reshape(shape) if buf else torch.empty(
                t["shape"], dtype=dt)
    return out


def dequantize_dense(blocks: torch.Tensor, qtype: str, shape: tuple[int, int]) -> torch.Tensor:
    """fp32 [rows, cols] of a dense tensor stored as GGUF blocks (the reference for the kernel)."""
    return dequantize_blocks(blocks.numpy(), qtype).reshape(shape)


def bundle_views(m: Manifest, buf: Any) -> Iterator[tuple[Part, torch.Tensor]]:
    """Zero-copy tensors over one bundle buffer (bytes-like, writable for torch.frombuffer)."""
    for p in m.parts:
        dt = dtype_from_name(p.dtype)
        yield p, torch.frombuffer(buf, dtype=dt, count=p.nbytes // dt.itemsize, offset=p.offset).reshape(p.shape)
