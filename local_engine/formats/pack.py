"""Flash layout for Mixture-of-Experts checkpoints: writer, manifest reader, group quantisation.

A packed directory holds three files::

    manifest.json   what is where: arch + HF config, quant, tensor/expert offsets, checksums
    resident.bin    every non-expert tensor (embeddings, attention, norms, routers, shared experts),
                    raw little-endian, each 64-byte aligned, kept lossless (source dtype)
    experts.bin     one *bundle* per (layer, expert): gate_up [2I, H] then down [H, I] (plus their
                    group scales when quantised), padded to a 4 KiB multiple and 4 KiB aligned so a
                    miss is ONE positional read, O_DIRECT-able, into an aligned buffer

All bundles share one internal layout (``bundle.parts``: relative offsets/shapes/dtypes), so the
manifest stores it once; bundle ``(l, e)`` sits at ``experts_offset(l, e)`` with a fixed stride.
The writer streams tensor by tensor from the safetensors shards (``safe_open`` slices), so a
model larger than RAM can be packed: peak memory is about one expert plus one resident tensor.

Quantisation (``int8`` / ``int4``) is symmetric, per group of ``group_size`` consecutive input
columns, one fp16 scale per (row, group); ``int4`` packs two values per byte (low nibble first).
``int2`` is asymmetric (an fp16 scale *and* min per (row, group), w = q·scale + min, q in 0..3),
four values per byte in blocks of 32 columns (see ``quantize_int2``), and needs a group size that
is a multiple of 32 (the kernel's activation block). ``none`` copies the source dtype bit for bit.

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
import math
import os
import shutil
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import crc32c
import torch

from local_engine.errors import PackError, UnsupportedArchitecture
from local_engine.formats.gguf import dequantize_blocks
from local_engine.formats.gguf_moe import GGUFSource
from local_engine.formats.sources import PackSource, SafetensorsSource, copy_tokenizer_files

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
QUANT_METHODS = ("none", "int8", "int4", "int2")
# dense (resident, read-every-token) matrices: lossless, or the GGUF block type qkernel multiplies
DENSE_METHODS = ("f32", "int8", "int4")
DENSE_QTYPES = {"int8": "Q8_0", "int4": "Q4_1"}
DENSE_BLOCK = 32  # columns per GGUF Q8_0 / Q4_1 block
INT2_BLOCK = 32  # columns per int2 packing block (and qkernel's activation block)

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


def _align(n: int, a: int) -> int:
    return (n + a - 1) // a * a


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


# --------------------------------------------------------------------------- quantisation

def quantize(w: torch.Tensor, method: str, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-group quantisation of a 2-D weight along its input (last) dim.

    Returns (q, scales): int8 [out, in] or uint8 nibble-packed [out, in/2]; fp16 scales
    [out, in/group]. Scales are computed in fp32 then stored fp16; the quantised values are
    rounded against the *stored* fp16 scale so dequantisation matches what was optimised.
    """
    out_f, in_f = w.shape
    if in_f % group:
        raise PackError(f"input dim {in_f} is not a multiple of group size {group}")
    qmax = 127.0 if method == "int8" else 7.0
    g = w.float().reshape(out_f, in_f // group, group)
    scale = (g.abs().amax(dim=-1) / qmax).clamp_min(1e-12).to(torch.float16)
    s32 = scale.float().clamp_min(1e-12).unsqueeze(-1)
    if method == "int8":
        q = torch.round(g / s32).clamp(-127, 127).to(torch.int8).reshape(out_f, in_f)
    else:
        q = (torch.round(g / s32).clamp(-8, 7) + 8).to(torch.uint8).reshape(out_f, in_f)
        q = (q[:, 0::2] | (q[:, 1::2] << 4)).contiguous()
    return q, scale


def quantize_int2(w: torch.Tensor, group: int, refine: int = 4) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric 2-bit per-group quantisation: w ~ q·scale + min, q in {0, 1, 2, 3}.

    Why asymmetric: with only four levels, a symmetric grid either has no zero ({±0.5, ±1.5}·s)
    or one level fewer on one side ({-2..1}·s), and it always spans [-max|w|, max|w|], so a
    group whose values are skewed leaves part of the grid unused; [min, max] puts all four
    levels on the values the group has (one lost level is 1/16 of an int4 grid, 1/4 of int2's).
    Every symmetric 4-level grid is one of these (min = -2·scale or -1.5·scale), so a fitted
    asymmetric grid is never worse; it costs one more fp16 per group (+0.25 bit/weight at 64).
    Measured: on SmolLM2's matrices and Gaussian rows the refined fit matches the best symmetric
    scale found by a per-group search (within 0.5% RMS; min/max alone is 1.37x worse), on groups
    whose values sit off zero it is clearly better (tests/moe/test_int2.py).

    Start from the group's [min, max], then ``refine`` rounds of least-squares (scale, min) for
    the current codes and re-rounding, keeping per group the candidate with the smallest error
    (as llama.cpp's ``make_qkx`` does for Q2_K). Codes are rounded against the *stored* fp16
    scale and min, so dequantisation reproduces what was chosen.

    Returns (q uint8 [out, in/4], scale fp16 [out, in/group], min fp16 [out, in/group]). Byte
    layout: in each block of 32 columns, byte j holds columns j, j+8, j+16, j+24 in bits 0-1,
    2-3, 4-5, 6-7, so the kernel unpacks a block with three shifts and four masks.
    """
    out_f, in_f = w.shape
    if in_f % group or group % INT2_BLOCK:
        raise PackError(f"int2: input dim {in_f} and group size {group} must be multiples of {INT2_BLOCK} "
                        f"with the group size dividing the input dim")
    g = w.float().reshape(out_f, in_f // group, group)
    lo, hi = g.amin(-1), g.amax(-1)
    cands = [((hi - lo) / 3.0, lo)]
    best: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None = None  # codes, scale, min, error
    for it in range(refine + 1):
        s, m = cands[-1]
        s16 = s.clamp_min(0).to(torch.float16)
        m16 = m.to(torch.float16)
        s32, m32 = s16.float().unsqueeze(-1), m16.float().unsqueeze(-1)
        q = torch.round((g - m32) / s32.clamp_min(1e-12)).clamp(0, 3)
        err = ((q * s32 + m32 - g) ** 2).sum(-1)
        if best is None:
            best = (q, s16, m16, err)
        else:
            better = err < best[3]
            best = (torch.where(better.unsqueeze(-1), q, best[0]), torch.where(better, s16, best[1]),
                    torch.where(better, m16, best[2]), torch.where(better, err, best[3]))
        if it == refine:
            break
        # least squares for (s, m) given the codes: [sum q², sum q; sum q, n] [s; m] = [sum qw; sum w]
        n = float(group)
        sq, sqq = q.sum(-1), (q * q).sum(-1)
        sw, sqw = g.sum(-1), (q * g).sum(-1)
        det = n * sqq - sq * sq
        ok = det > 0
        s_new = torch.where(ok, (n * sqw - sq * sw) / torch.where(ok, det, torch.ones_like(det)), s)
        m_new = torch.where(ok, (sw - s_new * sq) / n, m)
        cands.append((s_new, m_new))
    assert best is not None  # the loop runs at least once
    best_q, best_s, best_m, _ = best
    codes = best_q.to(torch.uint8).reshape(out_f, in_f // INT2_BLOCK, 4, INT2_BLOCK // 4)
    packed = codes[:, :, 0] | (codes[:, :, 1] << 2) | (codes[:, :, 2] << 4) | (codes[:, :, 3] << 6)
    return packed.reshape(out_f, in_f // 4).contiguous(), best_s, best_m


def unpack_int2(q: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """The codes (uint8 0..3, [out, in]) of an int2-packed matrix (layout: ``quantize_int2``)."""
    out_f, in_f = shape
    b = q.reshape(out_f, in_f // INT2_BLOCK, 1, INT2_BLOCK // 4)
    return torch.cat([(b >> s) & 3 for s in (0, 2, 4, 6)], dim=2).reshape(out_f, in_f)


def _group_size_ok(quant: str, size: int) -> bool:
    if quant == "int4":
        return size % 2 == 0
    if quant == "int2":
        return size % INT2_BLOCK == 0
    return True


def valid_group_size(quant: str, dims: Iterable[int], at_most: int) -> int | None:
    """The largest group size <= ``at_most`` that divides every dim (even for int4, a multiple
    of 32 for int2), or None."""
    g = math.gcd(*dims)
    for size in range(min(at_most, g), 0, -1):
        if g % size == 0 and _group_size_ok(quant, size):
            return size
    return None


def _check_group_size(quant: str, group_size: int, dims: dict[str, int]) -> None:
    """Refuse a group size the expert matrices cannot be cut into, naming the option and a value that works."""
    bad = [f"{name} {d}" for name, d in dims.items() if group_size < 1 or d % group_size]
    if quant == "int4" and group_size % 2:
        bad.append("int4 (two values per byte: the group size must be even)")
    if quant == "int2" and group_size % INT2_BLOCK:
        bad.append(f"int2 (four values per byte in blocks of {INT2_BLOCK} columns: the group size must be "
                   f"a multiple of {INT2_BLOCK})")
    if not bad:
        return
    at_most = max(group_size, INT2_BLOCK if quant == "int2" else 1) if group_size >= 1 else 64
    fix = valid_group_size(quant, dims.values(), at_most)
    kind = f"multiple of {INT2_BLOCK}" if quant == "int2" else "size"
    hint = (f"use --group-size {fix} (group_size={fix}): the largest {kind} up to {at_most} that divides "
            f"{' and '.join(str(d) for d in dims.values())}" if fix else
            "no group size fits; use --quant int8 or --quant none" if quant != "int2" else
            f"no group size fits (int2 needs widths that a multiple of {INT2_BLOCK} divides); "
            "use --quant int4, int8 or none")
    raise PackError(f"--quant {quant} --group-size {group_size}: does not fit {', '.join(bad)}: {hint}")


def dequantize(q: torch.Tensor, scale: torch.Tensor, method: str, shape: tuple[int, int],
               mins: torch.Tensor | None = None) -> torch.Tensor:
    """fp32 [out, in] from (q, scale) (and, for int2, the per-group ``mins``)."""
    out_f, in_f = shape
    if method == "int2":
        if mins is None:
            raise PackError("int2 dequantisation needs the per-group mins")
        ng = scale.shape[1]
        codes = unpack_int2(q, shape).reshape(out_f, ng, in_f // ng).to(torch.float32)
        w = codes * scale.to(torch.float32).unsqueeze(-1) + mins.to(torch.float32).unsqueeze(-1)
        return w.reshape(out_f, in_f)
    if method == "int4":
        lo = (q & 0x0F).to(torch.int8) - 8
        hi = (q >> 4).to(torch.int8) - 8
        vals = torch.stack((lo, hi), dim=-1).reshape(out_f, in_f)
    else:
        vals = q
    ng = scale.shape[1]
    w = vals.reshape(out_f, ng, in_f // ng).to(torch.float32) * scale.to(torch.float32).unsqueeze(-1)
    return w.reshape(out_f, in_f)


# --------------------------------------------------------------------------- manifest model

@dataclass(frozen=True)
class Part:
    """One array inside a bundle (relative offset)."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    offset: int
    nbytes: int


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
        """How the resident matrices are stored (``DENSE_METHODS``); packs before it are lossless."""
        return str(self.raw["quant"].get("dense", "f32"))

    def resident_qtype(self, name: str) -> str | None:
        """The GGUF block type of a resident tensor stored quantised (``dense`` int8 / int4), else None."""
        q = self.raw["resident"]["tensors"][name].get("qtype")
        return None if q is None else str(q)

    @property
    def stride(self) -> int:
        return int(self.raw["experts"]["stride"])

    @property
    def bundle_nbytes(self) -> int:
        return int(self.raw["experts"]["bundle_nbytes"])

    @property
    def num_experts(self) -> int:
        return int(self.raw["experts"]["num_experts"])

    @property
    def parts(self) -> list[Part]:
        return [Part(p["name"], tuple(p["shape"]), p["dtype"], p["offset"], p["nbytes"])
                for p in self.raw["experts"]["parts"]]

    @property
    def hidden_size(self) -> int:
        return int(self.raw["experts"]["hidden_size"])

    @property
    def intermediate_size(self) -> int:
        """An expert's intermediate width I (gate_up is [2I, H], down [H, I])."""
        return int(self.raw["experts"]["intermediate_size"])

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


# --------------------------------------------------------------------------- source reading

def _expert_tensors(srcv: PackSource, spec: ArchSpec, layer: int, e: int, inter: int
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    base = f"model.layers.{layer}.{spec.moe_prefix}.experts"
    per = f"{base}.{e}"
    if srcv.has(f"{per}.{spec.gate}.weight"):
        return (srcv.get(f"{per}.{spec.gate}.weight"), srcv.get(f"{per}.{spec.up}.weight"),
                srcv.get(f"{per}.{spec.down}.weight"))
    if srcv.has(f"{base}.gate_up_proj"):  # transformers-5 fused layout: [E, 2I, H], [E, H, I]
        gu = srcv.get_row(f"{base}.gate_up_proj", e)
        return gu[:inter], gu[inter:], srcv.get_row(f"{base}.down_proj", e)
    raise PackError(f"{srcv.src}: no expert tensors found for layer {layer} expert {e} (looked for {per}.*)")


def _is_expert_tensor(name: str, spec: ArchSpec) -> bool:
    return f".{spec.moe_prefix}.experts." in name


# --------------------------------------------------------------------------- writer

def _bundle_arrays(gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor, quant: str, group: int
                   ) -> list[tuple[str, torch.Tensor]]:
    gate_up = torch.cat([gate, up], dim=0).contiguous()
    down = down.contiguous()
    if quant == "none":
        return [("gate_up", gate_up), ("down", down)]
    if quant == "int2":
        arrays: list[tuple[str, torch.Tensor]] = []
        for name, w in (("gate_up", gate_up), ("down", down)):
            q, s, m = quantize_int2(w, group)
            arrays += [(name, q), (name + ".scale", s), (name + ".min", m)]
        return arrays
    q1, s1 = quantize(gate_up, quant, group)
    q2, s2 = quantize(down, quant, group)
    return [("gate_up", q1), ("gate_up.scale", s1), ("down", q2), ("down.scale", s2)]


def dense_quantisable(name: str, t: torch.Tensor) -> bool:
    """Whether ``pack --dense int8|int4`` stores this resident tensor as GGUF blocks: the
    projection matrices every token reads in full (attention q/k/v/o, shared experts, dense MLP
    layers: ``*_proj.weight``) and the vocab head, when their width is whole blocks. Routers
    (``gate.weight``), norms and the embedding table stay lossless."""
    return (t.dim() == 2 and t.is_floating_point() and t.shape[1] % DENSE_BLOCK == 0
            and (name.endswith("_proj.weight") or name == "lm_head.weight"))


def quantize_dense(w: torch.Tensor, dense: str) -> torch.Tensor:
    """``w`` [rows, cols] as rows of GGUF blocks (uint8 [rows, bytes per row]): Q8_0 for int8,
    Q4_1 for int4, written by the ``gguf`` package's reference quantiser (what llama.cpp's
    converter writes), so ``qkernel.qmatmul`` multiplies them as it does a GGUF file's."""
    import gguf

    qt = gguf.GGMLQuantizationType[DENSE_QTYPES[dense]]
    return torch.from_numpy(gguf.quants.quantize(w.float().numpy(), qt))


def dequantize_dense(blocks: torch.Tensor, qtype: str, shape: tuple[int, int]) -> torch.Tensor:
    """fp32 [rows, cols] of a dense tensor stored as GGUF blocks (the reference for the kernel)."""
    return dequantize_blocks(blocks.numpy(), qtype).reshape(shape)


def _tensor_bytes(t: torch.Tensor) -> bytes:
    t = t.contiguous()
    if t.numel() == 0:
        return b""
    return t.view(torch.uint8).numpy().tobytes() if t.dtype != torch.uint8 else t.numpy().tobytes()


def _write_resident(path: Path, names: list[str], get: Callable[[str], torch.Tensor], dense: str,
                    checksum_name: str, tick: Callable[[], None] = lambda: None) -> tuple[dict[str, Any], int]:
    """Write resident.bin from ``get(name)`` tensors, 64-byte aligned, the ``dense_quantisable`` ones
    as GGUF blocks when ``dense`` is int8 / int4; a tied vocab head read as blocks gets its own
    copy (the embedding stays lossless). Returns (the manifest's tensor entries, file size)."""
    names = list(names)
    tied = dense != "f32" and "lm_head.weight" not in names and "model.embed_tokens.weight" in names
    if tied:
        names.append("lm_head.weight")
    checksum = CHECKSUMS[checksum_name]
    meta: dict[str, Any] = {}
    with open(path, "wb") as f:
        off = 0
        for name in names:
            t = get("model.embed_tokens.weight" if tied and name == "lm_head.weight" else name)
            qtype = DENSE_QTYPES[dense] if dense != "f32" and dense_quantisable(name, t) else None
            data = _tensor_bytes(quantize_dense(t, dense) if qtype else t)
            pad = _align(off, RESIDENT_ALIGN) - off
            f.write(b"\0" * pad)
            off += pad
            f.write(data)
            meta[name] = {"offset": off, "nbytes": len(data), "shape": list(t.shape),
                          "dtype": "U8" if qtype else dtype_name(t.dtype), checksum_name: checksum(data)}
            if qtype:
                meta[name]["qtype"] = qtype
            off += len(data)
            tick()
    return meta, off


def open_source(src: str | os.PathLike[str]) -> PackSource:
    """What ``pack`` reads: a GGUF MoE file (``gguf_moe``) or an HF safetensors directory."""
    path = Path(src)
    if path.is_file() and path.suffix.lower() == ".gguf":
        return GGUFSource(path)
    return SafetensorsSource(path)


def pack(src: PackSource | str | os.PathLike[str], dst: str | os.PathLike[str], quant: str = "none",
         group_size: int = 64, progress: bool = True,
         on_progress: Callable[[int], None] | None = None, dense: str = "f32") -> Manifest:
    """Convert an opened source (``open_source``; a path is opened here) of an MoE checkpoint (HF
    safetensors directory or GGUF MoE file) into the flash layout (see module docstring).
    ``quant``: the experts; ``dense``: the resident matrices every token reads (``f32`` lossless,
    ``int8`` / ``int4`` GGUF blocks)."""
    if quant not in QUANT_METHODS:
        raise PackError(f"unknown quantisation {quant!r} (choose from {', '.join(QUANT_METHODS)})")
    if dense not in DENSE_METHODS:
        raise PackError(f"unknown dense format {dense!r} (choose from {', '.join(DENSE_METHODS)})")
    srcv = src if isinstance(src, PackSource) else open_source(src)
    dst = Path(dst)
    where = srcv.config_where
    cfg = srcv.config
    spec = arch_spec(cfg, where)
    hidden, inter = expert_dims(cfg)
    n_exp = num_experts(cfg)
    layers = [i for i, is_moe in enumerate(moe_layers(cfg)) if is_moe]
    if quant != "none":
        _check_group_size(quant, group_size, {"hidden size": hidden, "expert intermediate size": inter})
    dst.mkdir(parents=True, exist_ok=True)

    resident_names = [k for k in srcv.where if not _is_expert_tensor(k, spec)]
    total = len(resident_names) + len(layers) * n_exp
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=total, unit="tensor", desc=f"pack {srcv.src.name} -> {dst.name} [{quant}]")

    def tick() -> None:
        if bar is not None:
            bar.update(1)
        if on_progress is not None:
            on_progress(1)

    # Resident tensors: one at a time (lossless, or the dense matrices as GGUF blocks).
    checksum = CHECKSUMS[CHECKSUM]
    res_meta, res_size = _write_resident(dst / RESIDENT_FILE, resident_names, srcv.get, dense, CHECKSUM, tick)

    # Expert bundles: fixed layout, so the first bundle defines parts/stride for all.
    parts: list[dict[str, Any]] | None = None
    stride = bundle_nbytes = 0
    crcs: list[int] = []
    with open(dst / EXPERTS_FILE, "wb") as f:
        for layer in layers:
            for e in range(n_exp):
                arrays = _bundle_arrays(*_expert_tensors(srcv, spec, layer, e, inter), quant, group_size)
                blobs = [_tensor_bytes(a) for _, a in arrays]
                if parts is None:
                    parts, rel = [], 0
                    for (pname, a), b in zip(arrays, blobs, strict=True):
                        rel = _align(rel, RESIDENT_ALIGN)
                        parts.append({"name": pname, "shape": list(a.shape), "dtype": dtype_name(a.dtype),
                                      "offset": rel, "nbytes": len(b)})
                        rel += len(b)
                    bundle_nbytes = rel
                    stride = _align(rel, ALIGN)
                bundle = bytearray(stride)
                for p, b in zip(parts, blobs, strict=True):
                    if len(b) != p["nbytes"]:
                        raise PackError(f"{srcv.src}: layer {layer} expert {e} has a different shape than expert 0")
                    bundle[p["offset"]:p["offset"] + len(b)] = b
                crcs.append(checksum(memoryview(bundle)[:bundle_nbytes]))
                f.write(bundle)
                tick()
    if bar is not None:
        bar.close()

    manifest = {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "checksum": CHECKSUM,
        "arch": spec.model_type,
        "config": cfg,
        "quant": {"method": quant, "group_size": group_size, "scale_dtype": "F16", "dense": dense},
        "alignment": ALIGN,
        "resident": {"file": RESIDENT_FILE, "file_nbytes": res_size, "tensors": res_meta},
        "experts": {
            "file": EXPERTS_FILE,
            "file_nbytes": len(crcs) * stride,
            "num_experts": n_exp,
            "layers": layers,
            "layer_slot": {str(layer): i for i, layer in enumerate(layers)},
            "hidden_size": hidden,
            "intermediate_size": inter,
            "stride": stride,
            "bundle_nbytes": bundle_nbytes,
            "parts": parts or [],
            CHECKSUM: crcs,
        },
    }
    srcv.write_tokenizer(dst)  # small: lets Engine.open(dst) tokenise and chat
    tmp = dst / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=1))
    os.replace(tmp, dst / MANIFEST)  # the manifest appears only once the data is complete
    return read_manifest(dst)


def redense(src: str | os.PathLike[str], dst: str | os.PathLike[str], dense: str) -> Manifest:
    """A copy of the lossless-dense pack ``src`` with its resident matrices stored as ``dense``
    (``pack(..., dense=...)`` gives the same bytes): only resident.bin and the manifest are
    written; experts.bin is hard-linked (copied where a link cannot be made), so trying a dense
    format on a large pack takes seconds, not a re-quantisation of every expert."""
    if dense not in DENSE_METHODS:
        raise PackError(f"unknown dense format {dense!r} (choose from {', '.join(DENSE_METHODS)})")
    m = read_manifest(src)
    if m.dense != "f32":
        raise PackError(f"{m.root}: its dense matrices are already {m.dense}: redense needs a lossless (f32) pack")
    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    tensors = load_resident(m)
    meta, size = _write_resident(dst / RESIDENT_FILE, list(tensors), tensors.__getitem__, dense, m.checksum)
    experts = dst / EXPERTS_FILE
    if experts.exists():
        experts.unlink()
    try:
        os.link(m.root / EXPERTS_FILE, experts)
    except OSError:
        shutil.copyfile(m.root / EXPERTS_FILE, experts)
    raw = json.loads(json.dumps(m.raw))
    raw["quant"]["dense"] = dense
    raw["resident"] = {**raw["resident"], "file_nbytes": size, "tensors": meta}
    copy_tokenizer_files(m.root, dst)
    tmp = dst / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(raw, indent=1))
    os.replace(tmp, dst / MANIFEST)
    return read_manifest(dst)


def bundle_views(m: Manifest, buf: Any) -> Iterator[tuple[Part, torch.Tensor]]:
    """Zero-copy tensors over one bundle buffer (bytes-like, writable for torch.frombuffer)."""
    for p in m.parts:
        dt = dtype_from_name(p.dtype)
        yield p, torch.frombuffer(buf, dtype=dt, count=p.nbytes // dt.itemsize, offset=p.offset).reshape(p.shape)
