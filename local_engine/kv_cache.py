"""Compressed and bounded KV caches: fewer bytes per token, and flat memory past a window.

    cfg = KVConfig(dtype="int8", max_tokens=2048, sinks=4)     # or KVConfig.parse({...}) from a policy
    cache = CompressedKVCache(cfg, n_layers, n_kv_heads, head_dim, max_seq, rope)

``layers.KVCache`` (fp32, unbounded up to ``max_seq``) stays the default: it is what the fused
fp32 decode kernel (``qkernel.attn_step``) and the prefix cache were built for. A model builds a
``CompressedKVCache`` instead when its ``KVConfig`` is not the default; ``layers.attention`` then
hands the cache the *unrotated* q/k/v (``attend``) and the fused decode step hands it the q|k|v
rows (``step``): the cache owns RoPE positions, storage and the attention over what it holds.

Storage (``.kv``: ``[layers, 2 * kv_heads, capacity, row]``, K heads then V heads, positions on
dim 2 like ``KVCache.kv``), one row per head per token, in blocks of ``GROUP`` = 32 channels:

    f32   4 B a channel
    bf16  2 B a channel (round to nearest even)
    int8  per block: fp16 scale d, 32 x int8 (x = d q, |q| <= 127)           34 B per 32 channels
    int4  per block: fp16 scale d, fp16 min m, 16 B of nibbles (x = d q + m)  20 B per 32 channels;
          element i in the low nibble of byte i, element i + 16 in its high nibble (as GGUF Q4_1)

so the scales are per head, per token, per group of 32 channels; with head_dim 64, int8 is 0.266x
f32's bytes per token, int4 0.156x. Keys are stored after RoPE (as llama.cpp does).

Window with attention sinks (StreamingLLM, Xiao et al. 2023), when ``max_tokens`` is set: the
cache attends to the first ``sinks`` tokens and the latest ``max_tokens - sinks``; older ones are
evicted (a ring buffer over the non-sink slots), so memory is ``capacity = max_tokens + SLACK``
rows whatever the length. StreamingLLM gives each cached token its position *within the cache*
(sinks 0..s-1, then the window in order, the query last) rather than its position in the text.
RoPE scores depend only on the distance between query and key, so the same scores come out
without re-rotating anything: window keys keep the rotation of their text position (their
distance to the query is the same in both numberings, the window being contiguous and ending at
the query), and the query is rotated twice, at its text position for the window keys and at its
cache position ``min(pos, max_tokens - 1)`` for the sink keys. Positions past the model's RoPE
table are computed in float64 on the fly, so generation goes on past ``max_seq``.

``SLACK`` = 16 spare rows are what make rollback safe: a speculative verify (<= 9 tokens) writes
past the window and ``crop`` takes them back; the rows it overwrote had already left the window.
A longer crop after the ring wrapped raises. For the same reason a prefill chunk runs in pieces
of <= ``SLACK`` tokens once it reaches past the ring's end, so every token sees exactly its window.

Prefix cache (``local_engine/prefix_cache.py``): a compressed cache is kept and reused like the
fp32 one (its entries cost its own bytes per token, so the same budget holds ~3.8x more int8
tokens); a bounded cache whose ring has wrapped no longer holds positions 0..n-1 of its text, so
it is not kept (``reusable`` is false).
"""

from __future__ import annotations

import ctypes
import itertools
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from local_engine import kv_kernel
from local_engine.errors import ContextOverflow
from local_engine.models.layers import RopeTables, group_cuts

DTYPES = ("f32", "bf16", "int8", "int4")
GROUP = 32  # channels per scale block (llama.cpp's q8_0 / q4_1 size); head_dim must be a multiple
SLACK = 16  # spare ring rows for rollback: >= a speculative verify (speculative.DRAFT_K + 1 tokens)
DEFAULT_SINKS = 4  # StreamingLLM's choice: four initial tokens hold most of the attention sink
_DT_CODE = {"f32": 0, "bf16": 1, "int8": 2, "int4": 3}


