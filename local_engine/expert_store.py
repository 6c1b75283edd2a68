"""Where expert bytes come from at run time: the byte-bounded cache, else positional reads.

``ExpertStore.request(layer, experts)`` is the only entry point the model uses. It takes every
expert a layer needs for this step at once, starts all misses immediately on a thread pool
(``os.preadv`` releases the GIL, so several reads are in flight while Python computes), hands
back cache hits first so compute overlaps the reads, then misses in completion order. Each
miss is ONE read of a 4 KiB-aligned bundle into a page-aligned anonymous buffer, optionally
with ``O_DIRECT`` so the page cache neither helps nor hides anything.

Memory: the cache holds at most ``budget_bytes`` of bundles; in addition at most
``max_inflight`` bundles are in flight or awaiting compute (the working set, reported as
``working_set_bytes``), so peak RSS ~ resident + budget + working set + runtime.

Buffers are recycled through a free list (evicted or never-admitted bundles), so a miss costs
one read and no page faults. Contract: a yielded buffer is valid until the consumer asks for
the next one (the model computes an expert fully before moving on).
"""

from __future__ import annotations

import mmap
import os
import queue
import resource
import threading
import time
from collections import deque
from collections.abc import Callable, Collection, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from local_engine import qkernel
from local_engine.cache import DEFAULT_POLICY, ROUTER_AWARE_POLICIES, ExpertCache
from local_engine.errors import BudgetError, PackError
from local_engine.formats.pack import EXPERTS_FILE, Manifest, bundle_views
from local_engine.formats.pack_quant import dequantize
from local_engine.models.layers import Linear
from local_engine.quant import GroupExpert, GroupLinear

VERIFY_MODES = ("always", "first", "never")
_ANON_FLAGS = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | getattr(mmap, "MAP_POPULATE", 0)  # Linux-only flag


@dataclass
class IOStats:
    bytes_read: int = 0
    reads: int = 0
    io_wait_s: float = 0.0  # time the compute thread sat blocked on reads
    io_busy_s: float = 0.0  # wall time with >= 1 read in flight
    steps: int = 0
    prefetch_reads: int = 0  # speculative reads done (next-layer guess; cancelled ones not counted)
    prefetch_used: int = 0  # ... that a later request consumed
    standin_reads: int = 0  # misses served by the stand-in pack's bundle instead of their own
    offloaded_compute_s: float = 0.0  # request(work=...): misses' compute done in the reader threads


@dataclass(frozen=True)
class StoreSnapshot:
    """The store's running counters at one moment; the difference of two accounts what ran between."""

    bytes_read: int = 0  # IOStats' counters (their meaning: there)
    io_busy_s: float = 0.0
    io_wait_s: float = 0.0
    hits: int = 0  # the expert cache's (CacheStats)
    misses: int = 0

    def __sub__(self, other: StoreSnapshot) -> StoreSnapshot:
        return StoreSnapshot(self.bytes_read - other.bytes_read, self.io_busy_s - other.io_busy_s,
                             self.io_wait_s - other.io_wait_s, self.hits - other.hits, self.misses - other.misses)


class StoreObserver(Protocol):
    """Told every request and every batch of file slots read together: a research recorder
    (benchmarks/cache_research.py's ``TraceRecorder``), never needed to serve."""

    def requested(self, layer: int, experts: Sequence[int], n_tokens: int, uses: Sequence[int],
                  probs: Sequence[float] | None) -> None: ...

    def read(self, slots: Sequence[int]) -> None: ...


