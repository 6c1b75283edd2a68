"""llama.cpp anchors for issues #18, #19, #20 and #24: ours beside llama.cpp, one run, one table each.

Both engines run the same GGUF (the built-in SmolLM2-135M-Instruct Q4_1, ``builtin:smollm2-135m``),
the same number of threads, on the same token ids, each configuration in its own child process
(as benchmarks/engine_dense.py does: RSS and thread pools are the engine's own, nothing leaks
between them). Our worker runs first and hands the prompt ids it rendered to llama.cpp's worker,
so the two read identical prompts (our chat template, our tokenizer: the GGUF's vocabulary).

Each table runs its pair of workers (ours, then llama.cpp) --rounds times alternately (default 2),
so drift on the shared box hits both engines alike, and keeps each engine's best figure.

Tables (targets from the issues' "How we will know"):

- #18b prefill tok/s at 256 / 1k / 4k tokens (ours chunked, as served; llama.cpp n_batch =
  n_ubatch = 512, its default), best of 2 (1 at 4k) after a 32-token warm-up. Target ours >= 0.7x
  at 4k.
- #18c aggregate greedy decode tok/s with 1 / 4 / 8 sequences decoded together. llama.cpp through
  its C API (llama_batch with one sequence id per stream, n_seq_max = 8; the high-level ``Llama``
  class has one sequence only); ours: the single-stream figure while main has no batched decode.
- #19 constrained decode: the recipe JSON schema of benchmarks/structured.py; ours through
  ``response_format`` (llguidance), llama.cpp through ``LlamaGrammar.from_json_schema`` (its GBNF
  from the same schema), greedy, best of the rounds; plus both unconstrained for the same number of
  tokens. Target ours >= 1x llama.cpp's constrained tok/s.
- #20 prompt-lookup decoding on the quoting workload of benchmarks/speculative.py (3 prompts,
  128 tokens, greedy): llama.cpp's ``LlamaPromptLookupDecoding`` (its defaults: 2-gram, 10 tokens
  drafted) vs ours ``speculative="prompt-lookup"``, each also with it off; tok/s summed over the
  prompts, best of the rounds. Target ours >= 0.8x llama.cpp's prompt-lookup tok/s.
- #24 perplexity on benchmarks/data/quality (the same windows of 512 tokens as
  benchmarks/quality.py), Q4_1 weights. llama.cpp with ``logits_all``, flash attention on, KV
  cache f16 and q8_0 (``type_k``/``type_v``); ours with the Q4_1 blocks (``weights="auto"``) and
  each KV cache dtype (``Engine.open(kv_cache={"dtype": ...})``: f32, bf16, int8, int4; both
  engines quantise K/V as they are written, so the window's own attention already reads them
  back quantised). "top-1 = llama.cpp f16": how often the argmax next token equals llama.cpp's
  with its default cache. KV bytes/token: llama.cpp's from its types (q8_0 = 34 bytes per 32
  values), ours from local_engine.kv_cache.

Decode tok/s is measured alike for both: (tokens - 1) / (time from the first generated token to
the last), i.e. sampling, the grammar mask and every forward after the prompt's. For llama.cpp the
timestamps come from a stopping-criteria callback, called once per token.

Setup: llama-cpp-python is benchmark-only (benchmarks/requirements-llamacpp.txt); build it without
AMX and without native detection, with GGML_AVX512 set to what ``grep -c avx512f /proc/cpuinfo``
says (this run's host has AVX-512 and no AMX):

    CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_AVX512=ON -DGGML_FMA=ON \\
      -DGGML_F16C=ON -DGGML_AMX_INT8=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_BF16=OFF" \\
      .venv/bin/pip install --no-cache-dir -r benchmarks/requirements-llamacpp.txt

Run:

    flock /tmp/bench.lock env OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/llamacpp_anchors.py \\
        --out benchmarks/results/llamacpp_anchors.txt
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

MODEL = "builtin:smollm2-135m"
TASKS = ("prefill", "parallel", "json", "lookup", "ppl")
KV_DTYPES = ("bf16", "int8", "int4")
PPL_WINDOW = 512

Job = dict[str, Any]


# --------------------------------------------------------------------------- shared

def _text_ids(n: int | None = None) -> list[int]:
    """n token ids of the shipped English text (repeated if short; all of it if n is None): the same ids
    for both engines."""
    from quality import load_text

    from local_engine.engine import resolve
    from local_engine.store import GGUFStore
    from local_engine.tokenizer import from_gguf

    ids = from_gguf(GGUFStore(resolve(MODEL))).encode(load_text())
    if n is None:
        return ids
    while len(ids) < n:
        ids = ids + ids
    return ids[:n]


def _open_ours(threads: int, **opts: Any) -> Any:
    from local_engine.engine import Engine

    return Engine.open(MODEL, threads=threads, prefix_cache_mb=0, **opts)


def _open_llama(threads: int, **opts: Any) -> Any:
    from llama_cpp import Llama

    from local_engine.engine import resolve

    return Llama(model_path=str(resolve(MODEL)), n_threads=threads, n_threads_batch=threads, verbose=False, **opts)


class _TokenClock:
    """llama-cpp-python stopping criterion that only timestamps each generated token."""

    def __init__(self) -> None:
        self.stamps: list[float] = []

    def __call__(self, _ids: Any, _logits: Any) -> bool:
        self.stamps.append(time.perf_counter())
        return False

    def tok_s(self) -> float:
        n = len(self.stamps) - 1
        return n / (self.stamps[-1] - self.stamps[0]) if n > 0 else 0.0


def _llama_complete(llm: Any, ids: list[int], max_tokens: int, **kw: Any) -> tuple[str, int, float, float]:
    """Greedy completion of prompt ids: (text, tokens, decode seconds after the first token, tok/s)."""
    from llama_cpp import StoppingCriteriaList

    clock = _TokenClock()
    out = llm.create_completion(prompt=ids, max_tokens=max_tokens, temperature=0.0, repeat_penalty=1.0,
                                stopping_criteria=StoppingCriteriaList([clock]), **kw)
    n = len(clock.stamps)
    return out["choices"][0]["text"], n, clock.stamps[-1] - clock.stamps[0], clock.tok_s()


# --------------------------------------------------------------------------- workers

def prefill_ours(job: Job) -> Job:
    import torch

    eng = _open_ours(job["threads"])
    m, out = eng.model, {}
    with torch.inference_mode():
        for n in job["sizes"]:
            ids = torch.tensor(_text_ids(n))
            m.forward(ids[:32], m.new_cache(), last_only=True)
            dt = math.inf
            for _ in range(2 if n <= 1024 else 1):  # best of 2 where it is cheap: the box is shared
                t0 = time.perf_counter()
                m.forward(ids, m.new_cache(), last_only=True)
                dt = min(dt, time.perf_counter() - t0)
            out[str(n)] = n / dt
    return out


def prefill_llamacpp(job: Job) -> Job:
    out = {}
    for n in job["sizes"]:
        llm = _open_llama(job["threads"], n_ctx=n + 64, n_batch=512, n_ubatch=512)
        ids = _text_ids(n)
        llm.reset()
        llm.eval(ids[:32])
        dt = math.inf
        for _ in range(2 if n <= 1024 else 1):
            llm.reset()
            t0 = time.perf_counter()
            llm.eval(ids)
            dt = min(dt, time.perf_counter() - t0)
        out[str(n)] = n / dt
        del llm
    return out


def parallel_ours(job: Job) -> Job:
    import torch

    eng = _open_ours(job["threads"])
    m = eng.model
    ids = _text_ids(job["prompt"])
    with torch.inference_mode():
        cache = m.new_cache()
        logits = m.forward(torch.tensor(ids), cache, last_only=True)[-1]
        t0 = time.perf_counter()
        for _ in range(job["decode"]):
            logits = m.forward(torch.tensor([int(logits.argmax())]), cache, last_only=True)[-1]
        return {"1": job["decode"] / (time.perf_counter() - t0)}


def _put(batch: Any, k: int, tok: int, pos: int, seq: int, want_logits: bool) -> None:
    """Entry k of a llama_batch: token at position pos of sequence seq."""
    batch.token[k], batch.pos[k], batch.n_seq_id[k] = tok, pos, 1
    batch.seq_id[k][0], batch.logits[k] = seq, want_logits


def parallel_llamacpp(job: Job) -> Job:
    """n sequences decoded in one llama_batch per step (the C API: the Llama class has one sequence)."""
    import llama_cpp as L
    import numpy as np

    llm = _open_llama(job["threads"], n_ctx=64)  # for its model only; contexts are made below
    n_vocab = llm.n_vocab()
    plen, steps = job["prompt"], job["decode"]
    base = _text_ids(plen + 8 * 16)
    out = {}
    for n_seq in job["streams"]:
        p = L.llama_context_default_params()
        p.n_ctx = n_seq * (plen + steps + 16)
        p.n_batch = p.n_ubatch = max(512, n_seq)
        p.n_seq_max = n_seq
        p.n_threads = p.n_threads_batch = job["threads"]
        ctx = L.llama_init_from_model(llm._model.model, p)
        batch = L.llama_batch_init(max(plen, n_seq), 0, n_seq)
        try:
            nxt = []
            for s in range(n_seq):  # a different prompt per stream: its own offset into the text
                prompt = base[s * 16:s * 16 + plen]
                for k, tok in enumerate(prompt):
                    _put(batch, k, tok, k, s, k == plen - 1)
                batch.n_tokens = plen
                if L.llama_decode(ctx, batch) != 0:
                    raise RuntimeError("llama_decode failed on a prompt")
                nxt.append(int(np.ctypeslib.as_array(L.llama_get_logits_ith(ctx, plen - 1), shape=(n_vocab,)).argmax()))
            t0 = time.perf_counter()
            for step in range(steps):
                for s in range(n_seq):
                    _put(batch, s, nxt[s], plen + step, s, True)
                batch.n_tokens = n_seq
                if L.llama_decode(ctx, batch) != 0:
                    raise RuntimeError("llama_decode failed in decode")
                nxt = [int(np.ctypeslib.as_array(L.llama_get_logits_ith(ctx, s), shape=(n_vocab,)).argmax())
                       for s in range(n_seq)]
            out[str(n_seq)] = n_seq * steps / (time.perf_counter() - t0)
        finally:
            L.llama_batch_free(batch)
            L.llama_free(ctx)
    return out


def json_ours(job: Job) -> Job:
    from structured import RECIPE

    eng = _open_ours(job["threads"])
    msgs = [{"role": "user", "content": job["prompt"]}]
    fmt = {"type": "json_schema", "json_schema": {"name": "recipe", "schema": RECIPE}}
    best_g = best_f = 0.0
    n, text, prompt_ids = 0, "", []
    for _ in range(job["reps"]):
        g = eng.chat(msgs, max_tokens=200, temperature=0, response_format=fmt)
        text = "".join(g)
        n, prompt_ids = g.stats.completion_tokens, list(g.prompt_ids)
        best_g = max(best_g, g.stats.decode_tok_s)
        # unconstrained: the same prompt ids, the same number of tokens (a stop token may end it sooner)
        f = eng.generate(eng.tokenizer.decode(prompt_ids), max_tokens=n, temperature=0)
        "".join(f)
        best_f = max(best_f, f.stats.decode_tok_s)
    return {"grammar": best_g, "free": best_f, "tokens": n, "valid": _valid(text), "prompt_ids": prompt_ids}


def json_llamacpp(job: Job) -> Job:
    from llama_cpp import LlamaGrammar
    from structured import RECIPE

    llm = _open_llama(job["threads"], n_ctx=1024)
    ids = job["prompt_ids"]
    best_g = best_f = 0.0
    n, text = 0, ""
    for _ in range(job["reps"]):
        grammar = LlamaGrammar.from_json_schema(json.dumps(RECIPE), verbose=False)
        text, n, _, tok_s = _llama_complete(llm, ids, 200, grammar=grammar)
        best_g = max(best_g, tok_s)
        _, _, _, tok_s = _llama_complete(llm, ids, n)
        best_f = max(best_f, tok_s)
    return {"grammar": best_g, "free": best_f, "tokens": n, "valid": _valid(text)}


def _valid(text: str) -> bool:
    import jsonschema
    from structured import RECIPE

    try:
        jsonschema.validate(json.loads(text), RECIPE)
    except (ValueError, jsonschema.ValidationError):
        return False
    return True


def lookup_ours(job: Job) -> Job:
    from speculative import workloads

    eng = _open_ours(job["threads"])
    best: dict[str, float] = {}
    texts: dict[str, list[str]] = {}
    prompt_ids: list[list[int]] = []
    for _ in range(job["reps"]):
        tok = {m: 0 for m in job["modes"]}
        secs = {m: 0.0 for m in job["modes"]}
        texts = {m: [] for m in job["modes"]}
        prompt_ids = []
        for p in workloads()["quoting"]:
            for m in job["modes"]:  # interleaved: drift on a busy box hits both modes alike
                g = eng.chat([{"role": "user", "content": p}], max_tokens=job["max_tokens"], temperature=0,
                             speculative=m)
                texts[m].append("".join(g))
                tok[m] += g.stats.completion_tokens - 1
                secs[m] += g.stats.decode_s
            prompt_ids.append(list(g.prompt_ids))
        for m in job["modes"]:
            best[m] = max(best.get(m, 0.0), tok[m] / secs[m])
    return {"tok_s": best, "same": texts["off"] == texts["prompt-lookup"], "prompt_ids": prompt_ids,
            "tokens": sum(len(eng.tokenizer.encode(t)) for t in texts["off"])}


def lookup_llamacpp(job: Job) -> Job:
    from llama_cpp.llama_speculative import LlamaPromptLookupDecoding

    llms = {"off": _open_llama(job["threads"], n_ctx=1024),
            "prompt-lookup": _open_llama(job["threads"], n_ctx=1024, draft_model=LlamaPromptLookupDecoding())}
    best: dict[str, float] = {}
    texts: dict[str, list[str]] = {}
    for _ in range(job["reps"]):
        tok = {m: 0 for m in llms}
        secs = {m: 0.0 for m in llms}
        texts = {m: [] for m in llms}
        for ids in job["prompt_ids"]:
            for m, llm in llms.items():
                text, n, dt, _ = _llama_complete(llm, ids, job["max_tokens"])
                texts[m].append(text)
                tok[m] += n - 1
                secs[m] += dt
        for m in llms:
            best[m] = max(best.get(m, 0.0), tok[m] / secs[m])
    return {"tok_s": best, "same": texts["off"] == texts["prompt-lookup"]}


def _window_scores(logits: Any, window: list[int]) -> tuple[list[float], list[int]]:
    """Per position: -log p(next token), and the argmax next token."""
    import torch

    lp = torch.log_softmax(torch.as_tensor(logits[:len(window) - 1]).float(), -1)
    tgt = torch.tensor(window[1:])
    return (-lp.gather(1, tgt[:, None])[:, 0]).tolist(), lp.argmax(-1).tolist()


def ppl_ours(job: Job) -> Job:
    from quality import windows

    from local_engine import kv_cache
    from local_engine.errors import EngineError

    ids = _text_ids()
    out: Job = {}
    for dtype in ("f32", *KV_DTYPES):
        try:
            eng = _open_ours(job["threads"], kv_cache={"dtype": dtype})
        except EngineError as e:
            out[dtype] = {"error": str(e).splitlines()[0][:120]}
            continue
        nll: list[float] = []
        top: list[int] = []
        for w in windows(ids, PPL_WINDOW):
            a, b = _window_scores(eng.logits(w), w)
            nll += a
            top += b
        out[dtype] = {"nll": nll, "top": top,
                      "kv_bytes": kv_cache.bytes_per_token(eng.kv_config, *eng.model.kv_shape())}
        out["kv_shape"] = list(eng.model.kv_shape())
        del eng
    return out


def ppl_llamacpp(job: Job) -> Job:
    import llama_cpp as L
    from quality import windows

    ids = _text_ids()
    out: Job = {}
    for name, t in (("f16", L.GGML_TYPE_F16), ("q8_0", L.GGML_TYPE_Q8_0)):
        llm = _open_llama(job["threads"], n_ctx=PPL_WINDOW, n_batch=PPL_WINDOW, n_ubatch=PPL_WINDOW,
                          logits_all=True, flash_attn=True, type_k=t, type_v=t)
        nll: list[float] = []
        top: list[int] = []
        for w in windows(ids, PPL_WINDOW):
            llm.reset()
            llm.eval(w)
            a, b = _window_scores(llm.scores, w)
            nll += a
            top += b
        out[name] = {"nll": nll, "top": top}
        del llm
    return out


WORKERS: dict[str, Callable[[Job], Job]] = {
    f"{task}:{engine}": globals()[f"{task}_{engine}"] for task in TASKS for engine in ("ours", "llamacpp")}


# --------------------------------------------------------------------------- parent

def _child(task: str, engine: str, job: Job) -> Job:
    env = dict(os.environ, OMP_NUM_THREADS=str(job["threads"]),
               OMP_WAIT_POLICY=os.environ.get("OMP_WAIT_POLICY", "PASSIVE"))
    r = subprocess.run([sys.executable, __file__, "--worker", f"{task}:{engine}"], input=json.dumps(job),
                       capture_output=True, text=True, env=env, check=False)
    if r.returncode != 0:
        raise SystemExit(f"{task} worker ({engine}) failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def _best(a: Any, b: Any) -> Any:
    """Two rounds' results merged: the faster of each speed, a check true only if true in both."""
    if isinstance(a, dict):
        return {k: _best(v, b[k]) for k, v in a.items()}
    if isinstance(a, bool):
        return a and b
    if isinstance(a, float):
        return max(a, b)
    return a  # counts and prompt ids: the same greedy run each round


