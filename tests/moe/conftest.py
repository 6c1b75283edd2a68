"""Tiny random MoE checkpoints built with transformers (no download), saved and packed once."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

ARCHS = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe")
PROMPT = [5, 17, 99, 3, 64, 8, 120, 42, 77, 1, 30, 11]
GEN_STEPS = 10


@dataclass
class Compared:
    """A pack against its transformers model on ``PROMPT`` (``compare_with_transformers``)."""

    diff: float  # max |logit difference|
    scale: float  # max |reference logit|: what a quantised pack's diff is judged against
    tokens: list[int]  # the pack's greedy continuation (GEN_STEPS tokens)


def compare_with_transformers(hf: object, packed: Path, budget: int | str = 0, label: str = "") -> Compared:
    """Open ``packed`` at ``budget`` and compare its logits (and greedy tokens) with ``hf``'s, fp32:
    the check every pack test repeats (printed with ``label`` so a run shows the figures)."""
    from local_engine.models.moe import MoEModel

    with torch.no_grad():
        ref = hf(torch.tensor([PROMPT])).logits[0]  # type: ignore[operator]
    model = MoEModel.open(packed, memory_budget=budget)
    try:
        diff = (model.logits(PROMPT) - ref).abs().max().item()
        tokens = list(model.generate_ids(PROMPT, GEN_STEPS))
    finally:
        model.close()
    if label:
        print(f"{label}, budget={budget}: max |logit diff| vs transformers = {diff:.2e}")
    return Compared(diff, ref.abs().max().item(), tokens)


@dataclass
class Tiny:
    arch: str
    hf_dir: Path
    hf: object
    packed: dict[str, Path] = field(default_factory=dict)


def _config(arch: str):
    import transformers

    common = dict(vocab_size=128, hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, num_experts_per_tok=2)
    if arch == "mixtral":
        return transformers.MixtralConfig(num_local_experts=8, intermediate_size=64, **common)
    if arch == "qwen2_moe":
        # shared expert + gate, and one dense (mlp_only) layer to exercise the interleave
        return transformers.Qwen2MoeConfig(num_experts=8, moe_intermediate_size=64, intermediate_size=128,
                                           shared_expert_intermediate_size=96, mlp_only_layers=[1], **common)
    if arch == "qwen3_moe":
        return transformers.Qwen3MoeConfig(num_experts=8, moe_intermediate_size=64, norm_topk_prob=True,
                                           **common)
    return transformers.OlmoeConfig(num_experts=8, intermediate_size=64, eos_token_id=2, pad_token_id=1,
                                    **common)


def _save_word_tokenizer(d: Path, vocab: int) -> None:
    """A whitespace word-level tokenizer ("w0".."wN") so Engine.open can run the packed dir end to end."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(vocab)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(d / "tokenizer.json"))


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Tiny]:
    import transformers

    from local_engine.formats.pack_writer import pack

    root = tmp_path_factory.mktemp("moe")
    out: dict[str, Tiny] = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    for i, arch in enumerate(ARCHS):
        torch.manual_seed(1234 + i)
        hf = transformers.AutoModelForCausalLM.from_config(_config(arch)).eval()
        # default init (std 0.02) gives near-flat logits; widen so greedy is not decided by ties
        with torch.no_grad():
            for p in hf.parameters():
                if p.dim() >= 2:
                    p.normal_(0.0, 0.15)
        hf_dir = root / arch
        hf.save_pretrained(hf_dir)
        _save_word_tokenizer(hf_dir, hf.config.vocab_size)
        t = Tiny(arch, hf_dir, hf)
        for q in ("none", "int8", "int4"):
            t.packed[q] = root / f"{arch}-{q}"
            pack(hf_dir, t.packed[q], quant=q, group_size=32, progress=False)
        out[arch] = t
    torch.set_num_threads(threads)
    return out


@pytest.fixture(autouse=True)
def _one_intra_op_thread():
    """Tiny matrices: torch's 2-thread pool only adds spin/handoff cost (large on a loaded box)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
