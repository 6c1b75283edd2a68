"""``local-engine demo-moe DIR``: a small random Qwen3-MoE checkpoint to try the streaming engine offline.

Writes what a Hugging Face MoE directory holds, without transformers and without the network:
``config.json``, ``model.safetensors`` (random weights, one shard), and a byte-level
BPE tokenizer trained in code on a few sentences (``tokenizer.json``, ``tokenizer_config.json``
with a ChatML chat template, ``generation_config.json``). ``local-engine pack DIR PACKED`` then
works on it as on a real checkpoint (docs/moe.md walks through demo-moe -> pack -> info ->
generate). The text it generates is noise: the weights are random.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import click

# A few sentences for the tokenizer's merges: any text encodes (byte-level), this only makes
# common English words one or two tokens instead of one per byte.
_CORPUS = [
    "What is the capital of France? The capital of France is Paris.",
    "A mixture of experts model reads only the experts each token needs from disk.",
    "Hello! How are you today? I am fine, thank you. Tell me a short story about a cat.",
    "The quick brown fox jumps over the lazy dog. Write a poem about the sea and the sky.",
    "system user assistant question answer summarise explain translate code data model",
]
SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
    "{% if not (loop.last and continue_final_message) %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@dataclass(frozen=True)
class DemoShape:
    """Defaults: 4 layers x 16 experts (top-4), ~13 MiB of fp32 experts; every width is a multiple of
    64, the default ``pack --group-size``."""

    layers: int = 4
    experts: int = 16
    top_k: int = 4
    hidden_size: int = 128
    moe_intermediate_size: int = 128
    heads: int = 4
    kv_heads: int = 2
    seed: int = 0


def build_tokenizer(vocab_size: int = 512) -> Any:
    """A byte-level BPE tokenizer (GPT-2 style) trained on ``_CORPUS``; deterministic."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIALS), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_CORPUS, trainer=trainer)
    return tok


def _config(shape: DemoShape, vocab: int, eos: int) -> dict[str, Any]:
    head_dim = shape.hidden_size // shape.heads
    return {
        "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "vocab_size": vocab,
        "hidden_size": shape.hidden_size, "intermediate_size": 2 * shape.hidden_size,
        "moe_intermediate_size": shape.moe_intermediate_size, "num_hidden_layers": shape.layers,
        "num_attention_heads": shape.heads, "num_key_value_heads": shape.kv_heads, "head_dim": head_dim,
        "num_experts": shape.experts, "num_experts_per_tok": shape.top_k, "norm_topk_prob": True,
        "decoder_sparse_step": 1, "mlp_only_layers": [], "hidden_act": "silu", "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0, "max_position_embeddings": 4096, "tie_word_embeddings": False,
        "bos_token_id": None, "eos_token_id": eos, "torch_dtype": "float32",
        "demo": {"writer": "local-engine demo-moe", **asdict(shape)},
    }