def peak_rss_bytes() -> int:
    """This process's own peak RSS: ``VmHWM`` of /proc/self/status (Linux), else ``ru_maxrss``.

    Not ``ru_maxrss`` first: Linux carries it across fork + exec, so a child started by a parent
    that once held 5 GB reported 5 GB whatever it used itself (benchmarks/moe_stream.py's workers,
    spawned by the process that had generated the checkpoint, all read 5165 MiB). ``VmHWM``
    belongs to the address space that exec created.
    """
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class _BundleFile:
    """One pack's experts.bin: its descriptor (O_DIRECT where the filesystem takes it), a free list
    of page-aligned read buffers of its stride, and which bundles have had their checksum checked."""

    def __init__(self, m: Manifest, direct: bool, keep: int) -> None:
        self.m, self.stride, self.keep = m, m.stride, keep
        self.path = m.root / EXPERTS_FILE
        self.free: deque[mmap.mmap] = deque()  # append/pop are atomic: safe across reader threads
        self.verified = bytearray(m.num_bundles)
        self.checksum = m.checksum_fn  # the manifest's algorithm: crc32c, crc32 in version 1 packs
        self.direct = False
        if direct and hasattr(os, "O_DIRECT"):
            try:
                self.fd = os.open(self.path, os.O_RDONLY | os.O_DIRECT)
                self.direct = True
            except OSError:  # tmpfs and some filesystems refuse O_DIRECT: fall back to buffered
                self.fd = os.open(self.path, os.O_RDONLY)
        else:
            self.fd = os.open(self.path, os.O_RDONLY)

    def alloc(self) -> mmap.mmap:
        try:
            return self.free.pop()
        except IndexError:
            # page-aligned (a valid O_DIRECT target) and populated now: otherwise the read itself
            # faults in and zeroes every page of a fresh buffer, which at large budgets (every
            # admitted bundle is a new buffer) halved the achieved read bandwidth and tripled I/O wait
            return mmap.mmap(-1, self.stride, flags=_ANON_FLAGS)

    def release(self, buf: mmap.mmap) -> None:
        if len(self.free) < self.keep:
            self.free.append(buf)


def check_standins(main: Manifest, alt: Manifest) -> None:
    """Refuse a stand-in pack that is not the same model's experts in a grouped (int2 / int4) layout."""
    why = []
    for what, a, b in (("architecture", main.arch, alt.arch), ("experts per layer", main.num_experts, alt.num_experts),
                       ("MoE layers", main.moe_layers, alt.moe_layers), ("hidden size", main.hidden_size, alt.hidden_size),
                       ("expert width", main.intermediate_size, alt.intermediate_size)):
        if a != b:
            why.append(f"{what} {b} != {a}")
    if alt.quant not in ("int2", "int4") or alt.group_size % 32 or alt.intermediate_size % 32 or alt.hidden_size % 32:
        why.append(f"its experts are {alt.quant} with group {alt.group_size}: stand-ins must be int2 or int4 packs "
                   "whose group size and widths are multiples of 32")
    if why:
        raise PackError(f"{alt.root}: cannot stand in for {main.root}: {'; '.join(why)}")


