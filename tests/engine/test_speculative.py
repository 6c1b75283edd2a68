"""Prompt-lookup speculative decoding (issue #20): greedy output identical to plain decoding, the KV
cache rolled back after rejections, drafts, the auto switch, and when it stays off."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import torch

from local_engine import speculative
from local_engine.engine import Engine
from local_engine.errors import EngineError
from local_engine.speculative import PromptLookup

TEXT = ("The committee met on Tuesday to review the budget. Maria Lopez presented the figures for the "
        "third quarter, and the board approved the new hiring plan after a short discussion.")
QUOTE = [{"role": "user", "content": "Repeat this text exactly, word for word:\n\n" + TEXT}]
EDIT = [{"role": "user", "content": "Rewrite this text, replacing Tuesday with Friday:\n\n" + TEXT}]
SUMMARY = [{"role": "user", "content": "Summarise in one sentence:\n\n" + TEXT}]
CHAT = [{"role": "user", "content": "Give me three tips for sleeping better."}]
# the K/V of a verify come from the prefill path, ~5e-3 from the fused step's (test_prefix_cache)
ATOL = 1e-2


@pytest.fixture()
def eng(smol: Engine) -> Engine:
    # the session's model with a prefix cache of its own: a run leaves its KV there for the next
    return Engine(smol.model, smol.tokenizer, source=smol.source, format=smol.format)


def _run(eng: Engine, msgs: list[dict[str, Any]], mode: str, **kw: Any) -> tuple[str, int, str | None, dict[str, Any]]:
    gen = eng.chat(msgs, speculative=mode, **kw)
    text = "".join(gen)
    return text, gen.stats.completion_tokens, gen.finish_reason, gen.stats.extra


@pytest.mark.parametrize("msgs", [QUOTE, EDIT, SUMMARY, CHAT], ids=["quote", "edit", "summary", "chat"])
def test_greedy_output_is_identical_to_plain_decoding(eng: Engine, msgs: list[dict[str, Any]]) -> None:
    plain = _run(Engine(eng.model, eng.tokenizer, prefix_cache_mb=0), msgs, "off", max_tokens=48)
    assert plain[3]["spec_drafted"] == 0 and plain[3]["spec_tokens_per_forward"] == 1.0
    for mode in ("prompt-lookup", "auto"):
        got = _run(eng, msgs, mode, max_tokens=48)
        assert got[:3] == plain[:3], mode
        assert got[3]["spec_mode"] == mode
    # the second run above reused the first's KV from the prefix cache: drafts did not leak into it
    assert sum(got[3]["spec_auto_k"].values()) > 0 and got[3]["spec_auto_probes"] >= 0


def test_quoting_accepts_drafts_and_saves_forwards(eng: Engine) -> None:
    st = _run(eng, QUOTE, "prompt-lookup", max_tokens=40)[3]
    assert st["spec_verifies"] > 0 and st["spec_accepted"] > 0.5 * st["spec_drafted"]
    assert st["spec_tokens_per_forward"] > 2.0
    assert 0 < st["spec_acceptance"] <= 1.0


def test_stop_strings_and_max_tokens_cut_the_same_place(eng: Engine) -> None:
    plain_eng = Engine(eng.model, eng.tokenizer, prefix_cache_mb=0)
    for kw in ({"stop": ["board"]}, {"stop": [" Lopez", "quarter"]}, {"max_tokens": 7}, {"max_tokens": 1}):
        args = {"max_tokens": 48, **kw}
        plain = _run(plain_eng, QUOTE, "off", **args)
        got = _run(eng, QUOTE, "prompt-lookup", **args)
        assert got[:3] == plain[:3], kw
    assert _run(eng, QUOTE, "prompt-lookup", max_tokens=48, stop=["board"])[2] == "stop"


def test_raw_generate_with_a_repeating_prompt(eng: Engine) -> None:
    prompt = "1, 2, 3, 4, 1, 2, 3, 4, 1, 2, 3, 4, 1, 2,"
    plain = "".join(Engine(eng.model, eng.tokenizer, prefix_cache_mb=0).generate(prompt, max_tokens=24))
    gen = eng.generate(prompt, max_tokens=24, speculative="prompt-lookup")
    assert "".join(gen) == plain and gen.stats.extra["spec_accepted"] > 0


def test_after_a_rejection_later_logits_equal_a_fresh_run(smol: Engine) -> None:
    model = smol.model
    ids = smol.tokenizer.encode(smol.render_chat(QUOTE))
    cache = model.new_cache()
    with torch.inference_mode():
        first = int(model.forward(torch.tensor(ids), cache, last_only=True)[-1].argmax())
        # the true continuation, then a wrong token: the verify must accept 2 and reject the third
        truth = [first]
        for _ in range(4):
            truth.append(int(model.forward(torch.tensor([truth[-1]]), cache, last_only=True)[-1].argmax()))
        cache.crop(len(ids))
        wrong = (truth[3] + 1) % smol.tokenizer.vocab_size
        logits, accepted = speculative.verify(model, cache, truth[0], [truth[1], truth[2], wrong, truth[4]])
        assert accepted == truth[1:3]
        assert cache.length == len(ids) + 3  # first + the two accepted: the rejected tail is gone
        assert int(logits.argmax()) == truth[3]
        # run on past the rollback: the rejected tokens' K/V must not be read
        nxt = model.forward(torch.tensor([truth[3], truth[4]]), cache)
        fresh = model.forward(torch.tensor([*ids, *truth]), model.new_cache())
    torch.testing.assert_close(nxt, fresh[-2:], atol=ATOL, rtol=0)
    torch.testing.assert_close(logits, fresh[len(ids) + 2], atol=ATOL, rtol=0)


def test_sampling_speculates_and_the_grammar_mask_turns_it_off(eng: Engine) -> None:
    runs = []
    for _ in range(2):
        gen = eng.chat(QUOTE, max_tokens=32, temperature=0.3, seed=7, speculative="prompt-lookup")
        runs.append("".join(gen))
        st = gen.stats.extra
        assert st["spec_mode"] == "prompt-lookup" and st["spec_verifies"] > 0 and st["spec_accepted"] > 0
    assert runs[0] == runs[1] and runs[0]  # one seed, one answer: the acceptance draws use the seeded generator
    gen = eng.chat(QUOTE, max_tokens=8, speculative="prompt-lookup", repetition_penalty=1.3)
    "".join(gen)
    assert gen.stats.extra["spec_mode"] == "off"  # greedy with a penalty: the greedy verify's argmax would differ
    gen = eng.chat(QUOTE, max_tokens=8, speculative="prompt-lookup",
                   response_format={"type": "json_object"})
    "".join(gen)
    assert gen.stats.extra["spec_mode"] == "off"


V = 16  # the sampling rule's test model: a vocabulary small enough for a chi-square over every token


def _small_vocab_llama(dst: Path) -> Path:
    from safetensors.torch import save_file

    H, nh, nkv, hd, ffn, layers = 32, 2, 1, 16, 64, 2
    g = torch.Generator().manual_seed(3)

    def w(o: int, i: int) -> torch.Tensor:
        return torch.randn(o, i, generator=g) * (1.5 / i**0.5)

    t = {"model.embed_tokens.weight": torch.randn(V, H, generator=g), "model.norm.weight": torch.ones(H),
         "lm_head.weight": w(V, H)}
    for i in range(layers):
        p = f"model.layers.{i}."
        t |= {p + "input_layernorm.weight": torch.ones(H), p + "post_attention_layernorm.weight": torch.ones(H),
              p + "self_attn.q_proj.weight": w(nh * hd, H), p + "self_attn.k_proj.weight": w(nkv * hd, H),
              p + "self_attn.v_proj.weight": w(nkv * hd, H), p + "self_attn.o_proj.weight": w(H, nh * hd),
              p + "mlp.gate_proj.weight": w(ffn, H), p + "mlp.up_proj.weight": w(ffn, H),
              p + "mlp.down_proj.weight": w(H, ffn)}
    dst.mkdir(parents=True, exist_ok=True)
    save_file(t, str(dst / "model.safetensors"), metadata={"format": "pt"})
    (dst / "config.json").write_text(json.dumps({
        "model_type": "llama", "hidden_size": H, "num_attention_heads": nh, "num_key_value_heads": nkv,
        "head_dim": hd, "intermediate_size": ffn, "num_hidden_layers": layers, "vocab_size": V,
        "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "max_position_embeddings": 128}))
    return dst


def _chi2_below_bound(counts: torch.Tensor, probs: torch.Tensor, what: str) -> None:
    from scipy.stats import chi2

    n = int(counts.sum())
    expected = probs.double() * n
    keep = expected >= 5  # the usual validity rule; the rest lumped into one cell
    obs = torch.cat([counts[keep].double(), counts[~keep].sum().double().reshape(1)])
    exp = torch.cat([expected[keep], expected[~keep].sum().reshape(1)])
    if exp[-1] < 5:  # nothing (or too little) lumped: fold the lump into the largest cell
        obs[torch.argmax(exp[:-1])] += obs[-1]
        exp[torch.argmax(exp[:-1])] += exp[-1]
        obs, exp = obs[:-1], exp[:-1]
    stat = float(((obs - exp) ** 2 / exp).sum())
    bound = float(chi2.ppf(0.999, len(exp) - 1))
    assert stat < bound, f"{what}: chi-square {stat:.1f} >= {bound:.1f} ({len(exp) - 1} df, n={n})"
    # and the bound is not vacuous: a distribution moved by 0.05 between two cells fails it
    moved = probs.double().clone()
    top2 = torch.topk(moved, 2).indices
    moved[top2[0]] -= 0.05
    moved[top2[1]] += 0.05
    alt = float(((counts[keep].double() - moved[keep] * n) ** 2 / (moved[keep] * n)).sum())
    assert alt > stat


@pytest.mark.parametrize("temperature,top_p", [(1.0, 1.0), (0.7, 0.9)])
def test_speculative_sampling_draws_from_the_target_distribution(tmp_path: Path, temperature: float,
                                                                  top_p: float) -> None:
    """The rejection rule on a real (random, 16-token) model: over many verifies of the same draft,
    the first token's and (after an accepted first draft) the second token's frequencies match the
    target's sampling distributions computed by plain single steps, within a chi-square bound."""
    from local_engine.formats.llama_weights import config_from_hf
    from local_engine.models.llama import LlamaModel
    from local_engine.sampling import Sampler, SamplingParams
    from local_engine.store import SafetensorsStore

    store = SafetensorsStore(_small_vocab_llama(tmp_path / "m"))
    model = LlamaModel(store, config_from_hf(store), weights="f32")
    sampler = Sampler(SamplingParams(temperature=temperature, top_p=top_p, seed=11))
    ctx, last = [1, 5, 3, 7, 2, 9], 4
    with torch.inference_mode():
        cache = model.new_cache()
        model.forward(torch.tensor(ctx), cache)
        base = cache.length
        p0 = sampler.probs(model.forward(torch.tensor([last]), cache, last_only=True)[-1], [])
        d0 = int(torch.topk(p0, 2).indices[1])  # the second likeliest: accepted some of the time
        p1 = sampler.probs(model.forward(torch.tensor([d0]), cache, last_only=True)[-1], [])
        d1 = int(torch.topk(p1, 3).indices[2])
        after_both = model.forward(torch.tensor([*ctx, last, d0, d1]), model.new_cache(), last_only=True)[-1]
        cache.crop(base)
        first, second = torch.zeros(V), torch.zeros(V)
        for _ in range(2000):
            logits, accepted, residual = speculative.verify_sampled(
                model, cache, last, [d0, d1], lambda row, acc: sampler.probs(row, acc), sampler.uniform)
            assert cache.length == base + 1 + len(accepted)
            toks = [*accepted, sampler.draw(residual)] if residual is not None else accepted
            first[toks[0]] += 1
            if accepted[:1] == [d0]:
                second[toks[1]] += 1
            if residual is None:  # both accepted: the next token comes from the position after them
                torch.testing.assert_close(logits, after_both, atol=1e-4, rtol=0)
            cache.crop(base)
    assert 0 < first[d0] < 2000  # the draft was both accepted and rejected
    _chi2_below_bound(first, p0, "first token")
    _chi2_below_bound(second, p1, "second token after an accepted draft")
