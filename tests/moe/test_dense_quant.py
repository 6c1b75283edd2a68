"""Dense (resident) matrices in low bits: ``pack --dense int8|int4`` stores attention, shared
experts, dense MLP layers and the vocab head as GGUF Q8_0 / Q4_1 blocks multiplied by qkernel.

Round trips (the blocks dequantise to the weights within each format's step), which tensors are
converted and which stay lossless, the model's kernels (fused q|k|v with biases, tied heads)
against the same model with the dequantised weights in fp32, ``redense`` equal to ``pack``, and
the CLI option."""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from click.testing import CliRunner

from local_engine.errors import PackError
from local_engine.formats.pack import dequantize_dense, load_resident, read_manifest
from local_engine.formats.pack_quant import dense_quantisable, quantize_dense
from local_engine.formats.pack_writer import pack, redense
from local_engine.models.moe import MoEModel
from local_engine.pack_cli import main as pack_main
from tests.moe.conftest import PROMPT, Tiny


@pytest.mark.parametrize("dense", ["int8", "int4"])
def test_blocks_round_trip_within_a_step(dense: str) -> None:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(96, 160, generator=g) * torch.linspace(0.1, 3.0, 160)  # columns of different scales
    w[5, 7] = 40.0  # an outlier owns its block's scale
    blocks = quantize_dense(w, dense)
    assert blocks.dtype == torch.uint8 and blocks.shape == (96, 160 // 32 * (34 if dense == "int8" else 20))
    back = dequantize_dense(blocks, {"int8": "Q8_0", "int4": "Q4_1"}[dense], (96, 160))
    per_block = w.reshape(96, 5, 32)
    if dense == "int8":  # symmetric, d = max|w| / 127: error <= d / 2 (+ fp16 rounding of d)
        step = per_block.abs().amax(-1) / 127
    else:  # asymmetric, d = (max - min) / 15
        step = (per_block.amax(-1) - per_block.amin(-1)) / 15
    err = (back - w).abs().reshape(96, 5, 32).amax(-1)
    # half a step, plus the fp16 rounding of the stored scale (and min) times the largest code
    assert torch.all(err <= step * 0.5 + per_block.abs().amax(-1) * 2**-10)
    assert not torch.all(err <= step * 0.25)  # and the bound is not loose by 2x
    # the blocks are llama.cpp's own format: gguf's reference dequantiser reads them the same way
    ref = gguf.quants.dequantize(blocks.numpy(), gguf.GGMLQuantizationType[{"int8": "Q8_0", "int4": "Q4_1"}[dense]])
    assert np.array_equal(ref.reshape(96, 160), back.numpy())


def test_which_tensors_are_quantised() -> None:
    w = torch.zeros(64, 64)
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.o_proj.weight",
                 "model.layers.0.mlp.shared_expert.down_proj.weight", "model.layers.1.mlp.gate_proj.weight",
                 "lm_head.weight"):
        assert dense_quantisable(name, w), name
    for name in ("model.layers.0.mlp.gate.weight", "model.layers.0.mlp.shared_expert_gate.weight",
                 "model.embed_tokens.weight", "model.layers.0.input_layernorm.weight"):
        assert not dense_quantisable(name, w), name
    assert not dense_quantisable("model.layers.0.self_attn.q_proj.weight", torch.zeros(64, 48))  # not whole blocks
    assert not dense_quantisable("model.layers.0.self_attn.q_proj.bias", torch.zeros(64))


@pytest.fixture(scope="module")
def dense_packs(tiny_models: dict[str, Tiny], tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, str], Path]:
    root = tmp_path_factory.mktemp("dense")
    out = {}
    for arch in ("qwen2_moe", "qwen3_moe", "olmoe", "mixtral"):
        for dense in ("int8", "int4"):
            out[arch, dense] = root / f"{arch}-{dense}"
            pack(tiny_models[arch].hf_dir, out[arch, dense], quant="int4", group_size=32, progress=False, dense=dense)
    return out


def _as_fp32_reference(packed: Path, lossless: Path) -> MoEModel:
    """The lossless pack's model with every matrix the dense pack quantised replaced by the fp32
    dequantisation of its blocks: what the kernels should compute."""
    m = read_manifest(packed)
    blocks = load_resident(m)
    ref = MoEModel.open(lossless, memory_budget="unlimited", prefetch=False)
    for name, t in m.raw["resident"]["tensors"].items():
        if t.get("qtype"):
            ref.w[name] = dequantize_dense(blocks[name], t["qtype"], tuple(t["shape"]))
    return ref