def _pair(task: str, job: Job, rounds: int) -> tuple[Job, Job]:
    """Ours then llama.cpp, ``rounds`` times alternately (drift on a busy box hits both alike),
    best of the rounds; llama.cpp gets the prompt ids our worker rendered, if it returns them."""
    ours = ref = None
    for _ in range(rounds):
        o = _child(task, "ours", job)
        r = _child(task, "llamacpp", {**job, **({"prompt_ids": o["prompt_ids"]} if "prompt_ids" in o else {})})
        ours, ref = (o, r) if ours is None else (_best(ours, o), _best(ref, r))
    assert ours is not None and ref is not None
    return ours, ref


def _load() -> str:
    return f"{os.getloadavg()[0]:.2f}"


def table_prefill(a: argparse.Namespace, out: Callable[[str], None]) -> None:
    ours, ref = _pair("prefill", {"threads": a.threads, "sizes": a.prefill}, a.rounds)
    out(f"\n## #18b prefill tok/s, best of {a.rounds} rounds (load avg {_load()})\n")
    out("| prompt tokens | ours | llama.cpp | ours / llama.cpp |")
    out("|---|---|---|---|")
    for n in a.prefill:
        o, r = ours[str(n)], ref[str(n)]
        out(f"| {n} | {o:.1f} | {r:.1f} | {o / r:.2f}x{' (target >= 0.7x)' if n == max(a.prefill) else ''} |")