def write_demo_moe(dst: str | Path, shape: DemoShape = DemoShape(),
                   on_layer: Callable[[], None] | None = None) -> dict[str, Any]:
    """Write the checkpoint into ``dst`` (created; files already there are replaced). Returns its config."""
    import torch
    from safetensors.torch import save_file

    if shape.hidden_size % shape.heads or shape.heads % shape.kv_heads:
        raise click.BadParameter("hidden size must divide by heads, and heads by kv heads")
    if not 0 < shape.top_k <= shape.experts:
        raise click.BadParameter(f"top-k must be between 1 and the number of experts ({shape.experts})")
    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer()
    vocab = tok.get_vocab_size()
    eos = tok.token_to_id("<|im_end|>")
    cfg = _config(shape, vocab, eos)
    g = torch.Generator().manual_seed(shape.seed)
    H, Ie, hd = shape.hidden_size, shape.moe_intermediate_size, cfg["head_dim"]

    def w(out_f: int, in_f: int) -> torch.Tensor:
        # wider than the usual 1/sqrt(in) so greedy decoding is not decided by near-ties
        return torch.randn(out_f, in_f, generator=g) * (2.0 / in_f**0.5)

    t: dict[str, torch.Tensor] = {
        "model.embed_tokens.weight": torch.randn(vocab, H, generator=g),
        "model.norm.weight": torch.ones(H),
        "lm_head.weight": w(vocab, H),
    }
    for layer in range(shape.layers):
        p = f"model.layers.{layer}."
        t[p + "input_layernorm.weight"] = torch.ones(H)
        t[p + "post_attention_layernorm.weight"] = torch.ones(H)
        t[p + "self_attn.q_proj.weight"] = w(shape.heads * hd, H)
        t[p + "self_attn.k_proj.weight"] = w(shape.kv_heads * hd, H)
        t[p + "self_attn.v_proj.weight"] = w(shape.kv_heads * hd, H)
        t[p + "self_attn.o_proj.weight"] = w(H, shape.heads * hd)
        t[p + "self_attn.q_norm.weight"] = torch.ones(hd)
        t[p + "self_attn.k_norm.weight"] = torch.ones(hd)
        t[p + "mlp.gate.weight"] = w(shape.experts, H)
        for e in range(shape.experts):
            q = f"{p}mlp.experts.{e}."
            t[q + "gate_proj.weight"] = w(Ie, H)
            t[q + "up_proj.weight"] = w(Ie, H)
            t[q + "down_proj.weight"] = w(H, Ie)
        if on_layer is not None:
            on_layer()
    save_file(t, str(dst / "model.safetensors"), metadata={"format": "pt"})
    (dst / "config.json").write_text(json.dumps(cfg, indent=1))
    tok.save(str(dst / "tokenizer.json"))
    (dst / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "add_bos_token": False, "bos_token": None,
        "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "chat_template": CHAT_TEMPLATE,
    }, indent=1))
    (dst / "generation_config.json").write_text(json.dumps({"eos_token_id": [eos]}, indent=1))
    return cfg


@click.command("demo-moe")
@click.argument("dst", type=click.Path(file_okay=False))
@click.option("--layers", default=DemoShape.layers, show_default=True, type=click.IntRange(1, 64))
@click.option("--experts", default=DemoShape.experts, show_default=True, type=click.IntRange(1, 256))
@click.option("--top-k", default=DemoShape.top_k, show_default=True, type=click.IntRange(1, 64))
@click.option("--hidden-size", default=DemoShape.hidden_size, show_default=True, type=click.IntRange(8, 4096))
@click.option("--expert-size", "moe_intermediate_size", default=DemoShape.moe_intermediate_size, show_default=True,
              type=click.IntRange(8, 16384), help="Each expert's intermediate width.")
@click.option("--seed", default=DemoShape.seed, show_default=True, type=int)
@click.option("--no-progress", is_flag=True, help="Hide the progress bar.")
def demo_moe(dst: str, layers: int, experts: int, top_k: int, hidden_size: int, moe_intermediate_size: int,
             seed: int, no_progress: bool) -> None:
    """Write a small random Qwen3-MoE checkpoint with a tokenizer into DST (offline; no transformers).

    Then: local-engine pack DST PACKED; local-engine info PACKED; local-engine generate PACKED --chat hi.
    """
    shape = DemoShape(layers=layers, experts=experts, top_k=top_k, hidden_size=hidden_size,
                      moe_intermediate_size=moe_intermediate_size, seed=seed)
    bar = None
    if not no_progress:
        from tqdm import tqdm

        bar = tqdm(total=layers, unit="layer", desc=f"demo-moe -> {Path(dst).name}")
    try:
        cfg = write_demo_moe(dst, shape, on_layer=bar.update if bar is not None else None)
    finally:
        if bar is not None:
            bar.close()
    size = (Path(dst) / "model.safetensors").stat().st_size
    click.echo(f"wrote qwen3_moe: {layers} layers x {experts} experts (top-{top_k}), hidden {hidden_size}, "
               f"vocab {cfg['vocab_size']}, {size / 2**20:.1f} MiB -> {dst}")
