"""GGUF MoE architectures for ``pack`` beyond qwen3moe: Mixtral (llama arch) and Qwen2-MoE.

Each tiny random transformers model is written to GGUF the way llama.cpp's ``convert_hf_to_gguf``
lays it out (Mixtral: arch ``llama``, q/k rows permuted by ``LlamaModel.permute``, experts stacked
into ``ffn_{gate,up,down}_exps`` or, the pre-2024 way, one tensor per expert; Qwen2-MoE: q/k/v
biases, ``*_shexp`` shared expert and its ``ffn_gate_inp_shexp`` gate, a dense layer as
``ffn_{gate,up,down}``), with a tokenizer in the metadata (SentencePiece ``llama`` / byte-level BPE
``gpt2``), packed, and checked against transformers (logits, greedy tokens) and through
``Engine.open(packed)`` (tokenizer identical to the dense engine's for the same GGUF, chat text).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
import torch
from click.testing import CliRunner

from local_engine.formats.pack_writer import pack
from local_engine.models.moe import MoEModel
from local_engine.pack_cli import main as pack_main
from tests.moe.conftest import GEN_STEPS, PROMPT, _config, compare_with_transformers

# --------------------------------------------------------------------------- tokenizers

SPM_PIECES = ["\u2581", "e", "h", "l", "o", "w", "r", "d", "t", "s", "\u2581h", "he", "ll", "\u2581he", "llo",
              "\u2581hello", "\u2581w", "or", "\u2581wor", "ld", "\u2581world", "[", "]", "/", "I", "N", "S", "T",
              "IN", "ST", "INST", "[INST", "[INST]", "\u2581[", "\u2581[/", "\u2581[/INST]"]
MIXTRAL_TEMPLATE = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}"
                    "{{ '[INST] ' + m['content'] + ' [/INST]' }}{% else %}{{ m['content'] + eos_token }}"
                    "{% endif %}{% endfor %}")
BPE_MERGES = ["\u0120 h", "h e", "\u0120h e", "l l", "ll o", "he llo", "\u0120he llo", "\u0120 w", "o r",
              "\u0120w or", "l d", "\u0120wor ld", "u s", "e r", "us er"]
BPE_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
SAMPLES = ["hello world", " hello  world\n", "héllo wörld ✓ 🌍", "<|im_start|>user\nhello<|im_end|>",
           "[INST] hello world [/INST]", "<s>hello</s>", ""]
MESSAGES = [{"role": "user", "content": "hello world"}]


def _spm_tokenizer(w: gguf.GGUFWriter) -> int:
    """Mixtral's kind: SentencePiece BPE with byte fallback, scores only (merges derived from them)."""
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + SPM_PIECES
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores([0.0] * (3 + 256) + [-float(i) for i in range(len(SPM_PIECES))])
    w.add_token_types([2, 3, 3] + [6] * 256 + [1] * len(SPM_PIECES))  # UNKNOWN, CONTROL, BYTE, NORMAL
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_add_bos_token(True)
    w.add_chat_template(MIXTRAL_TEMPLATE)
    return len(tokens)


def _bpe_tokenizer(w: gguf.GGUFWriter) -> int:
    """Qwen's kind: GPT-2 byte-level BPE (``qwen2`` pre-tokenizer), ChatML special tokens."""
    from tokenizers import pre_tokenizers

    tokens = sorted(pre_tokenizers.ByteLevel.alphabet())
    tokens += ["".join(m.split(" ")) for m in BPE_MERGES] + BPE_SPECIAL
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2")
    w.add_token_list(tokens)
    w.add_token_types([1] * (len(tokens) - len(BPE_SPECIAL)) + [3] * len(BPE_SPECIAL))
    w.add_token_merges(BPE_MERGES)
    w.add_bos_token_id(tokens.index("<|endoftext|>"))
    w.add_eos_token_id(tokens.index("<|im_end|>"))
    w.add_add_bos_token(False)
    w.add_chat_template(CHATML)
    return len(tokens)


# --------------------------------------------------------------------------- llama.cpp's layout

