"""Compressed (bf16 / int8 / int4) and bounded (window + attention sinks) KV caches: kv_cache.py."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from local_engine import kv_cache, kv_kernel
from local_engine.engine import Engine
from local_engine.errors import EngineError
from local_engine.kv_cache import SLACK, CompressedKVCache, KVConfig
from local_engine.models.layers import KVCache, RopeTables, rope_inv_freq

HD = 64


def _tiny_llama(dst: Path, seed: int = 0) -> Path:
    """A 2-layer random Llama (hidden 64, 2 heads of 32, 1 KV head) with the demo tokenizer, whose
    special tokens can never win greedy decoding (their head rows are zero)."""
    from safetensors.torch import save_file

    from local_engine.demo_moe import CHAT_TEMPLATE, SPECIALS, build_tokenizer

    dst.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer()
    vocab = tok.get_vocab_size()
    H, nh, nkv, hd, ffn, layers = 64, 2, 1, 32, 128, 2
    g = torch.Generator().manual_seed(seed)

    def w(o: int, i: int) -> torch.Tensor:
        return torch.randn(o, i, generator=g) * (2.0 / i**0.5)

    t = {"model.embed_tokens.weight": torch.randn(vocab, H, generator=g), "model.norm.weight": torch.ones(H),
         "lm_head.weight": w(vocab, H)}
    for special in SPECIALS:  # no stop token ever wins: long generations run to max_tokens
        t["lm_head.weight"][tok.token_to_id(special)] = 0
    for i in range(layers):
        p = f"model.layers.{i}."
        t |= {p + "input_layernorm.weight": torch.ones(H), p + "post_attention_layernorm.weight": torch.ones(H),
              p + "self_attn.q_proj.weight": w(nh * hd, H), p + "self_attn.k_proj.weight": w(nkv * hd, H),
              p + "self_attn.v_proj.weight": w(nkv * hd, H), p + "self_attn.o_proj.weight": w(H, nh * hd),
              p + "mlp.gate_proj.weight": w(ffn, H), p + "mlp.up_proj.weight": w(ffn, H),
              p + "mlp.down_proj.weight": w(H, ffn)}
    save_file(t, str(dst / "model.safetensors"), metadata={"format": "pt"})
    (dst / "config.json").write_text(json.dumps({
        "model_type": "llama", "hidden_size": H, "num_attention_heads": nh, "num_key_value_heads": nkv,
        "head_dim": hd, "intermediate_size": ffn, "num_hidden_layers": layers, "vocab_size": vocab,
        "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "max_position_embeddings": 512}))
    tok.save(str(dst / "tokenizer.json"))
    (dst / "tokenizer_config.json").write_text(json.dumps({
        "add_bos_token": False, "eos_token": "<|im_end|>", "chat_template": CHAT_TEMPLATE}))
    return dst


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


# --------------------------------------------------------------------------- storage


def test_bytes_per_token_int8_is_at_most_0_27_of_f32_scales_included() -> None:
    f32 = kv_cache.bytes_per_token(KVConfig("f32"), 30, 3, HD)
    ratio = {dt: kv_cache.bytes_per_token(KVConfig(dt), 30, 3, HD) / f32 for dt in kv_cache.DTYPES}
    assert f32 == 46080  # SmolLM2-135M: 30 layers x 3 KV heads x 64 x 2 (K, V) x 4 B
    assert ratio["bf16"] == 0.5 and ratio["int8"] <= 0.27 and ratio["int4"] <= 0.16


@pytest.mark.parametrize("dtype, tol", [("bf16", 4e-3), ("int8", 4e-3), ("int4", 0.07)])
def test_codec_round_trip_within_its_step(dtype: str, tol: float) -> None:
    x = torch.randn(3, 50, HD, generator=torch.Generator().manual_seed(1))
    x[0, :, 5] *= 20  # an outlier channel coarsens only its own group of 32
    rows = kv_cache.encode(x, dtype)
    assert rows.shape[-1] == (kv_cache.row_bytes(dtype, HD) if dtype != "bf16" else HD)
    back = kv_cache.decode(rows, dtype, HD)
    err = (back - x).abs().reshape(3, 50, 2, 32).amax(-1)
    span = x.abs().reshape(3, 50, 2, 32).amax(-1)
    assert (err <= tol * span + 1e-6).all()


def _rope(hd: int = HD, n: int = 512) -> RopeTables:
    inv, factor = rope_inv_freq(hd, 10000.0)
    return RopeTables(inv, n, factor)


def _streaming_llm_reference(qs: torch.Tensor, ks: torch.Tensor, vs: torch.Tensor, sinks: int, window: int,
                             rope: RopeTables) -> torch.Tensor:
    """StreamingLLM as its paper states it: at step t keep the first ``sinks`` and the latest
    ``window`` tokens, number them 0..n-1 *within the cache*, rotate keys and the query by those
    numbers, attend. Unrotated qs [T, Hq, D], ks/vs [T, Hkv, D]; returns [T, Hq, D]."""
    T, hq, d = qs.shape
    g = hq // ks.shape[1]
    outs = []
    for t in range(T):
        keep = sorted(set(range(min(sinks, t + 1))) | set(range(max(sinks, t + 1 - window), t + 1)))
        n = len(keep)
        cos, sin = rope.cos[:n], rope._sin_signed[:n]
        k = ks[keep].transpose(0, 1)  # [Hkv, n, D]
        k = torch.addcmul(k * cos, k.roll(d // 2, -1), sin).repeat_interleave(g, 0)
        v = vs[keep].transpose(0, 1).repeat_interleave(g, 0)
        q = qs[t][:, None]  # [Hq, 1, D], at position n - 1
        q = torch.addcmul(q * cos[n - 1], q.roll(d // 2, -1), sin[n - 1])
        att = (q @ k.transpose(1, 2) / math.sqrt(d)).softmax(-1)
        outs.append((att @ v)[:, 0])
    return torch.stack(outs)


@pytest.mark.parametrize("kernel", [True, False], ids=["c-kernel", "torch"])
@pytest.mark.parametrize("chunk", [1, 5, 37])
def test_window_with_sinks_is_streaming_llm_without_rerotating(kernel: bool, chunk: int,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """Window keys keep their text position's rotation, the query is rotated twice: the scores are
    StreamingLLM's (positions within the cache) for decode steps and for chunks of any length."""
    if kernel and kv_kernel.load() is None:
        pytest.skip(f"kv kernel unavailable: {kv_kernel.unavailable_reason}")
    gen = torch.Generator().manual_seed(0)
    T, hq, hk = 120, 4, 2
    qs, ks, vs = (torch.randn(T, h, HD, generator=gen) for h in (hq, hk, hk))
    rope = _rope()
    cache = CompressedKVCache(KVConfig("f32", max_tokens=36, sinks=4), 1, hk, HD, 512, rope)
    if not kernel:
        monkeypatch.setattr(cache, "_lib", None)
    got = []
    for a in range(0, T, chunk):
        b = min(a + chunk, T)
        got.append(cache.attend(0, qs[a:b].transpose(0, 1), ks[a:b].transpose(0, 1),
                                vs[a:b].transpose(0, 1)).transpose(0, 1))
        cache.advance(b - a)
    want = _streaming_llm_reference(qs, ks, vs, 4, 32, rope)
    torch.testing.assert_close(torch.cat(got), want, atol=2e-5, rtol=1e-4)
    assert cache.wrapped and not cache.reusable


