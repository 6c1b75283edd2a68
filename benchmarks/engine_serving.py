"""The local engine serving an agent's conversation (issue #18).

(a) time to first token of turn 5 of a 5-turn conversation with a ~1,500-token system prompt,
prefix cache on vs off (target >= 5x); (b) prefill tok/s and peak RSS at 256 / 1k / 4k prompt
tokens, chunked (the default, models/llama.py PREFILL_CHUNK) and in one pass, each size in its own
process (peak RSS is the process's VmHWM); (c) aggregate decode tok/s of 1 / 4 / 8 concurrent
requests through the scheduler (local_engine/scheduler.py: continuous batching; target >= 2.5x
the single stream at 8), and the model's batched step alone; (d) p95 time to first token of short
requests arriving while a 4k-token prompt is prefilled, against the same requests on an idle
engine and against the wait behind the whole prefill that one-at-a-time serving gave.

Turns 1-4 run once on the engine with the cache (greedy, so the conversation is the same for both
runs); turn 5 is then timed on that engine (its prefix cache holds turn 4) and on the same model
with the cache off (`prefix_cache_mb=0`, best of --repeat). TTFT is wall time from `chat()`
to the first text delta (template, tokenising, cache lookup and copy, prefill, first sample).

    /work/bin/benchslot env OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/engine_serving.py \\
        --parts a,b | tee benchmarks/results/engine_serving.txt          # then --parts c,d | tee -a

(b) and (c) put llama.cpp (llama-cpp-python, benchmark-only: benchmarks/requirements-llamacpp.txt)
beside ours on the same GGUF and threads when it is installed. Any request that fails ends the run
with its error and exit status 1: a figure over failed requests means nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

from local_engine.engine import Engine, default_threads
from local_engine.expert_store import peak_rss_bytes

QUESTIONS = ["Which tool finds a flight from Paris to Rome next Monday?",
             "And what would you pass as the date argument?",
             "Now book a hotel near the Colosseum for two nights.",
             "What is the total if the hotel costs 120 euros a night?",
             "Summarise the plan in one sentence."]


def system_prompt(eng: Any, tokens: int) -> str:
    """An agent's system prompt: instructions and a tool block, cut to about ``tokens`` tokens.
    ``eng``: anything with a ``tokenizer`` (an Engine), or a tokenizer itself."""
    tok = getattr(eng, "tokenizer", eng)
    lines = ["You are a travel agent. Use the tools below when they help; answer briefly."]
    i = 0
    while len(tok.encode("\n".join(lines))) < tokens:
        i += 1
        lines.append(f"Tool {i}: search_{i}(city: string, date: string, max_price_{i}: integer) returns "
                     f"offers of kind {i % 7} sorted by price; call it only when the user asks about kind {i % 7}.")
    return "\n".join(lines)


def ttft(eng: Engine, messages: list[dict[str, Any]], max_tokens: int) -> tuple[float, str, int]:
    t0 = time.perf_counter()
    gen = eng.chat(messages, max_tokens=max_tokens, temperature=0)
    first = None
    parts = []
    for delta in gen:
        if first is None:
            first = time.perf_counter() - t0
        parts.append(delta)
    return (first if first is not None else time.perf_counter() - t0), "".join(parts), gen.stats.cached_tokens


def prefill_child(model: str, threads: int | None, n: int, chunked: bool) -> None:
    """In a fresh process: prefill n tokens (warm-up on 32 first), print JSON."""
    import torch

    from local_engine.models import llama

    eng = Engine.open(model, threads=threads)
    if not chunked:
        llama.PREFILL_CHUNK = 10**9
    ids = eng.tokenizer.encode(system_prompt(eng, n + 50))[:n]
    assert len(ids) == n
    m = eng.model
    m.forward(torch.tensor(ids[:32]), m.new_cache(), last_only=True)
    base = peak_rss_bytes()
    dt = float("inf")
    for _ in range(2 if n <= 1024 else 1):  # best of 2 where it is cheap: the box is shared
        t0 = time.perf_counter()
        m.forward(torch.tensor(ids), m.new_cache(), last_only=True)
        dt = min(dt, time.perf_counter() - t0)
    kv = m.new_cache().bytes_per_token * n
    print(json.dumps({"n": n, "chunked": chunked, "tok_s": n / dt, "rss_mb": peak_rss_bytes() / 2**20,
                      "before_mb": base / 2**20, "kv_mb": kv / 2**20}))


def prefill_child_llamacpp(model: str, threads: int, n: int) -> None:
    """In a fresh process: llama.cpp (llama-cpp-python) prefilling the same n token ids from the same
    GGUF with the same threads (n_batch = n_ubatch = 512, its default), after a 32-token warm-up."""
    from llama_cpp import Llama

    from local_engine.engine import resolve
    from local_engine.store import GGUFStore
    from local_engine.tokenizer import from_gguf

    path = resolve(model)
    ids = from_gguf(GGUFStore(path)).encode(system_prompt(from_gguf(GGUFStore(path)), n + 50))[:n]
    assert len(ids) == n
    llm = Llama(model_path=str(path), n_ctx=n + 64, n_batch=512, n_ubatch=512, n_threads=threads,
                n_threads_batch=threads, verbose=False)
    llm.eval(ids[:32])
    dt = float("inf")
    for _ in range(2 if n <= 1024 else 1):
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(ids)
        dt = min(dt, time.perf_counter() - t0)
    print(json.dumps({"n": n, "tok_s": n / dt}))


def _child_json(cmd: list[str]) -> dict[str, Any]:
    """A child's last stdout line as JSON; its failure ends the benchmark with its stderr."""
    r = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if r.returncode != 0:
        raise SystemExit(f"child {' '.join(cmd[2:])} failed (exit {r.returncode}):\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.splitlines()[-1])


def prefill_table(a: argparse.Namespace) -> None:
    threads = a.threads or default_threads()
    try:
        import llama_cpp  # noqa: F401  (benchmark-only: benchmarks/requirements-llamacpp.txt)
        anchor = True
    except ImportError:
        anchor = False
    print()
    print(f"(b) prefill, {threads} thread(s) for both engines, load avg {os.getloadavg()[0]:.2f}"
          + ("" if anchor else "; llama-cpp-python not installed: no llama.cpp column"))
    print(f"{'tokens':>6} | {'mode':>8} | {'prefill tok/s':>13} | {'llama.cpp tok/s':>15} | {'ours / llama.cpp':>16} | "
          f"{'peak RSS MB':>11} | {'RSS before MB':>13} | {'KV cache MB':>11}")
    for n in a.prefill:
        ref = None
        if anchor:
            ref = _child_json([sys.executable, __file__, "--child", str(n), "--model", a.model,
                               "--threads", str(threads), "--llamacpp", "1"])["tok_s"]
        for chunked in (True, False):
            if not chunked and n > a.one_pass_max:
                continue
            r = _child_json([sys.executable, __file__, "--child", str(n), "--model", a.model,
                             "--chunked", str(int(chunked)), "--threads", str(threads)])
            lc = f"{ref:>15.1f}" if ref and chunked else f"{'':>15}"
            ratio = f"{r['tok_s'] / ref:>15.2f}x" if ref and chunked else f"{'':>16}"
            print(f"{n:>6} | {'chunked' if chunked else 'one pass':>8} | {r['tok_s']:>13.1f} | {lc} | {ratio} | "
                  f"{r['rss_mb']:>11.0f} | {r['before_mb']:>13.0f} | {r['kv_mb']:>11.1f}", flush=True)
    print("target at 4k: ours chunked >= 0.7x llama.cpp")


PARTS = ("a", "b", "c", "d")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="builtin:smollm2-135m")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--parts", default=",".join(PARTS),
                    help="comma-separated subset of a,b,c,d (split a run that would not fit one bench slot)")
    ap.add_argument("--system-tokens", type=int, default=1500)
    ap.add_argument("--max-tokens", type=int, default=24)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--prefill", type=lambda v: [int(x) for x in v.split(",") if x], default=[256, 1024, 4000],
                    help="(b): prompt sizes (4,000: the model's 4,096-token context holds it and the start token)")
    ap.add_argument("--one-pass-max", type=int, default=1024, help="largest prompt also run in one pass")
    ap.add_argument("--streams", type=lambda v: [int(x) for x in v.split(",") if x], default=[1, 4, 8],
                    help="(c): concurrent requests")
    ap.add_argument("--decode-tokens", type=int, default=48, help="(c): max_tokens per request")
    ap.add_argument("--long-prompt", type=int, default=4000,
                    help="(d): the long prompt's tokens (with the chat's start token it must fit the context)")
    ap.add_argument("--short-requests", type=int, default=12, help="(d): short requests during its prefill")
    ap.add_argument("--prefill-chunk", type=int, default=None, help="(d): the scheduler's chunk (default 256)")
    ap.add_argument("--child", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--chunked", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--llamacpp", type=int, default=0, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        if a.llamacpp:
            prefill_child_llamacpp(a.model, a.threads or default_threads(), a.child)
        else:
            prefill_child(a.model, a.threads, a.child, bool(a.chunked))
        return
    parts = [p for p in a.parts.split(",") if p]
    bad = sorted(set(parts) - set(PARTS))
    if bad:
        ap.error(f"--parts: unknown {bad} (choose from {','.join(PARTS)})")
    print(f"# {time.strftime('%Y-%m-%dT%H:%MZ', time.gmtime())} benchmarks/engine_serving.py {' '.join(sys.argv[1:])}"
          f" (commit {_commit()}), {os.cpu_count()} CPUs, load avg {os.getloadavg()[0]:.2f}", flush=True)
    run = {"a": conversation, "b": prefill_table, "c": concurrency_table, "d": ttft_under_prefill}
    for p in PARTS:
        if p in parts:
            run[p](a)


def _commit() -> str:
    r = subprocess.run(["git", "-C", os.path.dirname(os.path.abspath(__file__)), "rev-parse", "--short", "HEAD"],
                       capture_output=True, text=True, check=False)
    return r.stdout.strip() or "?"


def conversation(a: argparse.Namespace) -> None:

    eng = Engine.open(a.model, threads=a.threads)
    off = Engine(eng.model, eng.tokenizer, prefix_cache_mb=0)
    system = system_prompt(eng, a.system_tokens)
    msgs: list[dict[str, Any]] = [{"role": "system", "content": system}]
    print(f"model {a.model}, threads {eng.info()['threads']}, system prompt "
          f"{len(eng.tokenizer.encode(system))} tokens, max_tokens {a.max_tokens}, "
          f"load avg {os.getloadavg()[0]:.2f}")
    print("(a) 5-turn conversation")
    print(f"{'turn':>4} | {'prompt tok':>10} | {'cached tok':>10} | {'TTFT s (cache on)':>17}")
    for turn, q in enumerate(QUESTIONS[:4], 1):
        msgs.append({"role": "user", "content": q})
        prompt_len = len(eng.tokenizer.encode(eng.render_chat(msgs)))
        t, answer, cached = ttft(eng, msgs, a.max_tokens)
        print(f"{turn:>4} | {prompt_len:>10} | {cached:>10} | {t:>17.3f}")
        msgs.append({"role": "assistant", "content": answer})
    msgs.append({"role": "user", "content": QUESTIONS[4]})
    prompt_len = len(eng.tokenizer.encode(eng.render_chat(msgs)))
    on_runs, off_runs, answers = [], [], set()
    # cache on: timed once, since a second run of turn 5 would find turn 5's own entry (a repeat,
    # not the next turn); cache off: best of --repeat (favours the baseline)
    for _ in range(a.repeat):
        t_off, ans_off, _ = ttft(off, msgs, a.max_tokens)
        off_runs.append(t_off)
        answers.add(ans_off)
    t_on, ans_on, c_on = ttft(eng, msgs, a.max_tokens)
    on_runs.append(t_on)
    answers.add(ans_on)
    best_off = min(off_runs)
    print(f"{5:>4} | {prompt_len:>10} | {c_on:>10} | {t_on:>17.3f}")
    print()
    print(f"turn 5 ({prompt_len} prompt tokens) TTFT: cache off {best_off:.3f} s (best of {len(off_runs)}), "
          f"cache on {t_on:.3f} s ({c_on} tokens reused): {best_off / t_on:.1f}x faster (target >= 5x)")
    print(f"same greedy answer with and without the cache: {len(answers) == 1}")
    print(f"prefix cache: {eng.prefix_cache.stats()}")
    print(f"load avg after {os.getloadavg()[0]:.2f}")


STORIES = ["Write a long story about a dragon who learns to cook.", "Write a long story about a lighthouse keeper.",
           "Write a long story about a robot in a library.", "Write a long story about two rival bakers.",
           "Write a long story about a cat that runs a hotel.", "Write a long story about a river that talks.",
           "Write a long story about a clockmaker's apprentice.", "Write a long story about a garden on Mars."]


class _Run:
    """Requests submitted to one scheduler; times the window where all of them decode together."""

    def __init__(self, sched: Any, n: int) -> None:
        import threading

        self.sched, self.n = sched, n
        self.first: set[int] = set()
        self.done = threading.Semaphore(0)
        self.start: tuple[float, int] | None = None  # (time, decode tokens) once all n have a token
        self.end: tuple[float, int] | None = None  # the same at the first finish
        self.errors: list[str] = []

    def submit(self, i: int, gen: Any) -> None:
        def on_delta(_: str) -> None:
            if i not in self.first:
                self.first.add(i)
                if len(self.first) == self.n:
                    self.start = (time.perf_counter(), self.sched.decode_tokens)

        def on_done(err: BaseException | None) -> None:
            if err is not None:
                self.errors.append(f"request {i} failed: {err!r}")
            if self.end is None:
                self.end = (time.perf_counter(), self.sched.decode_tokens)
            self.done.release()

        self.sched.submit(gen, on_delta, on_done)

    def wait(self) -> None:
        for _ in range(self.n):
            self.done.acquire()
        _fail_on(self.errors)


def concurrency_table(a: argparse.Namespace) -> None:
    import torch

    from local_engine.scheduler import BatchesDecode, Scheduler

    eng = Engine.open(a.model, threads=a.threads, prefix_cache_mb=0)
    print()
    print(f"(c) aggregate decode tok/s, chat story prompts, greedy, max_tokens {a.decode_tokens}, "
          f"load avg {os.getloadavg()[0]:.2f}")
    print("    scheduler: tokens decoded while every request decodes / that window's seconds; "
          "step_batch: the model's batched step alone (32 steps)")
    ref = _llamacpp_parallel(a)
    if ref:
        print("    llama.cpp: the same GGUF and threads, n sequences in one llama_batch per step (32-token "
              "prompts, 32 steps; benchmarks/llamacpp_anchors.py's parallel worker)")
    print(f"{'streams':>7} | {'scheduler tok/s':>15} | {'vs 1 stream':>11} | {'step_batch tok/s':>16} | "
          f"{'vs 1 stream':>11} | {'mean batch':>10} | {'llama.cpp tok/s':>15} | {'vs its 1':>8}")
    base_s = base_m = 0.0
    m = eng.model
    assert isinstance(m, BatchesDecode)
    for n in a.streams:
        sched = Scheduler(eng, max_batch=max(a.streams), max_waiting=0)
        run = _Run(sched, n)
        for i in range(n):
            run.submit(i, eng.chat([{"role": "user", "content": STORIES[i % len(STORIES)]}],
                                   max_tokens=a.decode_tokens, temperature=0))
        run.wait()
        st = sched.stats()
        sched.close()
        assert run.start is not None and run.end is not None
        tok_s = (run.end[1] - run.start[1]) / (run.end[0] - run.start[0])
        # the model alone: n caches after a 32-token prompt, 32 batched steps
        caches = []
        for i in range(n):
            c = m.new_cache()
            m.forward(torch.tensor(eng.tokenizer.encode(STORIES[i % len(STORIES)] * 3)[:32]), c, last_only=True)
            caches.append(c)
        ids = torch.tensor([eng.tokenizer.encode(" the")[0]] * n)
        t0 = time.perf_counter()
        with torch.inference_mode():
            for _ in range(32):
                m.step_batch(ids, caches)
        model_tok_s = 32 * n / (time.perf_counter() - t0)
        base_s, base_m = (tok_s, model_tok_s) if n == 1 else (base_s, base_m)
        rs = f"{tok_s / base_s:.2f}x" if base_s else "-"
        rm = f"{model_tok_s / base_m:.2f}x" if base_m else "-"
        lcs = f"{'-':>15} | {'-':>8}"
        if ref and str(n) in ref and "1" in ref:
            lcs = f"{ref[str(n)]:>15.1f} | {ref[str(n)] / ref['1']:>7.2f}x"
        print(f"{n:>7} | {tok_s:>15.1f} | {rs:>11} | {model_tok_s:>16.1f} | {rm:>11} | {st['mean_batch_size']:>10.2f} | "
              f"{lcs}", flush=True)
    print(f"load avg after {os.getloadavg()[0]:.2f}")


def _llamacpp_parallel(a: argparse.Namespace) -> dict[str, float] | None:
    """llama.cpp's aggregate decode tok/s at each stream count (None without llama-cpp-python)."""
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        print("    llama-cpp-python not installed: no llama.cpp column")
        return None
    threads = a.threads or default_threads()
    job = {"threads": threads, "prompt": 32, "decode": 32, "streams": sorted(set(a.streams) | {1})}
    anchors = os.path.join(os.path.dirname(os.path.abspath(__file__)), "llamacpp_anchors.py")
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    r = subprocess.run([sys.executable, anchors, "--worker", "parallel:llamacpp"], input=json.dumps(job),
                       capture_output=True, text=True, env=env, check=False)
    if r.returncode != 0:
        raise SystemExit(f"llama.cpp parallel worker failed (exit {r.returncode}):\n{r.stderr[-3000:]}")
    out: dict[str, float] = json.loads(r.stdout.strip().splitlines()[-1])
    return out


def _on_done(errors: list[str], done: Any, what: str, t0: float = 0.0,
             times: list[float] | None = None) -> Callable[[BaseException | None], None]:
    """A scheduler ``on_done`` that keeps the error (if any), the end time, and sets ``done``."""
    def cb(e: BaseException | None) -> None:
        if e is not None:
            errors.append(f"{what} failed: {e!r}")
        if times is not None:
            times.append(time.perf_counter() - t0)
        done.set()
    return cb


def _fail_on(errors: list[str]) -> None:
    """A request that failed makes the figures meaningless: stop with its error, exit status 1."""
    if errors:
        print("\n".join(errors), file=sys.stderr)
        raise SystemExit(1)


def _p95(xs: list[float]) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(0.95 * len(xs)) - 1))]