def _llama_permute(w: np.ndarray, n_head: int, n_head_kv: int | None = None) -> np.ndarray:
    """convert_hf_to_gguf's ``LlamaModel.permute`` (HF half-split RoPE -> interleaved pairs)."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _add(w: gguf.GGUFWriter, name: str, arr: np.ndarray, qtype: str = "F32") -> None:
    arr = np.ascontiguousarray(arr)
    if qtype == "F32":
        w.add_tensor(name, arr)
    else:  # as llama-quantize would store it
        qt = gguf.GGMLQuantizationType[qtype]
        w.add_tensor(name, gguf.quants.quantize(arr, qt), raw_dtype=qt)


def _write_gguf(hf: Any, path: Path, arch: str, tokenizer: Any, legacy_experts: bool = False,
                attn_type: str = "F32", expert_type: str = "F32", fuse_gate_up: bool = False) -> None:
    cfg = hf.config
    sd = {k: v.detach().float().numpy() for k, v in hf.state_dict().items()}
    n_head, n_kv = cfg.num_attention_heads, cfg.num_key_value_heads
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_kv)
    w.add_rope_freq_base(float(cfg.rope_parameters["rope_theta"]))
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_expert_used_count(cfg.num_experts_per_tok)
    w.add_vocab_size(cfg.vocab_size)
    if arch == "llama":
        w.add_expert_count(cfg.num_local_experts)
        w.add_rope_dimension_count(cfg.hidden_size // n_head)
        inter = cfg.intermediate_size
    else:
        w.add_expert_count(cfg.num_experts)
        w.add_expert_feed_forward_length(cfg.moe_intermediate_size)
        w.add_expert_shared_feed_forward_length(cfg.shared_expert_intermediate_size)
        inter = cfg.moe_intermediate_size
    tokenizer(w)
    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    w.add_tensor("output_norm.weight", sd["model.norm.weight"])
    w.add_tensor("output.weight", sd["lm_head.weight"])
    names = {"input_layernorm.weight": "attn_norm.weight", "self_attn.v_proj.weight": "attn_v.weight",
             "self_attn.o_proj.weight": "attn_output.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
             "mlp.gate.weight": "ffn_gate_inp.weight", "self_attn.q_proj.bias": "attn_q.bias",
             "self_attn.k_proj.bias": "attn_k.bias", "self_attn.v_proj.bias": "attn_v.bias",
             "mlp.shared_expert.gate_proj.weight": "ffn_gate_shexp.weight",
             "mlp.shared_expert.up_proj.weight": "ffn_up_shexp.weight",
             "mlp.shared_expert.down_proj.weight": "ffn_down_shexp.weight",
             "mlp.shared_expert_gate.weight": "ffn_gate_inp_shexp.weight",
             "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.up_proj.weight": "ffn_up.weight",
             "mlp.down_proj.weight": "ffn_down.weight"}
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        q, k = sd[p + "self_attn.q_proj.weight"], sd[p + "self_attn.k_proj.weight"]
        if arch == "llama":  # llama.cpp permutes q/k rows of llama-arch models (not qwen2moe)
            q, k = _llama_permute(q, n_head, n_head), _llama_permute(k, n_head, n_kv)
        _add(w, f"blk.{i}.attn_q.weight", q, attn_type)
        _add(w, f"blk.{i}.attn_k.weight", k, attn_type)
        for hf_name, gg in names.items():
            if p + hf_name in sd:
                _add(w, f"blk.{i}.{gg}", sd[p + hf_name], attn_type if gg.startswith("attn_output") else "F32")
        if p + "mlp.experts.gate_up_proj" not in sd:
            continue  # a dense (mlp_only) layer
        gate_up, down = sd[p + "mlp.experts.gate_up_proj"], sd[p + "mlp.experts.down_proj"]
        parts = {"gate": gate_up[:, :inter], "up": gate_up[:, inter:], "down": down}
        if fuse_gate_up:  # convert_hf_to_gguf --fuse-gate-up-exps: [E, 2I, H], gate rows first
            parts = {"gate_up": gate_up, "down": down}
        for part, arr in parts.items():
            if legacy_experts:  # pre-2024 llama.cpp: one 2-D tensor per expert
                for e in range(arr.shape[0]):
                    _add(w, f"blk.{i}.ffn_{part}.{e}.weight", arr[e], expert_type)
            else:
                _add(w, f"blk.{i}.ffn_{part}_exps.weight", arr, expert_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


# --------------------------------------------------------------------------- fixtures

ARCHS = {"mixtral": ("llama", _spm_tokenizer, 3 + 256 + len(SPM_PIECES)),
         "qwen2_moe": ("qwen2moe", _bpe_tokenizer, 256 + len(BPE_MERGES) + len(BPE_SPECIAL))}


class Built:
    def __init__(self, hf: Any, gguf_path: Path, packed: Path) -> None:
        self.hf, self.gguf, self.packed = hf, gguf_path, packed


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Built]:
    import transformers

    root = tmp_path_factory.mktemp("gguf-archs")
    out = {}
    for i, (name, (arch, tokenizer, vocab)) in enumerate(ARCHS.items()):
        torch.manual_seed(99 + i)
        cfg = _config(name)
        cfg.vocab_size = vocab  # the model's vocabulary is the tokenizer's
        hf = transformers.AutoModelForCausalLM.from_config(cfg).eval()
        with torch.no_grad():  # wider than the default init so greedy is not decided by ties
            for prm in hf.parameters():
                if prm.dim() >= 2:
                    prm.normal_(0.0, 0.15)
        src = root / f"tiny-{arch}.gguf"
        _write_gguf(hf, src, arch, tokenizer)
        r = CliRunner().invoke(pack_main, ["pack", str(src), str(root / name), "--no-progress"])
        assert r.exit_code == 0, r.output
        assert f"packed {name}: " in r.output
        out[name] = Built(hf, src, root / name)
    return out


def _hf_greedy(hf: Any, ids: list[int], n: int, stop: set[int] | None = None) -> list[int]:
    cur, out = list(ids), []
    with torch.no_grad():
        for _ in range(n):
            nxt = int(hf(torch.tensor([cur])).logits[0, -1].argmax())
            if stop and nxt in stop:
                break
            out.append(nxt)
            cur.append(nxt)
    return out


def _check_against_transformers(hf: Any, packed: Path, label: str) -> None:
    want = _hf_greedy(hf, PROMPT, GEN_STEPS)
    for budget in (0, "unlimited"):
        got = compare_with_transformers(hf, packed, budget, f"{label} GGUF pack")
        assert got.diff < 1e-4
        assert got.tokens == want


# --------------------------------------------------------------------------- tests

@pytest.mark.slow
def test_mixtral_gguf_matches_transformers(built: dict[str, Built]) -> None:
    b = built["mixtral"]
    model = MoEModel.open(b.packed, memory_budget=0)
    try:  # routed as Mixtral (softmax over all experts, top-k, renormalised), no dense layer
        assert model.arch == "mixtral" and model.config["num_local_experts"] == 8 and model.moe_layers == {0, 1, 2}
    finally:
        model.close()
    _check_against_transformers(b.hf, b.packed, "Mixtral (llama arch, q/k un-permuted)")


def test_mixtral_legacy_per_expert_gguf(built: dict[str, Built], tmp_path: Path) -> None:
    b = built["mixtral"]
    src = tmp_path / "tiny-legacy.gguf"
    _write_gguf(b.hf, src, "llama", _spm_tokenizer, legacy_experts=True)
    pack(src, tmp_path / "packed", progress=False)
    # the same bundles as the 3-D layout, byte for byte
    assert (tmp_path / "packed" / "experts.bin").read_bytes() == (b.packed / "experts.bin").read_bytes()
    _check_against_transformers(b.hf, tmp_path / "packed", "Mixtral legacy per-expert")


def test_quantised_mixtral_gguf(built: dict[str, Built], tmp_path: Path) -> None:
    """Q8_0 attention (q/k un-permuted after dequantisation) and BF16 experts (kept BF16)."""
    from local_engine.formats.pack import read_manifest

    b = built["mixtral"]
    src = tmp_path / "tiny-q8.gguf"
    _write_gguf(b.hf, src, "llama", _spm_tokenizer, attn_type="Q8_0", expert_type="BF16")
    pack(src, tmp_path / "packed", progress=False)
    assert {p.dtype for p in read_manifest(tmp_path / "packed").parts} == {"BF16"}
    got = compare_with_transformers(b.hf, tmp_path / "packed", 0, "Mixtral GGUF, Q8_0 attention + BF16 experts")
    assert 0 < got.diff < 0.05 * got.scale  # rounding, not a wrong (or still permuted) row


def test_qwen2moe_fused_gate_up_gguf(built: dict[str, Built], tmp_path: Path) -> None:
    b = built["qwen2_moe"]
    src = tmp_path / "tiny-fused.gguf"
    _write_gguf(b.hf, src, "qwen2moe", _bpe_tokenizer, fuse_gate_up=True)
    pack(src, tmp_path / "packed", progress=False)
    assert (tmp_path / "packed" / "experts.bin").read_bytes() == (b.packed / "experts.bin").read_bytes()


@pytest.mark.slow
def test_qwen2moe_gguf_matches_transformers(built: dict[str, Built]) -> None:
    b = built["qwen2_moe"]
    model = MoEModel.open(b.packed, memory_budget=0)
    try:  # shared expert, its gate, q/k/v biases and the dense layer 1 all came through
        assert model.arch == "qwen2_moe" and model.moe_layers == {0, 2}
        assert model.config["norm_topk_prob"] is False
        for name in ("model.layers.0.mlp.shared_expert.down_proj.weight", "model.layers.0.mlp.shared_expert_gate.weight",
                     "model.layers.2.self_attn.k_proj.bias", "model.layers.1.mlp.up_proj.weight"):
            assert torch.equal(model.w[name], b.hf.state_dict()[name].float()), name
    finally:
        model.close()
    _check_against_transformers(b.hf, b.packed, "Qwen2-MoE")


@pytest.mark.parametrize("name", list(ARCHS))
def test_packed_gguf_chats_with_its_own_tokenizer(built: dict[str, Built], name: str) -> None:
    """pack writes the GGUF's tokenizer; Engine.open(packed) tokenises exactly as the dense engine
    does from the same GGUF, renders the GGUF's chat template and answers in text."""
    from local_engine.engine import Engine
    from local_engine.store import GGUFStore
    from local_engine.tokenizer import from_gguf

    b = built[name]
    dense = from_gguf(GGUFStore(b.gguf))  # the reference: what Engine.open(model.gguf) would use
    eng = Engine.open(b.packed, memory_budget="unlimited")
    try:
        tok = eng.tokenizer
        for text in SAMPLES:
            assert tok.encode(text, add_special=True) == dense.encode(text, add_special=True), text
            ids = dense.encode(text)
            assert tok.decode(ids) == dense.decode(ids), text
        assert (tok.bos_id, tok.eos_id, tok.add_bos, tok.stop_ids) == (dense.bos_id, dense.eos_id, dense.add_bos,
                                                                       dense.stop_ids)
        assert tok.chat_template == dense.chat_template and eng.info()["chat_template"]
        prompt = eng.render_chat(MESSAGES)
        assert prompt.startswith("<s>[INST] hello world" if name == "mixtral" else "<|im_start|>user\nhello world")
        gen = eng.chat(MESSAGES, max_tokens=8, temperature=0)
        text = "".join(gen)
        want = _hf_greedy(b.hf, tok.encode(prompt), 8, stop=dense.stop_ids)
        print(f"{name}: prompt {prompt!r} -> {text!r} ({gen.stats.completion_tokens} tokens, {gen.finish_reason})")
        assert gen.stats.completion_tokens == len(want) > 0
        assert text == dense.decode(want)
    finally:
        eng.close()


def test_unconvertible_tokenizer_fails_before_writing(built: dict[str, Built], tmp_path: Path) -> None:
    from local_engine.errors import PackError

    def wordpiece(w: gguf.GGUFWriter) -> None:
        w.add_tokenizer_model("bert")
        w.add_token_list([f"w{i}" for i in range(ARCHS["mixtral"][2])])

    src = tmp_path / "tiny-bert-vocab.gguf"
    _write_gguf(built["mixtral"].hf, src, "llama", wordpiece)
    with pytest.raises(PackError, match=r"tiny-bert-vocab\.gguf: tokenizer cannot be converted: .*'bert'"):
        pack(src, tmp_path / "packed", progress=False)
    assert not (tmp_path / "packed").exists()