@pytest.mark.parametrize("dtype", ["bf16", "int8", "int4"])
def test_c_kernel_equals_torch_path(dtype: str) -> None:
    """The decode step's C kernel (dequantise row by row) against the PyTorch path (dequantise the
    cache, then bmm/softmax) on the same stored bytes."""
    if kv_kernel.load() is None:
        pytest.skip(f"kv kernel unavailable: {kv_kernel.unavailable_reason}")
    gen = torch.Generator().manual_seed(2)
    T, hq, hk = 70, 6, 2
    qs, ks, vs = (torch.randn(T, h, HD, generator=gen) for h in (hq, hk, hk))
    caches = [CompressedKVCache(KVConfig(dtype, max_tokens=48, sinks=4), 1, hk, HD, 512, _rope()) for _ in "ab"]
    caches[1]._lib = None
    for t in range(T):
        outs = [c.attend(0, qs[t:t + 1].transpose(0, 1), ks[t:t + 1].transpose(0, 1),
                         vs[t:t + 1].transpose(0, 1)) for c in caches]
        for c in caches:
            c.advance(1)
        used = min(t + 1, caches[0].capacity)  # rows never written hold whatever torch.empty left
        assert torch.equal(caches[0].kv[:, :, :used], caches[1].kv[:, :, :used]), f"stored bytes differ at {t}"
        torch.testing.assert_close(outs[0], outs[1], atol=1e-5, rtol=1e-4)


