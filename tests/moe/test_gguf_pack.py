"""GGUF MoE -> pack: a tiny Qwen3-MoE written with the `gguf` writer, packed, run against transformers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from local_engine.errors import UnsupportedArchitecture
from local_engine.formats.pack_writer import pack
from local_engine.pack_cli import main as pack_main
from tests.moe.conftest import Tiny, compare_with_transformers


def _write_gguf(t: Tiny, path: Path, expert_type: str = "F32", arch: str = "qwen3moe") -> None:
    """The tiny HF model under llama.cpp's names and shapes (numpy order = HF order)."""
    import gguf

    cfg = t.hf.config
    sd = {k: v.detach().float().numpy() for k, v in t.hf.state_dict().items()}
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_embedding_length(cfg.hidden_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_key_length(cfg.hidden_size // cfg.num_attention_heads)
    w.add_expert_count(cfg.num_experts)
    w.add_expert_used_count(cfg.num_experts_per_tok)
    w.add_expert_feed_forward_length(cfg.moe_intermediate_size)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(float(cfg.rope_parameters["rope_theta"]))
    w.add_context_length(cfg.max_position_embeddings)
    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    w.add_tensor("output_norm.weight", sd["model.norm.weight"])
    w.add_tensor("output.weight", sd["lm_head.weight"])
    names = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
             "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm",
             "self_attn.k_norm": "attn_k_norm", "post_attention_layernorm": "ffn_norm", "mlp.gate": "ffn_gate_inp"}
    inter = cfg.moe_intermediate_size
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        for hf, gg in names.items():
            w.add_tensor(f"blk.{i}.{gg}.weight", sd[p + hf + ".weight"])
        gate_up, down = sd[p + "mlp.experts.gate_up_proj"], sd[p + "mlp.experts.down_proj"]
        for name, arr in (("ffn_gate_exps", gate_up[:, :inter]), ("ffn_up_exps", gate_up[:, inter:]),
                          ("ffn_down_exps", down)):
            arr = np.ascontiguousarray(arr)
            if expert_type == "F32":
                w.add_tensor(f"blk.{i}.{name}.weight", arr)
            else:
                qt = gguf.GGMLQuantizationType[expert_type]
                w.add_tensor(f"blk.{i}.{name}.weight", gguf.quants.quantize(arr, qt), raw_dtype=qt)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.slow
def test_gguf_moe_packs_and_matches_transformers(tiny_models: dict[str, Tiny], tmp_path: Path) -> None:
    t = tiny_models["qwen3_moe"]
    src = tmp_path / "tiny-qwen3moe.gguf"
    _write_gguf(t, src)
    r = CliRunner().invoke(pack_main, ["pack", str(src), str(tmp_path / "packed"), "--no-progress"])
    assert r.exit_code == 0, r.output
    assert "packed qwen3_moe: 3 MoE layers x 8 experts" in r.output
    ours = {}
    for budget in (0, "unlimited"):
        got = compare_with_transformers(t.hf, tmp_path / "packed", budget, "GGUF (F32) pack")
        assert got.diff < 1e-4
        ours[budget] = got.tokens
    assert ours[0] == ours["unlimited"]


def test_quantised_gguf_experts_are_dequantised(tiny_models: dict[str, Tiny], tmp_path: Path) -> None:
    t = tiny_models["qwen3_moe"]
    src = tmp_path / "tiny-q8.gguf"
    _write_gguf(t, src, expert_type="Q8_0")
    pack(src, tmp_path / "packed", quant="none", progress=False)
    got = compare_with_transformers(t.hf, tmp_path / "packed", 0, "GGUF Q8_0 experts")
    assert 0 < got.diff < 0.05 * got.scale  # Q8_0 rounding, not a wrong tensor


def test_unsupported_gguf_architecture_is_refused(tiny_models: dict[str, Tiny], tmp_path: Path) -> None:
    src = tmp_path / "tiny.gguf"
    _write_gguf(tiny_models["qwen3_moe"], src, arch="dbrx")
    with pytest.raises(UnsupportedArchitecture, match=r"tiny\.gguf: GGUF architecture 'dbrx' cannot be packed"):
        pack(src, tmp_path / "packed", progress=False)


def test_dense_llama_gguf_is_refused_by_name(tmp_path: Path) -> None:
    """arch ``llama`` is Mixtral only with experts; a dense one gets pointed at Engine.open."""
    import gguf

    src = tmp_path / "dense.gguf"
    w = gguf.GGUFWriter(str(src), "llama")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((8, 4), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(UnsupportedArchitecture, match=r"dense\.gguf: GGUF architecture 'llama' without experts"):
        pack(src, tmp_path / "packed", progress=False)
