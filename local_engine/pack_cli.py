"""``local-engine pack`` (and a small ``moe-generate`` for packed MoE dirs).

The engine's click group adds these with ``main.add_command(pack)``; this module also runs on
its own: ``python -m local_engine.pack_cli pack SRC DST --quant int8``.
"""

from __future__ import annotations

import json
import sys

import click

from local_engine.cache import DEFAULT_POLICY, POLICIES
from local_engine.errors import PackError
from local_engine.formats.pack_quant import DENSE_METHODS, QUANT_METHODS
from local_engine.formats.pack_writer import pack as pack_dir
from local_engine.models.moe import MoEModel


@click.command("pack")
@click.argument("src", type=click.Path(exists=True))
@click.argument("dst", type=click.Path(file_okay=False))
@click.option("--quant", type=click.Choice(QUANT_METHODS), default="none", show_default=True,
              help="Expert weights: lossless copy, per-group int8 / int4 with fp16 scales, or int2 "
                   "(asymmetric: fp16 scale and min per group).")
@click.option("--group-size", type=click.IntRange(min=1), default=64, show_default=True,
              help="Columns per quantisation group: must divide the hidden and expert widths "
                   "(even for int4, a multiple of 32 for int2).")
@click.option("--dense", type=click.Choice(DENSE_METHODS), default="f32", show_default=True,
              help="Resident matrices read every token (attention, shared experts, dense MLPs, vocab head): "
                   "lossless (source dtype), or GGUF Q8_0 (int8: within rounding of f32) / Q4_1 (int4) blocks "
                   "multiplied by the engine's integer kernel. Routers, norms and embeddings stay lossless.")
@click.option("--no-progress", is_flag=True, help="Hide the progress bar.")
def pack(src: str, dst: str, quant: str, group_size: int, dense: str, no_progress: bool) -> None:
    """Convert an MoE checkpoint SRC (HF safetensors dir, or an MoE GGUF file) into the flash layout in DST."""
    try:
        m = pack_dir(src, dst, quant=quant, group_size=group_size, progress=not no_progress, dense=dense)
    except PackError as e:
        raise click.ClickException(str(e)) from None
    click.echo(f"packed {m.arch}: {len(m.moe_layers)} MoE layers x {m.num_experts} experts, "
               f"bundle {m.stride} B, expert bank {m.expert_bank_bytes / 2**20:.1f} MiB, "
               f"resident {m.resident_bytes / 2**20:.1f} MiB (dense {m.dense}) -> {dst}")


@click.command("moe-generate")
@click.argument("packed", type=click.Path(exists=True, file_okay=False))
@click.option("--ids", required=True, help="Comma-separated prompt token ids.")
@click.option("--max-tokens", type=int, default=16, show_default=True)
@click.option("--memory-budget", default="0", show_default=True, help="Expert cache size, e.g. 512MiB; 0 streams all.")
@click.option("--policy", type=click.Choice(list(POLICIES)), default=DEFAULT_POLICY, show_default=True)
@click.option("--stats", is_flag=True, help="Print streaming stats as JSON on stderr.")
def moe_generate(packed: str, ids: str, max_tokens: int, memory_budget: str, policy: str, stats: bool) -> None:
    """Greedy decode from token ids on a packed MoE dir (no tokenizer needed)."""
    try:
        model = MoEModel.open(packed, memory_budget=memory_budget, policy=policy)
    except (PackError, ValueError) as e:
        raise click.ClickException(str(e)) from None
    try:
        out = list(model.generate_ids([int(x) for x in ids.split(",")], max_tokens))
        click.echo(",".join(map(str, out)))
        if stats:
            print(json.dumps(model.stats(), indent=1, default=str), file=sys.stderr)
    finally:
        model.close()


@click.group()
def main() -> None:
    """Standalone entry for the MoE packing tools."""


main.add_command(pack)
main.add_command(moe_generate)

if __name__ == "__main__":
    main()