def test_crop_within_the_slack_after_the_window_wrapped_and_not_further() -> None:
    cache = CompressedKVCache(KVConfig("int8", max_tokens=32, sinks=4), 1, 1, HD, 512, _rope())
    cache.advance(100)
    assert cache.wrapped and cache.resident_bytes == (32 + SLACK) * cache.bytes_per_token
    cache.crop(100 - SLACK)
    assert cache.length == 100 - SLACK
    with pytest.raises(ValueError, match="overwritten"):
        cache.crop(50)


def test_config_errors_are_one_clear_line() -> None:
    with pytest.raises(ValueError, match="dtype must be one of f32, bf16, int8, int4"):
        KVConfig.parse({"dtype": "fp8"})
    with pytest.raises(ValueError, match=r"max_tokens .* at least sinks"):
        KVConfig.parse({"max_tokens": 8})
    with pytest.raises(ValueError, match="unknown key"):
        KVConfig.parse({"dtype": "int8", "window": 3})
    with pytest.raises(EngineError, match="kv_cache dtype"):
        Engine.open("builtin:smollm2-135m", kv_cache={"dtype": "q8"})


# --------------------------------------------------------------------------- tiny model


@pytest.mark.slow  # ~4 s on a quiet box, 10 s under load: 4,096 + 5,000 decode steps
def test_window_keeps_kv_memory_flat_over_4096_generated_tokens(tiny: Path) -> None:
    """Measured by the cache's own accounting (rows written), not by timing or RSS."""
    eng = Engine.open(tiny, weights="f32", threads=1, max_seq=128,
                      kv_cache={"dtype": "int8", "max_tokens": 64, "sinks": 4})
    model = eng.model
    cache = model.new_cache()
    storage = cache.kv.untyped_storage().nbytes()
    seen = []
    tok = 5
    for i in range(4096):
        tok = int(model.forward(torch.tensor([tok]), cache)[-1].argmax())
        if i % 256 == 255:
            seen.append(cache.resident_bytes)
    flat = (64 + SLACK) * cache.bytes_per_token
    assert cache.length == 4096 and seen == [flat] * 16 and cache.kv.untyped_storage().nbytes() == storage
    assert eng.memory()["kv_max_bytes"] == flat
    # the engine's own loop: an answer 40x longer than max_seq, KV bytes at the bound
    gen = eng.generate("The quick brown fox", max_tokens=5000, temperature=0)
    text = "".join(gen)
    assert gen.finish_reason == "length" and gen.stats.completion_tokens == 5000 and text
    assert gen.stats.extra["kv_bytes"] == flat
    # unbounded, the same request is refused past the context
    plain = Engine.open(tiny, weights="f32", threads=1, max_seq=128, kv_cache={"dtype": "int8"})
    g2 = plain.generate("The quick brown fox", max_tokens=5000, temperature=0)
    "".join(g2)
    assert g2.stats.completion_tokens < 128


