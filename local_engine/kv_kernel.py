"""The decode step's attention over a compressed KV cache, in C (``local_engine/kv_cache.py``).

Why C: a decode step attends once per layer to every cached token. Dequantising the whole int8
cache into a fresh fp32 tensor per layer per step (the PyTorch path, ``CompressedKVCache.attend``)
costs a few allocations and passes over the cache each time; this kernel decodes one row at a
time into a small buffer, dots it with the query heads that share it (grouped-query attention),
and does the same for V, so the int8 cache is read once per step, at a quarter of fp32's bytes.
Like ``qkernel.attn_step`` (the fp32 cache's kernel) it also applies RoPE to q and k and writes
the new token's K/V row (encoded to the cache's dtype, the same bytes ``kv_cache.encode``
writes).

Built with the system C compiler into ``$LOCAL_ENGINE_CACHE`` like ``qkernel`` (a hash of the
source names the file); if that cannot be done, ``load()`` returns None and the cache attends
through PyTorch (``unavailable_reason`` says why).
"""

from __future__ import annotations

import ctypes

from local_engine import qkernel

_FLAGS = ["-O3", "-mavx2", "-mfma", "-mf16c", "-fPIC", "-shared"]

unavailable_reason: str | None = None


def _build() -> ctypes.CDLL:
    lib = qkernel.compile_shared("kv_kernel", qkernel.c_source("kv_kernel"), _FLAGS, link=("-lm",))
    f = lib.kv_step
    f.restype = None
    p, i = ctypes.c_void_p, ctypes.c_int
    f.argtypes = [p, p, p, p, p, p, i, i, i, i, p, i, i, i, i, ctypes.c_float, p, p]
    return lib


def load() -> ctypes.CDLL | None:
    """The compiled kernel, or None (then ``unavailable_reason`` says why)."""
    global unavailable_reason
    lib, unavailable_reason = _ONCE.get()
    return lib


_ONCE = qkernel.OnceBuilt(_build)