@dataclass(frozen=True)
class KVConfig:
    """``dtype`` of stored K/V; ``max_tokens`` (None: unbounded up to ``max_seq``) and ``sinks``."""

    dtype: str = "f32"
    max_tokens: int | None = None
    sinks: int = DEFAULT_SINKS

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"kv_cache dtype must be one of {', '.join(DTYPES)}, not {self.dtype!r}")
        if self.sinks < 0:
            raise ValueError(f"kv_cache sinks must be >= 0, not {self.sinks}")
        if self.max_tokens is not None and self.max_tokens < self.sinks + SLACK:
            raise ValueError(f"kv_cache max_tokens ({self.max_tokens}) must be at least sinks + {SLACK} "
                             f"({self.sinks + SLACK})")

    @property
    def plain(self) -> bool:
        """The default fp32, unbounded cache (``layers.KVCache``)."""
        return self.dtype == "f32" and self.max_tokens is None

    @property
    def bounded(self) -> bool:
        return self.max_tokens is not None

    def as_dict(self) -> dict[str, Any]:
        return {"dtype": self.dtype, "max_tokens": self.max_tokens, "sinks": self.sinks}

    @classmethod
    def parse(cls, value: KVConfig | Mapping[str, Any] | None) -> KVConfig:
        """From a policy's / CLI's mapping (``dtype``, ``max_tokens``, ``sinks``); ValueError if bad."""
        if value is None:
            return cls()
        if isinstance(value, KVConfig):
            return value
        unknown = set(value) - {"dtype", "max_tokens", "sinks"}
        if unknown:
            raise ValueError(f"kv_cache: unknown key(s) {', '.join(sorted(unknown))} (dtype, max_tokens, sinks)")
        mt = value.get("max_tokens")
        try:
            return cls(dtype=str(value.get("dtype") or "f32"), max_tokens=None if mt is None else int(mt),
                       sinks=int(value.get("sinks", DEFAULT_SINKS)))
        except (TypeError, ValueError) as e:
            raise ValueError(str(e) if str(e).startswith("kv_cache") else f"kv_cache: {e}") from None