def test_window_logits_equal_f32_until_the_window_fills(tiny: Path) -> None:
    ref = Engine.open(tiny, weights="f32", threads=1, max_seq=256)
    win = Engine.open(tiny, weights="f32", threads=1, max_seq=256, kv_cache={"max_tokens": 48, "sinks": 4})
    ids = ref.tokenizer.encode("The quick brown fox jumps over the lazy dog. " * 8)[:90]
    c_ref, c_win = ref.model.new_cache(), win.model.new_cache()
    assert isinstance(c_ref, KVCache) and isinstance(c_win, CompressedKVCache)
    rows = []
    for t in ids:  # decode steps, as generation runs them
        rows.append((ref.model.forward(torch.tensor([t]), c_ref)[-1], win.model.forward(torch.tensor([t]), c_win)[-1]))
    for i, (a, b) in enumerate(rows[:48]):
        torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-4, msg=f"position {i}")
    # past the window the answers differ (tokens were evicted), and keep being finite
    assert max((a - b).abs().max().item() for a, b in rows[60:]) > 1e-3
    assert all(torch.isfinite(b).all() for _, b in rows)
    # a prompt prefilled in one pass is within float tolerance of the reference before the window fills
    torch.testing.assert_close(win.logits(ids[:48]), ref.logits(ids[:48]), atol=1e-4, rtol=1e-4)


def test_prefix_cache_reuses_compressed_caches_but_not_wrapped_windows(tiny: Path) -> None:
    eng = Engine.open(tiny, weights="f32", threads=1, max_seq=256,
                      kv_cache={"dtype": "int8", "max_tokens": 64, "sinks": 4})
    prompt = "The quick brown fox jumps over the lazy dog. " * 5
    first = "".join(eng.generate(prompt, max_tokens=8, temperature=0))
    again = eng.generate(prompt, max_tokens=8, temperature=0)
    assert "".join(again) == first and again.stats.cached_tokens > 0
    # the rows after the reused ones are a fresh run's, bitwise (one call per attention group)
    ids = again.prompt_ids
    with torch.inference_mode():
        cache, n = eng.prefix_cache.take(ids, eng.model.new_cache)
        got = eng.model.forward(torch.tensor(ids[n:]), cache)
    assert n > 0 and torch.equal(got, eng.logits(ids)[n:])
    eng.prefix_cache.put(ids, cache)
    assert eng.prefix_cache.stats()["prefix_cache_bytes"] > 0
    eng.prefix_cache.clear()
    long = eng.generate(prompt, max_tokens=200, temperature=0)  # wraps the ring: not kept
    "".join(long)
    assert eng.prefix_cache.stats()["prefix_cache_entries"] == 0


# --------------------------------------------------------------------------- built-in model


@pytest.fixture(scope="module")
def smol_kv(smol_path: Path) -> dict[str, Engine]:
    return {dt: Engine.open(smol_path, threads=1, kv_cache={"dtype": dt}) for dt in ("f32", "int8", "int4")}


def _greedy(eng: Engine, ids: list[int], n: int) -> tuple[list[int], list[torch.Tensor]]:
    m = eng.model
    cache = m.new_cache()
    lg = m.forward(torch.tensor(ids), cache, last_only=True)[-1]
    out, rows = [], []
    for _ in range(n):
        rows.append(lg)
        out.append(int(lg.argmax()))
        lg = m.forward(torch.tensor([out[-1]]), cache)[-1]
    return out, rows


def _kl(ref: torch.Tensor, got: torch.Tensor) -> float:
    lr, lg = F.log_softmax(ref, -1), F.log_softmax(got, -1)
    return float((lr.exp() * (lr - lg)).sum(-1).mean())


PROMPTS = ("The history of the printing press begins", "Q: What is the capital of France?\nA:",
           "Once upon a time, in a small village,", "Water boils at", "The three primary colors are",
           "Photosynthesis is the process", "In 1969, Neil Armstrong")