def ttft_under_prefill(a: argparse.Namespace) -> None:
    import threading

    from local_engine.scheduler import Scheduler

    eng = Engine.open(a.model, threads=a.threads, prefix_cache_mb=0)
    shorts = [f"{q} (question {i})" for i, q in enumerate(QUESTIONS * 3)][:a.short_requests]

    def short_ttfts(sched: Scheduler, gap_s: float, during: threading.Event | None) -> list[float]:
        out = []
        for q in shorts:
            if during is not None and during.is_set():
                break  # the long prompt's prefill is over: later ones would not measure it
            gen = eng.chat([{"role": "user", "content": q}], max_tokens=4, temperature=0)
            got = threading.Event()
            errors: list[str] = []
            sched.submit(gen, lambda _: None, _on_done(errors, got, q))
            got.wait()
            _fail_on(errors)
            out.append(gen.stats.extra.get("ttft_s", float("nan")))
            time.sleep(gap_s)
        return out

    print()
    chunk = a.prefill_chunk or 256
    print(f"(d) TTFT of short requests (one at a time, 4 tokens each) while a {a.long_prompt}-token prompt "
          f"is prefilled in chunks of {chunk}, load avg {os.getloadavg()[0]:.2f}")
    idle = Scheduler(eng, prefill_chunk=a.prefill_chunk)
    alone = short_ttfts(idle, 0.0, None)
    idle.close()
    sched = Scheduler(eng, prefill_chunk=a.prefill_chunk)
    long_gen = eng.generate(system_prompt(eng, a.long_prompt), max_tokens=1, temperature=0)
    n_long = len(long_gen.prompt_ids)
    prefilled = threading.Event()
    t0 = time.perf_counter()
    t_long: list[float] = []
    long_errors: list[str] = []
    sched.submit(long_gen, lambda _: None, _on_done(long_errors, prefilled, "the long prompt", t0, t_long))
    time.sleep(0.5)  # it has started
    during = short_ttfts(sched, 0.5, prefilled)
    prefilled.wait()
    sched.close()
    _fail_on(long_errors)
    print(f"{'':>24} | {'n':>3} | {'p50 s':>7} | {'p95 s':>7}")
    for name, xs in (("idle engine", alone), ("during the long prefill", during)):
        print(f"{name:>24} | {len(xs):>3} | {sorted(xs)[len(xs) // 2]:>7.3f} | {_p95(xs):>7.3f}")
    print(f"the long prompt ({n_long} tokens): {t_long[0]:.1f} s to its first token "
          f"({n_long / t_long[0]:.0f} tok/s with the short requests interleaved); one at a time, a short "
          f"request arriving with it waited that long")
    print(f"p95 during / idle: {_p95(during) / _p95(alone):.1f}x; one-at-a-time wait / p95 during: "
          f"{t_long[0] / _p95(during):.0f}x")
    print(f"load avg after {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