def table_parallel(a: argparse.Namespace, out: Callable[[str], None]) -> None:
    job = {"threads": a.threads, "prompt": 64, "decode": a.parallel_decode, "streams": [1, 4, 8]}
    ours, ref = _pair("parallel", job, a.rounds)
    out(f"\n## #18c aggregate greedy decode tok/s, 64-token prompts, {a.parallel_decode} steps, best of "
        f"{a.rounds} rounds (load avg {_load()})\n")
    out("| streams | ours | llama.cpp (llama_batch, n_seq_max = streams) | llama.cpp vs its 1 stream |")
    out("|---|---|---|---|")
    for s in job["streams"]:
        o = f"{ours[str(s)]:.1f}" if str(s) in ours else "n/a: no batched decode on main"
        out(f"| {s} | {o} | {ref[str(s)]:.1f} | {ref[str(s)] / ref['1']:.2f}x |")


def table_json(a: argparse.Namespace, out: Callable[[str], None]) -> None:
    job = {"threads": a.threads, "reps": a.reps, "prompt": "A pancake recipe."}
    ours, ref = _pair("json", job, a.rounds)
    out(f"\n## #19 JSON-schema constrained decode tok/s, greedy, best of {a.reps} x {a.rounds} rounds (load avg {_load()})\n")
    out("| engine | tokens | schema-valid | constrained | unconstrained | constrained / unconstrained |")
    out("|---|---|---|---|---|---|")
    for name, r in (("ours (llguidance)", ours), ("llama.cpp (GBNF from the schema)", ref)):
        out(f"| {name} | {r['tokens']} | {r['valid']} | {r['grammar']:.1f} | {r['free']:.1f} | "
            f"{r['grammar'] / r['free']:.2f} |")
    out(f"\nours / llama.cpp constrained: {ours['grammar'] / ref['grammar']:.2f}x (target >= 1x)")