def test_default_is_off_and_bad_modes_are_clear_errors(eng: Engine, smol_path: Any) -> None:
    gen = eng.chat(QUOTE, max_tokens=4)
    "".join(gen)
    assert gen.stats.extra["spec_mode"] == "off"
    with pytest.raises(EngineError, match="speculative must be one of off, prompt-lookup, auto, draft"):
        eng.chat(QUOTE, max_tokens=4, speculative="maybe")
    with pytest.raises(EngineError, match="speculative must be one of"):
        Engine.open(smol_path, speculative="yes")
    # a dense model has no cheaper self to draft with: said plainly, at the call and at open
    with pytest.raises(EngineError, match=r"'draft' needs a draft model .* or a model that drafts for itself"):
        eng.chat(QUOTE, max_tokens=4, speculative="draft")
    with pytest.raises(EngineError, match="'draft' needs a draft model"):
        Engine.open(smol_path, speculative="draft")


def test_prompt_lookup_proposes_the_latest_longest_match() -> None:
    t = [1, 2, 3, 9, 9, 5, 2, 3, 7, 8, 4, 2, 3]
    d = PromptLookup(t)
    # 3-gram (4, 2, 3) is new; 2-gram (2, 3) last seen ending at 7 -> what followed it
    assert d.propose(3) == [7, 8, 4]
    t.append(7)  # the caller's history grows; the index follows
    assert d.propose(2) == [8, 4]  # 3-gram (2, 3, 7) matched
    t.append(6)
    assert d.propose(4) == []  # 6 never seen before
    assert PromptLookup([5]).propose(3) == [] and d.propose(0) == []


