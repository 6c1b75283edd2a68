"""``local-engine`` command line: ``info MODEL`` and ``generate MODEL``.

MODEL is a GGUF file, an HF model directory, or ``builtin:smollm2-135m``. Other modules add
commands to the ``main`` group (``main.add_command(...)``). Bad input exits 2 with one line on
stderr naming the file and the problem.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from functools import wraps
from typing import Any

import click

from local_engine.cache import DEFAULT_POLICY, POLICIES
from local_engine.engine import Engine, resolve
from local_engine.errors import EngineError
from local_engine.formats.pack import MANIFEST, read_manifest


def _clean_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except EngineError as e:
            click.echo(f"local-engine: error: {e}", err=True)
            sys.exit(2)
        except (OSError, ValueError) as e:  # anything a loader failed to translate: still one line
            click.echo(f"local-engine: error: {type(e).__name__}: {e}", err=True)
            sys.exit(2)
    return wrapper


@click.group()
def main() -> None:
    """Run GGUF / Hugging Face models on the CPU."""


@main.command()
@click.argument("model")
@click.option("--weights", default="auto", show_default=True, help="auto | f32 | bf16 | int8")
@_clean_errors
def info(model: str, weights: str) -> None:
    """Print what MODEL is (architecture, sizes, weight representation) as JSON.

    A packed MoE dir is described from its manifest: no weights loaded, no tokenizer needed."""
    path = resolve(model)
    if (path / MANIFEST).is_file():
        info = read_manifest(path).describe()
    else:
        info = Engine.open(model, weights=weights).info()
    click.echo(json.dumps(info, indent=2, default=str))


@main.command()
@click.argument("model")
@click.option("--prompt", help="raw text prompt (no chat template)")
@click.option("--chat", "chat_text", help="a user message, wrapped in the model's chat template")
@click.option("--system", help="optional system message for --chat")
@click.option("--max-tokens", default=128, show_default=True, type=int)
@click.option("--temperature", default=0.0, show_default=True, type=float)
@click.option("--top-k", default=0, type=int)
@click.option("--top-p", default=1.0, type=float)
@click.option("--repetition-penalty", default=1.0, type=float)
@click.option("--seed", default=None, type=int)
@click.option("--stop", multiple=True, help="stop string (repeatable)")
@click.option("--threads", default=None, type=int, help="CPU threads (default: torch's)")
@click.option("--weights", default="auto", show_default=True, help="auto | f32 | bf16 | int8")
@click.option("--memory-budget", default=None,
              help="packed MoE dirs: expert cache size, e.g. 2GiB or 0 to stream every expert "
                   "(default: $LOCAL_ENGINE_MOE_BUDGET, else 2GiB)")
@click.option("--cache-policy", type=click.Choice(POLICIES), default=None,
              help=f"packed MoE dirs: expert cache eviction policy (default: {DEFAULT_POLICY})")
@click.option("--prefetch", type=click.Choice(["auto", "on", "off"]), default=None,
              help="packed MoE dirs: next-layer expert prefetch; auto (default) tries both while decoding "
                   "and keeps the faster")
@click.option("--speculative", type=click.Choice(["off", "prompt-lookup", "auto", "draft"]), default="off",
              show_default=True,
              help="speculative decoding (greedy output unchanged, sampling's distribution too): drafts from the "
                   "prompt and the text so far, verified in one forward; auto sizes each draft (0: none) from "
                   "measured costs and acceptance; draft: --draft-model drafts (a packed MoE without one drafts "
                   "itself with one expert per token)")
@click.option("--draft-model", default=None,
              help="a smaller model with the same tokenizer that drafts for --speculative draft / auto")
@click.option("--kv-dtype", type=click.Choice(["f32", "bf16", "int8", "int4"]), default="f32", show_default=True,
              help="KV cache storage: int8 is ~0.27x f32's bytes per token, int4 ~0.16x (local_engine/kv_cache.py)")
@click.option("--kv-max-tokens", type=click.IntRange(min=1), default=None,
              help="bound the KV cache to this many tokens (attention sinks + the latest ones, StreamingLLM): "
                   "memory stays flat and generation goes on past the context")
@click.option("--kv-sinks", type=click.IntRange(min=0), default=4, show_default=True,
              help="with --kv-max-tokens: the first tokens always kept")
@click.option("--standins", default=None, type=click.Path(exists=True, file_okay=False),
              help="packed MoE dirs: a pack of the same model with cheaper experts (pack --quant int2) whose "
                   "bundle stands in for a missed expert with a small router weight")
@click.option("--standin-below", default=0.1, show_default=True, type=click.FloatRange(0.0, 1.0),
              help="with --standins: the router weight under which a missed expert uses its stand-in")
@click.option("--stats", is_flag=True, help="print prefill/decode tok/s and peak RSS to stderr")
@_clean_errors
def generate(model: str, prompt: str | None, chat_text: str | None, system: str | None, max_tokens: int,
             temperature: float, top_k: int, top_p: float, repetition_penalty: float, seed: int | None,
             stop: tuple[str, ...], threads: int | None, weights: str, memory_budget: str | None,
             cache_policy: str | None, prefetch: str | None, speculative: str, draft_model: str | None, kv_dtype: str,
             kv_max_tokens: int | None, kv_sinks: int, standins: str | None, standin_below: float,
             stats: bool) -> None:
    """Generate text from MODEL, streamed to stdout."""
    if (prompt is None) == (chat_text is None):
        raise click.UsageError("give exactly one of --prompt or --chat")
    opts: dict[str, Any] = {"memory_budget": memory_budget} if memory_budget is not None else {}
    if cache_policy is not None:
        opts["policy"] = cache_policy
    if prefetch is not None:
        opts["prefetch"] = {"auto": "auto", "on": True, "off": False}[prefetch]
    opts["kv_cache"] = {"dtype": kv_dtype, "max_tokens": kv_max_tokens, "sinks": kv_sinks}
    if draft_model is not None:
        opts["draft_model"] = draft_model
    if standins is not None:
        opts.update(standins=standins, standin_below=standin_below)
    eng = Engine.open(model, threads=threads, weights=weights, **opts)
    sampling: dict[str, Any] = dict(max_tokens=max_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                                    repetition_penalty=repetition_penalty, seed=seed, stop=list(stop),
                                    speculative=speculative)
    if chat_text is not None:
        msgs = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": chat_text}]
        gen = eng.chat(msgs, **sampling)
    else:
        gen = eng.generate(prompt or "", **sampling)
    for delta in gen:
        click.echo(delta, nl=False)
        sys.stdout.flush()
    click.echo()
    if stats:
        s = gen.stats
        click.echo(f"prompt {s.prompt_tokens} tok, prefill {s.prefill_tok_s:.1f} tok/s | "
                   f"completion {s.completion_tokens} tok, decode {s.decode_tok_s:.1f} tok/s | "
                   f"peak RSS {s.peak_rss_mb:.0f} MB | finish {gen.finish_reason}", err=True)
        x = s.extra
        if x.get("spec_mode", "off") != "off":
            click.echo(f"speculative {x['spec_mode']}: drafted {x['spec_drafted']}, accepted {x['spec_accepted']} "
                       f"({x['spec_acceptance']:.0%}), {x['spec_tokens_per_forward']:.2f} tokens per forward", err=True)
        extra = {k: v for k, v in s.as_dict().items() if k not in (
            "prompt_tokens", "completion_tokens", "prefill_s", "decode_s", "prefill_tok_s", "decode_tok_s",
            "peak_rss_mb")}
        if extra:
            click.echo(json.dumps(extra, default=str), err=True)


from local_engine.pack_cli import pack as _pack  # noqa: E402  (MoE flash-layout packer, docs/moe.md)

main.add_command(_pack)

from local_engine.demo_moe import demo_moe as _demo_moe  # noqa: E402  (a small random MoE to try pack on)

main.add_command(_demo_moe)

if __name__ == "__main__":
    main()