def table_lookup(a: argparse.Namespace, out: Callable[[str], None]) -> None:
    job = {"threads": a.threads, "reps": a.reps, "max_tokens": 128, "modes": ["off", "prompt-lookup"]}
    ours, ref = _pair("lookup", job, a.rounds)
    out(f"\n## #20 prompt-lookup decoding, quoting workload (3 prompts x <= 128 tokens), best of {a.reps} x "
        f"{a.rounds} rounds (load avg {_load()})\n")
    out("| engine | off tok/s | prompt-lookup tok/s | speed-up | same text on and off |")
    out("|---|---|---|---|---|")
    for name, r in (("ours", ours), ("llama.cpp (LlamaPromptLookupDecoding)", ref)):
        t = r["tok_s"]
        out(f"| {name} | {t['off']:.1f} | {t['prompt-lookup']:.1f} | {t['prompt-lookup'] / t['off']:.2f}x | "
            f"{r['same']} |")
    out(f"\nours / llama.cpp with prompt lookup: {ours['tok_s']['prompt-lookup'] / ref['tok_s']['prompt-lookup']:.2f}x "
        "(target >= 0.8x)")


def table_ppl(a: argparse.Namespace, out: Callable[[str], None]) -> None:
    ours, ref = _pair("ppl", {"threads": a.threads}, 1)  # no timing: one round
    anchor = ref["f16"]
    layers, heads, dim = ours.pop("kv_shape")
    values = 2 * layers * heads * dim  # K and V entries per token
    ref["f16"]["kv_bytes"], ref["q8_0"]["kv_bytes"] = values * 2, values // 32 * 34  # q8_0: 32 int8 + fp16 scale
    out(f"\n## #24 perplexity, Q4_1 weights, benchmarks/data/quality in windows of {PPL_WINDOW} "
        f"({len(anchor['nll'])} scored tokens; load avg {_load()})\n")
    out("| engine | KV cache | KV bytes/token | perplexity | top-1 = llama.cpp f16 |")
    out("|---|---|---|---|---|")
    rows = [(f"llama.cpp{' (reference)' if k == 'f16' else ''}", k, v) for k, v in ref.items()]
    rows += [("ours", k, v) for k, v in ours.items()]
    for name, kv, r in rows:
        if "error" in r:
            out(f"| {name} | {kv} | | refused: {r['error']} | |")
            continue
        ppl = math.exp(sum(r["nll"]) / len(r["nll"]))
        agree = sum(x == y for x, y in zip(r["top"], anchor["top"], strict=True)) / len(anchor["top"])
        out(f"| {name} | {kv} | {r['kv_bytes']} | {ppl:.3f} | {agree:.1%} |")


