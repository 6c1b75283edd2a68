"""A small AVX2 kernel for GGUF Q4_0 / Q4_1 / Q8_0 matrices (and the MoE pack's int2 experts),
built with the system C compiler.

Why: decoding one token of a small model reads every weight once, so its speed is set by the
bytes per weight and by how cheaply each byte is turned into arithmetic. PyTorch's CPU kernels
offer either few bytes with a lot of arithmetic per byte (int4 groups: nibbles converted to
fp32 and FMA'd, compute-bound on AVX2) or cheap arithmetic over many bytes (fp16, 2 bytes per
weight). This kernel does what llama.cpp does: the GGUF blocks stay as they are in the file
(Q4_1 = 0.625 bytes per weight, Q8_0 = 1.06), the activations are quantised to int8 per block
of 32 (an fp32 scale per block, so an outlier channel only coarsens its own block — per-tensor
activation quantisation is what wrecked SmolLM2 in fbgemm's int8 kernel), and each block is one
integer multiply-add (``maddubs``) plus one FMA per 32 weights.

    y[m, r] = sum_b  dw[r,b] * dx[m,b] * sum_i qw[r,b,i] * qx[m,b,i]  +  mw[r,b] * dx[m,b] * sum_i qx[m,b,i]

(Q4_0 is stored as Q4_1 with m = -8 d at load; Q8_0 has no m term.) ``q2matmul`` is the same sum
over 2-bit codes with an fp16 scale and min per group of G columns (G a multiple of 32): the
streamed MoE experts of ``pack --quant int2``, multiplied straight from the read buffer;
``q4smatmul`` the same for ``pack --quant int4`` (symmetric nibbles, min = -8 scale).

Several activation rows (a batched decode step's B sequences, a speculative verify's k+1
positions, a prefill chunk) take another path than the decode step's one row: each weight block
is unpacked once for all of them (in registers for 2-8 rows: 2x2, 2x4 and 1x8 tiles; through an
int16 buffer in L1 from 9 rows on) and the int32 block sums of a tile's pairs are reduced across
lanes before the per-block scale, so a (weight row, activation row) pair costs little more than
its two ``madd``s; 8 rows cost 0.41 of 8 single rows (figures: docs/engine.md, serving). Where the
CPU has AVX-VNNI (or AVX512-VNNI+VL) the build adds its -m flag (``vnni_flags``): VPDPWSSD fuses
each madd with its add, and 3 rows or more take a tile that needs no cross-lane reduction (8
activation rows transposed, each weight pair broadcast; 3-4 rows two pairs a row): 4 to 64 rows
then cost ~0.6-0.75 of the AVX2 build's.
Integer sums are exact, so both builds give bitwise equal results (tests compare them).

``gq_expert`` (one streamed expert's SwiGLU for one token, the decode step's expert call) takes
llama.cpp's Q4_0 x Q8_0 recipe instead: activations to int8 per weight group, stored in the order
the weights' codes come out of their bytes, one VPDPBUSD (u8 x s8) per 32 weights and row, int32
sums per group, one convert + FMA per group for 8 rows at once (the AVX2 build emulates VPDPBUSD
exactly with ``maddubs`` + ``madd``). Per call ~2x faster than the int16 path in cache
(``benchmarks/qkernel_rows.py --experts``); streamed from memory it now runs near this box's one-core
read bandwidth (~9 GB/s). The price is int8 activations on that path only: the logits move ~1-3% of
their largest against the int16 path's on the tiny test models, KL ~0.01 nats on the demo MoE.

The source is compiled once per machine into ``$LOCAL_ENGINE_CACHE`` (default
``~/.cache/local_engine``), keyed by a hash of the source and flags: ~1 s with gcc. If there is
no compiler, the CPU lacks AVX2/FMA/F16C, or ``LOCAL_ENGINE_NO_CKERNEL=1`` is set, ``load()``
returns None and the model falls back to PyTorch's kernels (see formats/llama_weights.py); the reason is
kept in ``unavailable_reason``.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path

_FLAGS = ["-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp", "-fPIC", "-shared"]
_REQUIRED_CPU_FLAGS = ("avx2", "fma", "f16c")

QTYPE_Q4_1 = 1
QTYPE_Q8_0 = 8

unavailable_reason: str | None = None


def _cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def vnni_flags(cpu: set[str]) -> list[str]:
    """The extra -m flags for VPDPWSSD (the several-row tiles' int16 multiply-add in one instruction)
    where this CPU has it; none elsewhere, and the kernel stays the portable AVX2 build."""
    if "avx_vnni" in cpu:
        return ["-mavxvnni"]
    if {"avx512_vnni", "avx512vl"} <= cpu:
        return ["-mavx512vnni", "-mavx512vl"]
    return []


def vnni_available() -> bool:
    """Whether this CPU's build of the kernel uses VPDPWSSD (then it differs from the AVX2 build)."""
    return bool(vnni_flags(_cpu_flags()))


def _cache_dir() -> Path:
    base = os.environ.get("LOCAL_ENGINE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "local_engine")
    return Path(base)


def c_source(name: str) -> str:
    """The C source ``local_engine/csrc/<name>.c``: kept as a .c file (package data) so editors, linters
    and compilers read it as C, not as a Python string."""
    return (Path(__file__).parent / "csrc" / f"{name}.c").read_text()


def compile_shared(name: str, source: str, flags: list[str], link: tuple[str, ...] = ()) -> ctypes.CDLL:
    """Compile ``source`` once per machine into the cache (keyed by source and flags) and load it.

    Shared by this module's kernel and ``kv_kernel``: the same switches (LOCAL_ENGINE_NO_CKERNEL,
    CPU flags, compiler), the same cache and the same atomic publish. Raises RuntimeError / OSError
    when the kernel cannot be had; callers then fall back to PyTorch.
    """
    if os.environ.get("LOCAL_ENGINE_NO_CKERNEL"):
        raise RuntimeError("disabled by LOCAL_ENGINE_NO_CKERNEL")
    missing = [f for f in _REQUIRED_CPU_FLAGS if f not in _cpu_flags()]
    if missing:
        raise RuntimeError(f"CPU lacks {', '.join(missing)}")
    cc = os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")
    if not cc:
        raise RuntimeError("no C compiler (gcc/cc) on PATH")
    key = hashlib.sha256((source + " ".join(flags)).encode()).hexdigest()[:16]
    so = _cache_dir() / f"{name}_{key}.so"
    if not so.is_file():
        so.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory() as td:
            src = Path(td) / f"{name}.c"
            src.write_text(source)
            tmp_so = Path(td) / f"{name}.so"
            out = subprocess.run([cc, *flags, str(src), "-o", str(tmp_so), *link], capture_output=True, text=True,
                                 timeout=120, check=False)
            if out.returncode != 0:
                raise RuntimeError(f"{cc} failed: {out.stderr.strip()[-500:]}")
            # atomic publish: two processes building at once both end with a whole file
            part = so.with_suffix(f".{os.getpid()}.part")
            shutil.copyfile(tmp_so, part)
            os.replace(part, so)
    return ctypes.CDLL(str(so))


class OnceBuilt:
    """A C library built and loaded on first use, once per process: under a lock, since two threads
    (a server's engine and a request) may ask first at the same moment; a failed build is not retried."""

    def __init__(self, build: Callable[[], ctypes.CDLL]) -> None:
        self._build = build
        self._lock = threading.Lock()
        self._tried = False
        self._lib: ctypes.CDLL | None = None
        self._reason: str | None = None

    def get(self) -> tuple[ctypes.CDLL | None, str | None]:
        """(the library, None) or (None, why it could not be built)."""
        with self._lock:
            if not self._tried:
                self._tried = True
                try:
                    self._lib = self._build()
                except (RuntimeError, OSError, subprocess.SubprocessError) as e:
                    self._reason = str(e)
            return self._lib, self._reason


def build(vnni: bool = True) -> ctypes.CDLL:
    """Compile (or take from the cache) and load the kernel; ``vnni=False`` forces the portable AVX2
    build on any CPU (the tests compare the two bitwise)."""
    extra = vnni_flags(_cpu_flags()) if vnni else []
    try:
        lib = compile_shared("qkernel", c_source("qkernel"), _FLAGS + extra)
    except RuntimeError:
        if not extra:
            raise
        # a compiler older than the CPU (gcc < 11 has no -mavxvnni): the portable build, not none
        lib = compile_shared("qkernel", c_source("qkernel"), _FLAGS)
    f = lib.qmatmul
    f.restype = ctypes.c_int
    f.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_int,
                  ctypes.c_int, ctypes.c_int, ctypes.c_void_p, ctypes.c_float, ctypes.c_int]
    q2 = lib.q2matmul
    q2.restype = ctypes.c_int
    q2.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p,
                   ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int]
    q4 = lib.q4smatmul
    q4.restype = ctypes.c_int
    q4.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p,
                   ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int]
    ge = lib.gq_expert
    ge.restype = ctypes.c_int
    ge.argtypes = [ctypes.c_int, *[ctypes.c_void_p] * 6, ctypes.c_int, ctypes.c_void_p, ctypes.c_int, ctypes.c_int,
                   ctypes.c_float, ctypes.c_void_p]
    ar = lib.attn_rows
    ar.restype = None
    ar.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                   ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_float,
                   ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p]
    for a in (lib.attn_step, lib.attn_step_v):
        a.restype = None
        a.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_int,
                      ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_float, ctypes.c_void_p, ctypes.c_void_p]
    return lib


def load() -> ctypes.CDLL | None:
    """The compiled kernel library, or None (then ``unavailable_reason`` says why)."""
    global unavailable_reason
    lib, unavailable_reason = _ONCE.get()
    return lib


_ONCE = OnceBuilt(build)