def row_bytes(dtype: str, head_dim: int) -> int:
    """Bytes of one head's K (or V) row of one token."""
    if dtype == "f32":
        return 4 * head_dim
    if dtype == "bf16":
        return 2 * head_dim
    blocks = head_dim // GROUP
    return blocks * (2 + GROUP) if dtype == "int8" else blocks * (4 + GROUP // 2)


def bytes_per_token(cfg: KVConfig, n_layers: int, n_kv_heads: int, head_dim: int) -> int:
    return n_layers * 2 * n_kv_heads * row_bytes(cfg.dtype, head_dim)


def check(cfg: KVConfig, head_dim: int, context_length: int) -> None:
    """ValueError if the model cannot use ``cfg`` (block size, window longer than the context)."""
    if cfg.dtype in ("int8", "int4") and head_dim % GROUP:
        raise ValueError(f"kv_cache dtype {cfg.dtype} needs a head_dim that is a multiple of {GROUP} "
                         f"(this model's is {head_dim})")
    if cfg.max_tokens is not None and cfg.max_tokens > context_length:
        raise ValueError(f"kv_cache max_tokens ({cfg.max_tokens}) is longer than the model's context "
                         f"({context_length} tokens)")


# ----------------------------------------------------------------------------------- codecs


def encode(x: torch.Tensor, dtype: str) -> torch.Tensor:
    """fp32 rows ``[..., head_dim]`` -> stored rows ``[..., row_bytes]`` (the C kernel writes the same bytes)."""
    if dtype == "f32":
        return x.float()
    if dtype == "bf16":
        return x.to(torch.bfloat16)
    lead = x.shape[:-1]
    b = x.float().reshape(*lead, -1, GROUP)
    if dtype == "int8":
        d16 = (b.abs().amax(-1) / 127).half()
        d = d16.float()
        inv = torch.where(d > 0, 1.0 / d, torch.zeros_like(d))
        q = (b * inv[..., None]).round_().clamp_(-127, 127).to(torch.int8)
        out = torch.cat((d16[..., None].view(torch.uint8), q.view(torch.uint8)), -1)
    else:
        lo, hi = b.amin(-1), b.amax(-1)
        d16, m16 = ((hi - lo) / 15).half(), lo.half()
        d, m = d16.float(), m16.float()
        inv = torch.where(d > 0, 1.0 / d, torch.zeros_like(d))
        q = ((b - m[..., None]) * inv[..., None]).round_().clamp_(0, 15).to(torch.uint8)
        nib = q[..., :GROUP // 2] | (q[..., GROUP // 2:] << 4)
        out = torch.cat((d16[..., None].view(torch.uint8), m16[..., None].view(torch.uint8), nib), -1)
    return out.reshape(*lead, -1)


def decode(rows: torch.Tensor, dtype: str, head_dim: int) -> torch.Tensor:
    """Stored rows ``[..., row_bytes]`` -> fp32 ``[..., head_dim]``."""
    if dtype in ("f32", "bf16"):
        return rows.float()
    lead = rows.shape[:-1]
    b = rows.reshape(*lead, head_dim // GROUP, -1)
    d = b[..., 0:2].contiguous().view(torch.float16).float()
    if dtype == "int8":
        x = b[..., 2:].view(torch.int8).float() * d
    else:
        m = b[..., 2:4].contiguous().view(torch.float16).float()
        nib = b[..., 4:]
        q = torch.cat((nib & 0xF, nib >> 4), -1).float()
        x = q * d + m
    return x.reshape(*lead, head_dim)


# ----------------------------------------------------------------------------------- RoPE rows


def _rope_rows(rope: RopeTables, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(cos, sin, signed sin) rows ``[T, head_dim]`` for positions ``pos`` [T], from the model's table
    where it reaches, else in float64 (angles of positions past the table stay exact)."""
    if int(pos.max()) < rope.max_pos:
        return rope.cos[pos], rope.sin[pos], rope._sin_signed[pos]
    ang = torch.outer(pos.double(), rope.inv_freq.double())
    emb = torch.cat((ang, ang), -1)
    cos = (emb.cos() * rope.attention_factor).float()
    sin = (emb.sin() * rope.attention_factor).float()
    half = sin.shape[-1] // 2
    return cos, sin, torch.cat((-sin[:, :half], sin[:, half:]), -1)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor) -> torch.Tensor:
    return torch.addcmul(x * cos, x.roll(x.shape[-1] // 2, -1), sin_signed)


# ----------------------------------------------------------------------------------- the cache


class CompressedKVCache:
    """``dtype`` rows for every layer; optionally a window of ``max_tokens`` with ``sinks``."""

    def __init__(self, cfg: KVConfig, n_layers: int, n_kv_heads: int, head_dim: int, max_seq: int,
                 rope: RopeTables) -> None:
        self.cfg, self.dtype = cfg, cfg.dtype
        self.n_layers, self.n_kv_heads, self.head_dim = n_layers, n_kv_heads, head_dim
        self.rope = rope
        if cfg.max_tokens is None:
            self.sinks, self.window, self.capacity = 0, max_seq, max_seq
            self.max_seq = max_seq  # positions: the cache refuses to grow past it
        else:
            self.sinks = min(cfg.sinks, cfg.max_tokens)
            self.window = cfg.max_tokens - self.sinks  # latest non-sink tokens attended
            self.capacity = cfg.max_tokens + SLACK
            self.max_seq = 2**62  # no position limit: old tokens are evicted
        self.ring = self.capacity - self.sinks  # non-sink slots
        self.row = row_bytes(cfg.dtype, head_dim)
        store = {"f32": torch.float32, "bf16": torch.bfloat16}.get(cfg.dtype, torch.uint8)
        width = head_dim if cfg.dtype in ("f32", "bf16") else self.row
        # empty, not zeros: rows are written before they are read, and untouched pages of an
        # unbounded cache never become resident memory
        self.kv = torch.empty(n_layers, 2 * n_kv_heads, self.capacity, width, dtype=store)
        self.high = 0  # the longest length this cache has held since reset (what was ever written)
        self._length = 0
        self._lib = kv_kernel.load()
        self._plan: tuple[int, Any] | None = None
        self._scores = torch.empty(0)

    # ------------------------------------------------------------------ accounting
    @property
    def bytes_per_token(self) -> int:
        return self.n_layers * 2 * self.n_kv_heads * self.row

    @property
    def capacity_bytes(self) -> int:
        """Bytes of rows this cache can ever hold (its whole allocation when bounded)."""
        return self.capacity * self.bytes_per_token

    @property
    def resident_bytes(self) -> int:
        """Bytes of rows written so far: what the sequence costs in memory."""
        return min(self.high, self.capacity) * self.bytes_per_token

    @property
    def wrapped(self) -> bool:
        return self.high > self.capacity

    @property
    def reusable(self) -> bool:
        """Positions 0..length-1 hold the sequence's tokens (the prefix cache may keep it)."""
        return not self.wrapped

    @property
    def length(self) -> int:
        return self._length

    @length.setter
    def length(self, n: int) -> None:  # the prefix cache sets it after copying rows in
        self._length = n
        self.high = max(self.high, n)

    def advance(self, n: int) -> None:
        self.length = self._length + n

    def crop(self, n: int) -> None:
        if n >= self.length:
            return
        if self.wrapped and n < self.high - SLACK:
            raise ValueError(f"cannot crop a bounded KV cache back {self.high - n} tokens: its ring has "
                             f"overwritten them (at most {SLACK} after the window filled)")
        self._length = n

    def reset(self) -> None:
        self._length = self.high = 0
        self._plan = None

    # ------------------------------------------------------------------ positions
    def slot(self, a: int) -> int:
        return a if a < self.sinks else self.sinks + (a - self.sinks) % self.ring

    def _slots(self, pos: torch.Tensor) -> torch.Tensor:
        return torch.where(pos < self.sinks, pos, self.sinks + (pos - self.sinks) % self.ring)

    def _cache_pos(self, pos: torch.Tensor) -> torch.Tensor:
        """StreamingLLM's position of a query: within the cache (sinks + window - 1 at most)."""
        return pos.clamp(max=self.sinks + self.window - 1)

    def _check_room(self, end: int) -> None:
        if end > self.max_seq:
            raise ContextOverflow(f"context length exceeded: {end} > {self.max_seq} tokens")

    # ------------------------------------------------------------------ attention, any T
    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Unrotated ``q [Hq, T, Dh]``, ``k``/``v`` ``[Hkv, T, Dh]`` of the tokens after ``length``:
        rotate, store, attend. Returns ``[Hq, T, Dh]``; the caller advances once all layers ran."""
        hq, T, hd = q.shape
        if T == 1 and self._lib is not None:
            r = torch.cat((q[:, 0], k[:, 0], v[:, 0])).float().contiguous()
            out = torch.empty(hq * hd)
            self.step(layer, r, out)
            return out.view(hq, 1, hd)
        start = self.length
        # One call per attention group (layers.prefill_attention: a prefix hit then computes each
        # row in the call a fresh run does). Past the ring's end, pieces of <= SLACK tokens: a
        # piece's writes then overwrite only rows that have left the window of every query in it,
        # so each token sees exactly its window.
        cuts = [c - start for c in group_cuts(start, start + T)]
        if start + T > self.capacity:
            ring = max(0, self.capacity - start)
            cuts += [ring, *range(ring, T, SLACK)]
        cuts = sorted(set(cuts))
        if len(cuts) == 2:
            return self._attend(layer, q, k, v, start)
        return torch.cat([self._attend(layer, q[:, a:b], k[:, a:b], v[:, a:b], start + a)
                          for a, b in itertools.pairwise(cuts) if b > a], 1)

    def _attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int) -> torch.Tensor:
        hq, T, hd = q.shape
        hk = self.n_kv_heads
        self._check_room(start + T)
        pos = torch.arange(start, start + T)
        cos, _, sin = _rope_rows(self.rope, pos)
        q, k = q.float(), k.float()
        qw, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
        slots = self._slots(pos)
        self.kv[layer, :hk, slots] = encode(k, self.dtype).to(self.kv.dtype)
        self.kv[layer, hk:, slots] = encode(v.float(), self.dtype).to(self.kv.dtype)
        end = start + T  # length once this step is in
        used = min(end, self.capacity)
        # the text position of what each used slot holds now
        s = torch.arange(used)
        last = end - 1
        held = last - (self._slots(torch.tensor([last])) - s) % self.ring
        held = torch.where(s < self.sinks, s, held)
        qpos = pos[:, None]
        visible = (held[None, :] <= qpos) & ((held[None, :] < self.sinks) | (held[None, :] > qpos - self.window))
        visible &= held[None, :] >= 0
        kv = decode(self.kv[layer, :, :used], self.dtype, hd)
        K, V = kv[:hk], kv[hk:]
        g = hq // hk
        scale = 1.0 / math.sqrt(hd)
        att = torch.bmm(qw.reshape(hk, g * T, hd), K.transpose(1, 2))
        ns = min(self.sinks, used)
        cpos = self._cache_pos(pos)
        if ns and bool((cpos != pos).any()):
            c2, _, s2 = _rope_rows(self.rope, cpos)
            qs = _rotate(q, c2, s2).reshape(hk, g * T, hd)
            att[:, :, :ns] = torch.bmm(qs, K[:, :ns].transpose(1, 2))
        att = (att * scale).masked_fill_(~visible.repeat(g, 1), float("-inf")).softmax(-1)
        return torch.bmm(att, V).view(hq, T, hd)

    # ------------------------------------------------------------------ attention, one token (C)
    def step(self, layer: int, r: torch.Tensor, out: torch.Tensor) -> None:
        """The decode step's attention: ``r`` = unrotated q|k|v rows ``[Hq + 2 Hkv, Dh]`` fp32,
        contiguous (rotated in place); writes ``[Hq * Dh]`` into ``out``. Layer 0 plans the step."""
        if self._lib is None:
            hq = r.shape[0] - 2 * self.n_kv_heads
            hk = self.n_kv_heads
            x = r.view(-1, 1, self.head_dim)
            out.view(-1).copy_(self.attend(layer, x[:hq], x[hq:hq + hk], x[hq + hk:]).reshape(-1))
            return
        if self._plan is None or self._plan[0] != self.length:
            self._plan = (self.length, self._make_plan())
        p = self._plan[1]
        hk, hd = self.n_kv_heads, self.head_dim
        hq = r.shape[0] - 2 * hk
        need = (hq // hk) * self.capacity + hq * hd + 2 * hd  # scores, the sink-rotated q, a decoded row
        if self._scores.numel() < need:
            self._scores = torch.empty(need)
        self._lib.kv_step(r.data_ptr(), p["cw"], p["sw"], p["cs"], p["ss"], self.kv[layer].data_ptr(),
                          _DT_CODE[self.dtype], self.capacity, self.kv.shape[-1] * self.kv.element_size(),
                          p["slot"], p["ranges_ptr"], p["n_ranges"], hq, hk, hd, 1.0 / math.sqrt(hd),
                          out.data_ptr(), self._scores.data_ptr())

    def _make_plan(self) -> dict[str, Any]:
        a = self.length
        self._check_room(a + 1)
        pos = torch.tensor([a])
        cw, sw, _ = _rope_rows(self.rope, pos)
        cpos = self._cache_pos(pos)
        cs, ss = (cw, sw) if int(cpos[0]) == a else _rope_rows(self.rope, cpos)[:2]
        rows = [cw[0].contiguous(), sw[0].contiguous(), cs[0].contiguous(), ss[0].contiguous()]
        # visible slots as (first slot, count, sink?) ranges: the sinks, then the window (<= 2 pieces)
        ranges: list[int] = []
        ns = min(self.sinks, a + 1)
        if ns:
            ranges += [0, ns, 1]
        lo = max(self.sinks, a + 1 - self.window)
        n = a + 1 - lo
        if n > 0:
            s0 = self.slot(lo)
            first = min(n, self.sinks + self.ring - s0)
            ranges += [s0, first, 0]
            if n > first:
                ranges += [self.sinks, n - first, 0]
        arr = (ctypes.c_int * len(ranges))(*ranges)
        return {"cw": rows[0].data_ptr(), "sw": rows[1].data_ptr(), "cs": rows[2].data_ptr(),
                "ss": rows[3].data_ptr(), "rows": rows, "slot": self.slot(a), "ranges": arr,
                "ranges_ptr": ctypes.addressof(arr), "n_ranges": len(ranges) // 3}


def new_cache(cfg: KVConfig, n_layers: int, n_kv_heads: int, head_dim: int, max_seq: int,
              rope: RopeTables) -> CompressedKVCache:
    return CompressedKVCache(cfg, n_layers, n_kv_heads, head_dim, max_seq, rope)


def kv_bytes(cache: Any) -> int:
    """Bytes of K/V rows a cache holds now (a ``KVCache``: its length; a compressed one: rows written)."""
    if isinstance(cache, CompressedKVCache):
        return cache.resident_bytes
    return int(cache.length) * int(cache.bytes_per_token)