TABLES = {"prefill": table_prefill, "parallel": table_parallel, "json": table_json, "lookup": table_lookup,
          "ppl": table_ppl}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    ap.add_argument("--threads", type=int, default=1, help="threads for both engines (default 1: a shared 2-core box)")
    ap.add_argument("--reps", type=int, default=1, help="repetitions inside each worker (#19, #20)")
    ap.add_argument("--rounds", type=int, default=2,
                    help="worker pairs (ours, llama.cpp) run alternately per table; each figure is the best")
    ap.add_argument("--prefill", type=lambda v: [int(x) for x in v.split(",")], default=[256, 1024, 4096])
    ap.add_argument("--parallel-decode", type=int, default=32, help="decode steps of the #18c table")
    ap.add_argument("--tasks", default=",".join(TASKS), help=f"comma-separated subset of {','.join(TASKS)}")
    ap.add_argument("--out", type=Path, help="also write the tables here")
    a = ap.parse_args()
    if a.worker:
        print(json.dumps(WORKERS[a.worker](json.loads(sys.stdin.read()))))
        return
    lines: list[str] = []

    def out(s: str) -> None:
        print(s, flush=True)
        lines.append(s)

    import llama_cpp

    under = "flock /tmp/bench.lock " if Path(f"/proc/{os.getppid()}/comm").read_text().strip() == "flock" else ""
    out(f"$ {under}" + " ".join(shlex.quote(x) for x in [".venv/bin/python", *sys.argv]))
    out(f"# {time.strftime('%Y-%m-%d %H:%M', time.gmtime())} UTC, load average {_load()} at start, "
        f"{os.cpu_count()} CPUs, threads {a.threads} for both engines, OMP_WAIT_POLICY="
        f"{os.environ.get('OMP_WAIT_POLICY', 'PASSIVE (set for the workers)')}")
    out(f"# {MODEL} (SmolLM2-135M-Instruct Q4_1 GGUF) for both; llama-cpp-python {llama_cpp.__version__}: "
        f"{llama_cpp.llama_print_system_info().decode().strip()}")
    t0 = time.perf_counter()
    for task in a.tasks.split(","):
        TABLES[task](a, out)
    out(f"\n# {time.perf_counter() - t0:.0f} s, load average {_load()} at the end")
    if a.out:
        a.out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