@pytest.mark.slow
def test_int8_kv_keeps_greedy_output_of_f32_over_64_tokens(smol_kv: dict[str, Engine]) -> None:
    """Identical 64-token greedy answers, or the first divergence is where f32 itself nearly ties.

    Measured (Dec 2026 kernels): 5 of these 7 prompts identical; "Q: What is the capital of France?"
    first differs at token 48 (f32's top two 0.0006 apart, KL 1.6e-4 there) and "In 1969, Neil
    Armstrong" at token 6 (0.003 apart, KL 1.7e-4). Which prompts tie moves with the weight
    kernels' rounding (a qkernel change moved the first one from identical)."""
    tok = smol_kv["f32"].tokenizer
    identical = 0
    for prompt in PROMPTS:
        ids = tok.encode(prompt, add_special=True)
        a, ra = _greedy(smol_kv["f32"], ids, 64)
        b, rb = _greedy(smol_kv["int8"], ids, 64)
        first = next((i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y), None)
        if first is None:
            identical += 1
            continue
        top = torch.topk(ra[first], 2).values
        assert float(top[0] - top[1]) < 0.05 and _kl(ra[first], rb[first]) < 1e-3, (prompt, first)
    assert identical >= 4


def test_int4_kv_within_a_kl_bound_of_f32(smol_kv: dict[str, Engine]) -> None:
    tok = smol_kv["f32"].tokenizer
    ids = tok.encode("The Declaration of Independence was adopted by the Continental Congress on July 4, 1776, "
                     "announcing that the thirteen American colonies regarded themselves as independent states.",
                     add_special=True)
    ref = smol_kv["f32"].logits(ids)
    kl8, kl4 = _kl(ref, smol_kv["int8"].logits(ids)), _kl(ref, smol_kv["int4"].logits(ids))
    assert kl8 < 1e-3 and kl4 < 0.05 and kl8 < kl4


# --------------------------------------------------------------------------- policy, gateway, CLI


def test_policy_kv_cache_reaches_the_engine_and_one_memory_budget_reaches_stats(tiny: Path) -> None:
    from gateway.metrics import Metrics
    from gateway.policy.targets import KV_SLACK, LocalTarget
    from gateway.runtime import build_backend

    assert KV_SLACK == SLACK
    cfg = LocalTarget(kind="local", engine="local_engine", model_path=str(tiny), prefix_cache_mb=1,
                      kv_cache={"dtype": "int4", "max_tokens": 96, "sinks": 2})
    backend = build_backend("local", cfg)
    backend.load()
    assert backend.engine.kv_config == KVConfig("int4", 96, 2)
    s = backend.stats()
    per_token = kv_cache.bytes_per_token(KVConfig("int4"), 2, 1, 32)
    assert s["memory_kv_bytes_per_token"] == per_token and s["memory_kv_max_bytes"] == per_token * (96 + SLACK)
    # the KV of every sequence the scheduler may batch (max_batch, default 8) counts in the budget
    assert s["memory_kv_sequences"] == 8 and s["memory_kv_total_bytes"] == 8 * s["memory_kv_max_bytes"]
    assert s["memory_total_bytes"] == (s["memory_weights_bytes"] + s["memory_kv_total_bytes"] + 2**20)
    info = backend.engine.info()
    assert info["kv_cache"] == {"dtype": "int4", "max_tokens": 96, "sinks": 2} and info["memory"]["weights_bytes"] > 0
    metrics = Metrics()
    metrics.watch_engines(lambda: {"local": backend.stats()})
    assert 'hybrid_engine_stat{stat="memory_kv_max_bytes",target="local"}' in metrics.render().decode()
    with pytest.raises(ValueError, match="applies to `engine: local_engine`"):
        LocalTarget(kind="local", model="openai/x", api_base="http://127.0.0.1:1/v1", kv_cache={"dtype": "int8"})


