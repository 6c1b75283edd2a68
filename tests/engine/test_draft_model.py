"""A separate draft model (issue #20): a second model with the target's tokenizer drafts, the
target verifies; greedy output identical to plain decoding, the draft's KV cache rolled back to
what the target accepted; opened from Engine.open / the CLI / a policy, and refused with a clear
error when its tokenizer differs."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import torch

from local_engine import speculative
from local_engine.engine import DraftModel, Engine
from local_engine.errors import EngineError

TEXT = ("The committee met on Tuesday to review the budget. Maria Lopez presented the figures for the "
        "third quarter, and the board approved the new hiring plan after a short discussion.")
QUOTE = [{"role": "user", "content": "Repeat this text exactly, word for word:\n\n" + TEXT}]
CHAT = [{"role": "user", "content": "Give me three tips for sleeping better."}]


def _with_draft(target: Engine, draft: Engine) -> Engine:
    eng = Engine(target.model, target.tokenizer, source=target.source, format=target.format, prefix_cache_mb=0)
    eng.draft_model = DraftModel(draft.model, draft.source, draft.max_seq)
    return eng


def _run(eng: Engine, msgs: list[dict[str, Any]], mode: str, **kw: Any) -> tuple[str, int, str | None, dict[str, Any]]:
    gen = eng.chat(msgs, speculative=mode, **kw)
    text = "".join(gen)
    return text, gen.stats.completion_tokens, gen.finish_reason, gen.stats.extra


@pytest.mark.parametrize("msgs", [QUOTE, CHAT], ids=["quote", "chat"])
def test_greedy_output_with_a_draft_model_is_plain_decodings(smol: Engine, smol_f32: Engine,
                                                            msgs: list[dict[str, Any]]) -> None:
    """The built-in model's block-quantised weights as the target, its fp32 dequantisation as the
    draft: two models, one tokenizer, drafts mostly right and sometimes wrong."""
    plain = _run(Engine(smol.model, smol.tokenizer, prefix_cache_mb=0), msgs, "off", max_tokens=40)
    eng = _with_draft(smol, smol_f32)
    for mode in ("draft", "auto"):
        got = _run(eng, msgs, mode, max_tokens=40)
        assert got[:3] == plain[:3], mode
    got = _run(eng, msgs, "draft", max_tokens=40)
    st = got[3]
    assert st["spec_mode"] == "draft" and st["spec_verifies"] > 0
    assert st["spec_drafted"] <= speculative.SELF_DRAFT_K * st["spec_verifies"]
    assert st["spec_accepted"] > 0.5 * st["spec_drafted"]  # the same weights at another precision
    # stop strings cut where plain decoding cuts
    stop = {"stop": ["board"]} if msgs is QUOTE else {"stop": ["."]}
    assert _run(eng, msgs, "draft", max_tokens=40, **stop)[:3] == \
        _run(Engine(smol.model, smol.tokenizer, prefix_cache_mb=0), msgs, "off", max_tokens=40, **stop)[:3]


def test_sampling_with_a_draft_model_keeps_its_seed(smol: Engine, smol_f32: Engine) -> None:
    eng = _with_draft(smol, smol_f32)
    a = _run(eng, CHAT, "draft", max_tokens=24, temperature=0.7, seed=5)
    b = _run(eng, CHAT, "draft", max_tokens=24, temperature=0.7, seed=5)
    assert a[0] == b[0] and a[0] and a[3]["spec_verifies"] > 0


def test_draft_cache_rolls_back_to_what_the_target_accepted(smol: Engine) -> None:
    """After a rejection the draft's KV holds only the shared prefix: its next drafts equal those of
    a fresh draft run on the same history."""
    ids = smol.tokenizer.encode(smol.render_chat(QUOTE))
    with torch.inference_mode():
        run = speculative.DraftRun(smol.model, smol.max_seq)
        first = run.propose(ids, 4)
        assert len(first) == 4 and run.caught_up == len(ids)
        assert run.steps == 3 and run.step_s > 0  # its cost per draft: not the prompt's catch-up
        assert run.cache.length == len(ids) + 3  # the last draft is never run
        # the target accepted two drafts, then decided another token than the third
        wrong = (first[2] + 1) % smol.tokenizer.vocab_size
        history = [*ids, *first[:2], wrong]
        again = run.propose(history, 3)
        assert run.caught_up == 1  # only the new token ran: the accepted drafts' K/V were kept
        assert run.steps == 3  # a one-token catch-up is a draft forward too
        fresh = speculative.DraftRun(smol.model, smol.max_seq)
        assert again == fresh.propose(history, 3)
        # all accepted + the next token: nothing rolled back, two tokens to catch up
        history += [*again, 42]
        assert run.propose(history, 2) == fresh.propose(history, 2) and run.caught_up == 2
        assert run.propose(history, 0) == []


def test_open_with_a_draft_model_and_clear_errors(smol_path: Path, tmp_path: Path) -> None:
    eng = Engine.open(smol_path, threads=1, speculative="draft", draft_model=str(smol_path), prefix_cache_mb=0)
    try:
        assert eng.draft_model is not None and eng.draft_model.source == str(smol_path)
        text, _, _, st = _run(eng, QUOTE, "draft", max_tokens=12)
        assert st["spec_accepted"] > 0 and text
    finally:
        eng.close()
    with pytest.raises(EngineError, match=r"draft_model: .*no such file"):
        Engine.open(smol_path, speculative="draft", draft_model=str(tmp_path / "missing.gguf"))


def test_cli_and_policy_take_a_draft_model(smol_path: Path) -> None:
    from click.testing import CliRunner

    from gateway.policy.targets import LocalTarget
    from gateway.runtime import build_backend
    from local_engine.cli import main

    args = ["generate", str(smol_path), "--chat", QUOTE[0]["content"], "--max-tokens", "16", "--threads", "1"]
    plain = CliRunner().invoke(main, args)
    r = CliRunner().invoke(main, [*args, "--speculative", "draft", "--draft-model", str(smol_path), "--stats"])
    assert r.exit_code == 0 and plain.exit_code == 0, r.output
    assert r.stdout == plain.stdout
    assert re.search(r"^speculative draft: drafted \d+, accepted \d+", r.stderr, re.M), r.stderr
    kw: dict[str, Any] = {"kind": "local", "engine": "local_engine", "model_path": "builtin:smollm2-135m"}
    backend = build_backend("dev", LocalTarget(**kw, speculative="draft", draft_model="builtin:smollm2-135m"))
    assert backend.engine_opts["draft_model"] == "builtin:smollm2-135m"  # type: ignore[attr-defined]
    assert "draft_model" not in build_backend("dev", LocalTarget(**kw)).engine_opts  # type: ignore[attr-defined]