@pytest.mark.parametrize("arch", ["qwen2_moe", "qwen3_moe", "olmoe", "mixtral"])
@pytest.mark.parametrize("dense", ["int8", "int4"])
def test_kernels_equal_dequantise_then_matmul(tiny_models: dict[str, Tiny], dense_packs: dict[tuple[str, str], Path],
                                              tmp_path: Path, arch: str, dense: str) -> None:
    packed = dense_packs[arch, dense]
    # the same experts (int4) with lossless dense matrices, for the reference
    lossless = tmp_path / "lossless"
    pack(tiny_models[arch].hf_dir, lossless, quant="int4", group_size=32, progress=False)
    m = read_manifest(packed)
    quantised = {n for n, t in m.raw["resident"]["tensors"].items() if t.get("qtype")}
    assert "lm_head.weight" in quantised and "model.layers.0.self_attn.o_proj.weight" in quantised
    assert not any(n.endswith((".gate.weight", "norm.weight")) or "embed" in n for n in quantised)
    if arch == "qwen2_moe":  # the shared expert and the dense (mlp_only) layer's MLP
        assert {"model.layers.0.mlp.shared_expert.up_proj.weight", "model.layers.1.mlp.down_proj.weight"} <= quantised
    assert m.resident_bytes < read_manifest(lossless).resident_bytes * (0.5 if dense == "int8" else 0.35)
    model = MoEModel.open(packed, memory_budget="unlimited", prefetch=False)
    ref = _as_fp32_reference(packed, lossless)
    try:
        if arch != "olmoe":  # q|k|v as one matrix (OLMoE normalises q and k apart)
            assert "model.layers.0.self_attn.qkv" in model.lin
        got, want = model.logits(PROMPT), ref.logits(PROMPT)
        # activations are quantised to int16 per block inside the kernel: rounding, not error
        assert torch.allclose(got, want, rtol=0, atol=2e-3 * float(want.abs().max())), float((got - want).abs().max())
        assert torch.equal(got.argmax(-1), want.argmax(-1))
        # the decode step (one token, fused expert calls) through the same kernels
        steps = list(model.generate_ids(PROMPT, 6))
        assert steps == list(ref.generate_ids(PROMPT, 6))
        assert model.describe()["dense"] == dense
        s = model.stats()
        assert s["dense_bytes_per_token"] < ref.stats()["dense_bytes_per_token"] * (0.5 if dense == "int8" else 0.35)
    finally:
        model.close()
        ref.close()


def test_tied_head_gets_its_own_blocks_and_the_embedding_stays_lossless(tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    from local_engine.demo_moe import DemoShape, write_demo_moe

    src = tmp_path / "demo"
    write_demo_moe(src, DemoShape(layers=2, experts=4, top_k=2, hidden_size=64, moe_intermediate_size=32, seed=3))
    # make it tied: drop the head, say so in the config
    f = next(src.glob("*.safetensors"))
    t = load_file(str(f))
    del t["lm_head.weight"]
    save_file(t, str(f), metadata={"format": "pt"})
    cfg = json.loads((src / "config.json").read_text())
    cfg["tie_word_embeddings"] = True
    (src / "config.json").write_text(json.dumps(cfg))
    lossless, low = tmp_path / "f32", tmp_path / "int8"
    pack(src, lossless, quant="int4", group_size=32, progress=False)
    pack(src, low, quant="int4", group_size=32, progress=False, dense="int8")
    m = read_manifest(low)
    assert m.resident_qtype("lm_head.weight") == "Q8_0"
    assert m.resident_qtype("model.embed_tokens.weight") is None
    model = MoEModel.open(low, memory_budget="unlimited", prefetch=False)
    ref = _as_fp32_reference(low, lossless)
    try:
        got, want = model.logits(PROMPT[:6]), ref.logits(PROMPT[:6])
        assert torch.allclose(got, want, rtol=0, atol=2e-3 * float(want.abs().max()))
    finally:
        model.close()
        ref.close()


def test_redense_writes_what_pack_writes_and_links_the_experts(tiny_models: dict[str, Tiny],
                                                               dense_packs: dict[tuple[str, str], Path],
                                                               tmp_path: Path) -> None:
    lossless = tmp_path / "f32"
    pack(tiny_models["qwen2_moe"].hf_dir, lossless, quant="int4", group_size=32, progress=False)
    out = redense(lossless, tmp_path / "re", "int8")
    want = dense_packs["qwen2_moe", "int8"]
    assert (out.root / "resident.bin").read_bytes() == (want / "resident.bin").read_bytes()
    assert out.raw["resident"] == read_manifest(want).raw["resident"]
    assert (out.root / "experts.bin").stat().st_ino == (lossless / "experts.bin").stat().st_ino
    assert out.dense == "int8"
    with pytest.raises(PackError, match="already int8"):
        redense(out.root, tmp_path / "again", "int4")


def test_cli_dense_option(tiny_models: dict[str, Tiny], tmp_path: Path) -> None:
    r = CliRunner().invoke(pack_main, ["pack", str(tiny_models["qwen3_moe"].hf_dir), str(tmp_path / "p"),
                                       "--quant", "int4", "--group-size", "32", "--dense", "int4", "--no-progress"])
    assert r.exit_code == 0, r.output
    assert "dense int4" in r.output
    assert read_manifest(tmp_path / "p").resident_qtype("model.layers.2.self_attn.v_proj.weight") == "Q4_1"
    r = CliRunner().invoke(pack_main, ["pack", str(tiny_models["qwen3_moe"].hf_dir), str(tmp_path / "q"),
                                       "--dense", "int3"])
    assert r.exit_code == 2 and "int3" in r.output