def test_cli_generate_with_a_bounded_int8_cache_runs_past_the_context(tiny: Path) -> None:
    from click.testing import CliRunner

    from local_engine.cli import main

    r = CliRunner().invoke(main, ["generate", str(tiny), "--prompt", "The quick brown fox", "--max-tokens", "300",
                                  "--weights", "f32", "--threads", "1", "--kv-dtype", "int8", "--kv-max-tokens", "48",
                                  "--kv-sinks", "4", "--stats"])
    assert r.exit_code == 0, r.output
    per_token = kv_cache.bytes_per_token(KVConfig("int8"), 2, 1, 32)
    assert "completion 300 tok" in r.stderr and f'"kv_bytes": {per_token * (48 + SLACK)}' in r.stderr
    bad = CliRunner().invoke(main, ["generate", str(tiny), "--prompt", "x", "--kv-max-tokens", "8"])
    assert bad.exit_code == 2 and bad.stderr.strip().splitlines() == [
        "local-engine: error: kv_cache max_tokens (8) must be at least sinks + 16 (20)"]
    odd = CliRunner().invoke(main, ["generate", "builtin:smollm2-135m", "--prompt", "x", "--kv-max-tokens", "9000"])
    assert odd.exit_code == 2 and "longer than the model's context" in odd.stderr and "Traceback" not in odd.output


def test_packed_moe_runs_on_a_bounded_int8_cache(tmp_path: Path) -> None:
    """The MoE's attention (layers.attention -> attend, the C step for single tokens) on the demo
    pack: logits within int8's error of f32 KV before the window fills, flat KV after it."""
    from local_engine.demo_moe import DemoShape, write_demo_moe
    from local_engine.formats.pack_writer import pack

    write_demo_moe(tmp_path / "demo", DemoShape(layers=2, experts=4, top_k=2))
    packed = pack(tmp_path / "demo", tmp_path / "packed", quant="none", group_size=64, progress=False).root
    ref = Engine.open(packed, memory_budget="unlimited", prefetch=False, threads=1)
    eng = Engine.open(packed, memory_budget="unlimited", prefetch=False, threads=1,
                      kv_cache={"dtype": "int8", "max_tokens": 40, "sinks": 4})
    try:
        text = "The quick brown fox jumps over the lazy dog. " * 8
        ids = ref.tokenizer.encode(text)
        assert len(ids) > 40 + SLACK  # the prompt alone wraps the ring
        assert _kl(ref.logits(ids[:36]), eng.logits(ids[:36])) < 0.05
        gen = eng.generate(text, max_tokens=20, temperature=0)
        "".join(gen)
        per_token = kv_cache.bytes_per_token(KVConfig("int8"), 2, 2, 32)
        assert gen.stats.extra["kv_bytes"] == per_token * (40 + SLACK) == eng.memory()["kv_max_bytes"]
        assert eng.memory()["expert_cache_bytes"] == eng.model.m.expert_bank_bytes
    finally:
        ref.close()
        eng.close()


def test_speculative_rollback_on_a_wrapped_window_gives_plain_greedy_output(tiny: Path) -> None:
    """Verifies write up to 9 rows past the window and crop the rejected ones (the ring's slack):
    the answer equals plain decoding's, token for token, long after the ring wrapped."""
    eng = Engine.open(tiny, weights="f32", threads=1, max_seq=128, prefix_cache_mb=0,
                      kv_cache={"dtype": "int8", "max_tokens": 40, "sinks": 4})
    prompt = "the cat sat on the mat. " * 6
    plain = eng.generate(prompt, max_tokens=300, temperature=0, speculative="off")
    spec = eng.generate(prompt, max_tokens=300, temperature=0, speculative="prompt-lookup")
    assert "".join(spec) == "".join(plain) and spec.stats.completion_tokens == 300
    assert spec.stats.extra["spec_verifies"] > 0 and spec.stats.extra["spec_accepted"] > 0