def test_cli_generate_speculative_prints_its_stats(smol_path: Any) -> None:
    from click.testing import CliRunner

    from local_engine.cli import main

    args = ["generate", str(smol_path), "--chat", QUOTE[0]["content"], "--max-tokens", "24", "--threads", "1"]
    plain = CliRunner().invoke(main, args)
    r = CliRunner().invoke(main, [*args, "--speculative", "prompt-lookup", "--stats"])
    assert r.exit_code == 0 and plain.exit_code == 0, r.output
    assert r.stdout == plain.stdout
    assert re.search(r"^speculative prompt-lookup: drafted \d+, accepted \d+ \(\d+%\), [\d.]+ tokens per forward$",
                     r.stderr, re.M), r.stderr
    assert json.loads(r.stderr.splitlines()[-1])["spec_accepted"] > 0
    bad = CliRunner().invoke(main, [*args, "--speculative", "maybe"])
    assert bad.exit_code == 2 and "'maybe' is not one of" in bad.output
    dense = CliRunner().invoke(main, [*args, "--speculative", "draft"])
    assert dense.exit_code != 0 and "needs a draft model" in dense.output
    assert "Traceback" not in dense.output


def test_policy_engine_target_passes_speculative_to_the_engine() -> None:
    from pydantic import ValidationError

    from gateway.policy.targets import LocalTarget
    from gateway.runtime import build_backend

    kw: dict[str, Any] = {"kind": "local", "engine": "local_engine", "model_path": "builtin:smollm2-135m"}
    backend = build_backend("dev", LocalTarget(**kw, speculative="auto"))
    assert backend.engine_opts["speculative"] == "auto"  # type: ignore[attr-defined]
    assert "speculative" not in build_backend("dev", LocalTarget(**kw)).engine_opts  # type: ignore[attr-defined]
    assert build_backend("dev", LocalTarget(**kw, speculative="draft")).engine_opts["speculative"] == "draft"  # type: ignore[attr-defined]
    with pytest.raises(ValidationError, match="speculative"):
        LocalTarget(**kw, speculative="maybe")


