"""RMSNorm of single fp32 rows in C, for the MoE model's one-token decode step (models/moe_step.py).

Why C: on one row (a decode token's hidden state, or its 16 q / k heads) PyTorch's ``F.rms_norm``
is dispatch, not arithmetic: 12-18 us a call measured here for a 768-wide row, and a 24-layer
Qwen3-MoE token makes 72 of them. A ctypes call is ~1-2 us.

Built with the system C compiler into ``$LOCAL_ENGINE_CACHE`` like ``qkernel`` (a hash of the
source names the file); if that cannot be done, ``load()`` returns None and the step keeps the
PyTorch path (``KERNEL.get()`` says why).
"""

from __future__ import annotations

import ctypes

from local_engine import qkernel

_FLAGS = ["-O3", "-mavx2", "-mfma", "-fPIC", "-shared"]


def _build() -> ctypes.CDLL:
    lib = qkernel.compile_shared("norm_kernel", qkernel.c_source("norm_kernel"), _FLAGS, link=("-lm",))
    p, i, f = ctypes.c_void_p, ctypes.c_int, ctypes.c_float
    lib.rms_row.restype = None
    lib.rms_row.argtypes = [p, p, f, i, p]
    lib.head_norms.restype = None
    lib.head_norms.argtypes = [p, i, i, i, p, p, f]
    return lib


# ``KERNEL.get()``: (the library, None) or (None, why it could not be built)
KERNEL = qkernel.OnceBuilt(_build)