class ExpertStore:
    def __init__(self, manifest: Manifest, budget_bytes: int, policy: str = DEFAULT_POLICY, readers: int = 8,
                 direct: bool = True, verify: str = "first", min_resident_experts: int = 1,
                 max_inflight: int | None = None, observer: StoreObserver | None = None,
                 standins: Manifest | None = None) -> None:
        """``standins``: another pack of the same model (int2, or int4 under an int4/none pack) whose
        bundle ``request`` reads instead of a missed expert's own when the caller allows it
        (``standin_ok``): HOBBIT's low-bit stand-ins for experts not worth waiting for. Its bundles
        are never cached; their reads count in ``bytes_read`` and in ``standin_reads``.
        ``readers``: the I/O threads; ``observer``: told every request and read (off: None)."""
        self.top_k = min_resident_experts
        if verify not in VERIFY_MODES:
            raise ValueError(f"verify must be one of {VERIFY_MODES}")
        self.m = manifest
        self.stride = manifest.stride
        if 0 < budget_bytes < min_resident_experts * self.stride:
            need = min_resident_experts * self.stride
            raise BudgetError(
                f"memory budget {budget_bytes} B is below one layer's active experts "
                f"({min_resident_experts} x {self.stride} B = {need} B); use 0 to stream every "
                f"expert, or a budget >= {need} B")
        # When the whole expert bank fits nothing is ever evicted, and a policy's bookkeeping is
        # pure cost (adaptive: ~1 ms a token over 24 layers x top-8 here, router ~3.8): plain LRU,
        # the cheapest, serves then. `cache_policy` in the stats says which one runs.
        effective = "lru" if budget_bytes >= manifest.expert_bank_bytes else policy
        self.cache = ExpertCache(budget_bytes, effective, on_evict=lambda _k, buf: self._release(buf),
                                 item_bytes=self.stride)
        self.verify = verify
        self.max_inflight = max(max_inflight or 0, min_resident_experts, 2 * readers)
        if standins is not None:
            check_standins(manifest, standins)
        self._main = _BundleFile(manifest, direct, self.max_inflight)
        self.path, self.fd, self.direct = self._main.path, self._main.fd, self._main.direct
        self._alt = _BundleFile(standins, direct, self.max_inflight) if standins is not None else None
        self.pool = ThreadPoolExecutor(max_workers=readers, thread_name_prefix="expert-read")
        self.closed = False
        self.readers = readers
        self.io = IOStats()
        self.observer = observer
        self._lock = threading.Lock()
        self._inflight = 0
        self._busy_since = 0.0
        self._t0 = time.perf_counter()
        # speculative reads for the next layer (see prefetch()); keys -> read in flight or done
        self._prefetched: dict[tuple[int, int], Future[mmap.mmap]] = {}
        # int2 / int4 experts are multiplied packed (qkernel); None: dequantised, F.linear
        self._qlib = qkernel.load() if manifest.quant in ("int2", "int4") else None
        # one token's expert in one kernel call (the decode step), where the kernel can block it
        self.expert_fn = self._group_expert(manifest)
        # ... and a stand-in's (the stand-in pack is checked to have one)
        self.standin_fn = self._group_expert(standins) if standins is not None else None
        if standins is not None and self.standin_fn is None:
            raise PackError(f"{standins.root}: stand-ins need the compiled kernel ({qkernel.unavailable_reason})")

    @property
    def standins_quant(self) -> str | None:
        """The stand-in pack's expert format ("int2", "int4"), None without stand-ins."""
        return self._alt.m.quant if self._alt is not None else None

    @staticmethod
    def _group_expert(m: Manifest) -> GroupExpert | None:
        H, inter, G = m.hidden_size, m.intermediate_size, m.group_size
        lib = qkernel.load() if m.quant in ("int2", "int4") else None
        if lib is None or H % 32 or inter % 32 or G % 32:
            return None
        return GroupExpert(lib, m.quant, {p.name: p.offset for p in m.parts}, H, inter, G)

    # ------------------------------------------------------------------ buffers
    def _release(self, buf: mmap.mmap) -> None:
        self._main.release(buf)

    # ------------------------------------------------------------------ reads
    def _read(self, layer: int, expert: int, f: _BundleFile | None = None) -> mmap.mmap:
        f = f or self._main
        off = f.m.expert_offset(layer, expert)
        buf = f.alloc()
        view = memoryview(buf)
        try:
            self._pread(f, view, off, layer, expert)
            slot = f.m.slot(layer, expert)
            if self.verify == "always" or (self.verify == "first" and not f.verified[slot]):
                crc = f.checksum(view[: f.m.bundle_nbytes])
                if crc != f.m.expert_crc(layer, expert):
                    raise PackError(f"{f.path}: checksum mismatch for layer {layer} expert {expert} "
                                    f"(offset {off}): file is corrupt, re-pack it")
                f.verified[slot] = 1
        finally:
            view.release()
        return buf

    def _read_and_work(self, layer: int, expert: int, f: _BundleFile | None,
                       work: Callable[[int, Any, bool], None]) -> mmap.mmap:
        buf = self._read(layer, expert, f)
        t0 = time.perf_counter()
        try:
            work(expert, buf, f is not None)
        except BaseException:
            (f or self._main).release(buf)
            raise
        dt = time.perf_counter() - t0
        with self._lock:
            self.io.offloaded_compute_s += dt
        return buf

    def _pread(self, f: _BundleFile, view: memoryview, off: int, layer: int, expert: int) -> None:
        """Fill `view` from the file. Only this counts as read time: the checksum after it is CPU
        work (crc32c ~0.04 ms/MiB, zlib's crc32 of version 1 packs ~0.3) and, counted in, made the
        achieved bandwidth look lower than the disk's."""
        with self._lock:
            if self._inflight == 0:
                self._busy_since = time.perf_counter()
            self._inflight += 1
        try:
            got = 0
            while got < f.stride:
                n = os.preadv(f.fd, [view[got:]], off + got)
                if n <= 0:
                    raise PackError(f"{f.path}: truncated: short read for layer {layer} expert {expert} "
                                    f"at offset {off + got}")
                got += n
        finally:
            with self._lock:
                self._inflight -= 1
                self.io.reads += 1
                self.io.bytes_read += f.stride
                if f is not self._main:
                    self.io.standin_reads += 1
                if self._inflight == 0:
                    self.io.io_busy_s += time.perf_counter() - self._busy_since

    @property
    def wants_router_probs(self) -> bool:
        """Whether `request` has a use for the router's probabilities (policy or observer)."""
        return self.observer is not None or self.cache.policy in ROUTER_AWARE_POLICIES

    def snapshot(self) -> StoreSnapshot:
        """Bytes read, I/O busy and wait time, cache hits and misses so far (see ``StoreSnapshot``)."""
        io, cs = self.io, self.cache.stats
        return StoreSnapshot(io.bytes_read, io.io_busy_s, io.io_wait_s, cs.hits, cs.misses)

    def holds(self, layer: int, expert: int) -> bool:
        """Whether the cache holds the bundle now (a request for it would hit)."""
        return (layer, expert) in self.cache

    @property
    def budget_bytes(self) -> int:
        return self.cache.budget_bytes

    @property
    def policy(self) -> str:
        """The cache policy that runs (``lru`` when the whole bank fits, whatever was asked)."""
        return self.cache.policy

    def request(self, layer: int, experts: list[int], uses: list[int] | None = None,
                n_tokens: int = 1, probs: Sequence[float] | None = None,
                standin_ok: Collection[int] = (),
                work: Callable[[int, Any, bool], None] | None = None) -> Iterator[tuple[int, Any, bool]]:
        """Yield ``(expert, buffer, standin)`` for every expert in ``experts`` (each once): hits first.

        ``uses[i]``: how many of the step's ``n_tokens`` tokens go to ``experts[i]`` (default 1
        each): evidence of popularity for the cache policy. ``probs``: the router's probability
        for every expert of the layer (mean over the step's tokens), evidence for router-aware policies.
        ``standin_ok``: experts that, on a miss, may be served by the stand-in pack's bundle (then
        ``standin`` is True and the buffer is in the stand-in's layout, ``standin_fn``).
        ``work(expert, buffer, standin)``: the caller's computation on a bundle, run before it is
        yielded: a hit's (and an adopted prefetch read's) in this thread, a miss's in the reader
        thread as soon as its bytes land, so misses are multiplied beside the caller (``work`` must
        release the GIL, as a qkernel call does, and write only what no other expert's ``work``
        writes). ``io_wait_s`` then includes
        waiting for that compute; ``offloaded_compute_s`` counts it.
        """
        keys = frozenset((layer, e) for e in experts)  # pinned for every insert of the step
        uses = uses if uses is not None else [1] * len(experts)
        self.io.steps += 1
        if self.observer is not None:
            self.observer.requested(layer, experts, n_tokens, uses, probs)
        hits: list[tuple[int, Any, bool]] = []
        todo: deque[int] = deque()
        self.cache.step(layer, n_tokens, probs)
        for e, b in zip(experts, self.cache.lookup_many([(layer, e) for e in experts], uses), strict=True):
            if b is None:
                todo.append(e)
            else:
                hits.append((e, b, False))
        pending: dict[Future[mmap.mmap], int] = {}
        # each read's future, put here by its reader thread as it completes: one blocking get per
        # miss instead of concurrent.futures.wait, whose waiter objects, locks and per-call
        # install / removal on every pending future cost ~2 ms a token at a 5% budget
        landed: queue.SimpleQueue[Future[mmap.mmap]] = queue.SimpleQueue()
        adopted: set[int] = set()  # read by prefetch, without ``work``: that runs here when it lands
        if self._prefetched:
            # adopt the speculative reads that guessed right; the rest of this layer's are waste
            for e in [e for e in todo if (layer, e) in self._prefetched]:
                todo.remove(e)
                f = self._prefetched.pop((layer, e))
                pending[f] = e
                f.add_done_callback(landed.put)
                adopted.add(e)
                self.io.prefetch_used += 1
            self._drop_prefetched(lambda k: k[0] == layer)
        alt = self._alt
        subs = {e for e in todo if e in standin_ok} if alt is not None and standin_ok else set()
        if self.observer is not None:  # the pack's own reads (a benchmark replays them on its file)
            self.observer.read([self.m.slot(layer, e) for e in todo if e not in subs])

        def fill() -> None:
            while todo and len(pending) < self.max_inflight:
                e = todo.popleft()
                src = alt if e in subs else None
                if work is None:
                    f = self.pool.submit(self._read, layer, e, src)
                else:
                    f = self.pool.submit(self._read_and_work, layer, e, src, work)
                pending[f] = e
                f.add_done_callback(landed.put)

        fill()  # reads start before any compute
        for e, b, _ in hits:
            if work is not None:
                work(e, b, False)
            yield e, b, False
        while pending:
            t = time.perf_counter()
            f = landed.get()
            self.io.io_wait_s += time.perf_counter() - t
            e = pending.pop(f)
            buf = f.result()
            if e in subs:  # a stand-in: never cached, its buffer goes back to its own free list
                fill()
                yield e, buf, True
                assert alt is not None
                alt.release(buf)
                continue
            cached = self.cache.insert((layer, e), buf, self.stride, pinned=keys)
            fill()
            if work is not None and e in adopted:
                work(e, buf, False)
            yield e, buf, False
            if not cached:  # the consumer is done with it (see contract above)
                self._release(buf)

    def prefetch(self, layer: int, experts: list[int]) -> None:
        """Start reading ``layer``'s guessed experts now (those not cached nor already coming).

        The next ``request(layer, ...)`` adopts the reads it needs and releases the others
        (their bytes count in ``bytes_read``: speculation is not free). Buffers are not admitted
        to the cache until a request uses them, so a wrong guess cannot evict anything.
        """
        slots = []
        for e in experts:
            key = (layer, e)
            if key in self.cache or key in self._prefetched:
                continue
            self._prefetched[key] = self.pool.submit(self._read, layer, e)
            self.io.prefetch_reads += 1
            slots.append(self.m.slot(layer, e))
        if self.observer is not None and slots:
            self.observer.read(slots)

    def _drop_prefetched(self, which: Callable[[tuple[int, int]], bool]) -> None:
        for key in [k for k in self._prefetched if which(k)]:
            f = self._prefetched.pop(key)
            if f.cancel():  # never started: no read, no buffer
                self.io.prefetch_reads -= 1
                continue
            # a read under way: its buffer goes back to the pool once it lands
            f.add_done_callback(lambda fut: None if fut.exception() else self._release(fut.result()))

    # ------------------------------------------------------------------ helpers
    def weights(self, buf: Any) -> tuple[Linear, Linear]:
        """(gate_up [2I, H], down [H, I]) from a bundle buffer, as ``Linear``s: fp32 tensors
        (zero-copy when stored fp32; int8 dequantised), or for int2 / int4 ``GroupLinear``s over
        the buffer's bytes (qkernel multiplies them packed: no dequantised copy, which for int4
        was 14-22x the kernel's time). Valid while the buffer is."""
        views = {p.name: (p, t) for p, t in bundle_views(self.m, buf)}
        q = self.m.quant
        out: list[Linear] = []
        for name in ("gate_up", "down"):
            p, t = views[name]
            if q in ("int2", "int4"):
                mins = views[name + ".min"][1] if q == "int2" else None
                out.append(GroupLinear(self._qlib, q, t, views[name + ".scale"][1], mins, self.m.group_size))
            elif q == "none":
                out.append(t if t.dtype == torch.float32 else t.float())
            else:
                out.append(dequantize(t, views[name + ".scale"][1], q, (p.shape[0], p.shape[1] * (2 if q == "int4" else 1))))
        return out[0], out[1]

    @property
    def working_set_bytes(self) -> int:
        # + one layer of speculative reads when prefetch is used
        return (self.max_inflight + self.top_k) * self.stride

    def stats(self) -> dict[str, Any]:
        io = self.io
        return {
            "cache_policy": self.cache.policy,
            "cache_budget_bytes": self.cache.budget_bytes,
            "cache_used_bytes": self.cache.used_bytes,
            "cache_items": len(self.cache),
            **{f"cache_{k}": v for k, v in self.cache.stats.as_dict().items()},
            "bytes_read": io.bytes_read,
            "reads": io.reads,
            "read_bandwidth_Bps": io.bytes_read / io.io_busy_s if io.io_busy_s else 0.0,
            "io_wait_s": io.io_wait_s,
            "io_busy_s": io.io_busy_s,
            "o_direct": self.direct,
            "prefetch_reads": io.prefetch_reads,
            "prefetch_used": io.prefetch_used,
            "standin_uses": io.standin_reads,
            "offloaded_compute_s": io.offloaded_compute_s,
            "working_set_bytes": self.working_set_bytes,
            "peak_rss_bytes": peak_rss_bytes(),
        }

    def reset_stats(self) -> None:
        self.io = IOStats()
        self.cache.stats = type(self.cache.stats)()

    def close(self) -> None:
        """Stop the reader threads and close the file (idempotent: a reused fd number is never hit)."""
        if self.closed:
            return
        self.closed = True
        self._drop_prefetched(lambda _k: True)
        self.pool.shutdown(wait=True)
        os.close(self.fd)
        if self._alt is not None:
            os.close(self._alt.fd)
        self.cache.clear()