def test_speculation_counts_reach_the_gateway_metrics() -> None:
    from gateway.metrics import Metrics
    from gateway.policy.targets import LocalTarget
    from gateway.runtime import build_backend

    cfg = LocalTarget(kind="local", engine="local_engine", model_path="builtin:smollm2-135m",
                      speculative="prompt-lookup")
    backend = build_backend("local", cfg)
    backend.load()
    metrics = Metrics()
    metrics.watch_engines(lambda: {"local": backend.stats()})
    before = metrics.render().decode()
    assert 'hybrid_speculative_drafted_tokens_total{target="local"} 0.0' in before
    gens = [backend.engine.chat(QUOTE, max_tokens=24) for _ in range(2)]
    st = [("".join(g), g.stats.extra)[1] for g in gens]
    text = metrics.render().decode()

    def one(name: str) -> float:
        m = re.search(rf'^{name}{{target="local"}} ([\d.e+-]+)$', text, re.M)
        assert m, name
        return float(m.group(1))

    drafted, accepted = sum(s["spec_drafted"] for s in st), sum(s["spec_accepted"] for s in st)
    assert drafted > 0
    assert one("hybrid_speculative_drafted_tokens_total") == drafted
    assert one("hybrid_speculative_accepted_tokens_total") == accepted
    assert one("hybrid_speculative_verifies_total") == sum(s["spec_verifies"] for s in st)
    assert one("hybrid_speculative_acceptance_ratio") == pytest.approx(accepted / drafted)
    assert one("hybrid_speculative_tokens_per_forward") > 1.0
