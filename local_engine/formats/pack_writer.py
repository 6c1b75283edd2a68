"""The pack writer: an MoE checkpoint (HF safetensors directory or GGUF MoE file) into the flash
layout (``formats/pack.py`` describes it), and ``redense``, a lossless pack's dense matrices re-stored.

The writer streams tensor by tensor from the source (``safe_open`` slices), so a model larger
than RAM can be packed: peak memory is about one expert plus one resident tensor.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from local_engine.errors import PackError
from local_engine.formats.gguf_moe import GGUFSource
from local_engine.formats.pack import (
    ALIGN,
    CHECKSUM,
    CHECKSUMS,
    EXPERTS_FILE,
    FORMAT_NAME,
    FORMAT_VERSION,
    MANIFEST,
    RESIDENT_ALIGN,
    RESIDENT_FILE,
    ArchSpec,
    Manifest,
    arch_spec,
    dtype_name,
    expert_dims,
    load_resident,
    moe_layers,
    num_experts,
    read_manifest,
)
from local_engine.formats.pack_quant import (
    DENSE_METHODS,
    DENSE_QTYPES,
    QUANT_METHODS,
    check_group_size,
    dense_quantisable,
    quantize,
    quantize_dense,
    quantize_int2,
)
from local_engine.formats.sources import PackSource, SafetensorsSource, copy_tokenizer_files


def _align(n: int, a: int) -> int:
    return (n + a - 1) // a * a


def _expert_tensors(srcv: PackSource, spec: ArchSpec, layer: int, e: int, inter: int
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    base = f"model.layers.{layer}.{spec.moe_prefix}.experts"
    per = f"{base}.{e}"
    if srcv.has(f"{per}.{spec.gate}.weight"):
        return (srcv.get(f"{per}.{spec.gate}.weight"), srcv.get(f"{per}.{spec.up}.weight"),
                srcv.get(f"{per}.{spec.down}.weight"))
    if srcv.has(f"{base}.gate_up_proj"):  # transformers-5 fused layout: [E, 2I, H], [E, H, I]
        gu = srcv.get_row(f"{base}.gate_up_proj", e)
        return gu[:inter], gu[inter:], srcv.get_row(f"{base}.down_proj", e)
    raise PackError(f"{srcv.src}: no expert tensors found for layer {layer} expert {e} (looked for {per}.*)")


def _is_expert_tensor(name: str, spec: ArchSpec) -> bool:
    return f".{spec.moe_prefix}.experts." in name


def _bundle_arrays(gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor, quant: str, group: int
                   ) -> list[tuple[str, torch.Tensor]]:
    gate_up = torch.cat([gate, up], dim=0).contiguous()
    down = down.contiguous()
    if quant == "none":
        return [("gate_up", gate_up), ("down", down)]
    if quant == "int2":
        arrays: list[tuple[str, torch.Tensor]] = []
        for name, w in (("gate_up", gate_up), ("down", down)):
            q, s, m = quantize_int2(w, group)
            arrays += [(name, q), (name + ".scale", s), (name + ".min", m)]
        return arrays
    q1, s1 = quantize(gate_up, quant, group)
    q2, s2 = quantize(down, quant, group)
    return [("gate_up", q1), ("gate_up.scale", s1), ("down", q2), ("down.scale", s2)]


def _tensor_bytes(t: torch.Tensor) -> bytes:
    t = t.contiguous()
    if t.numel() == 0:
        return b""
    return t.view(torch.uint8).numpy().tobytes() if t.dtype != torch.uint8 else t.numpy().tobytes()


def _write_resident(path: Path, names: list[str], get: Callable[[str], torch.Tensor], dense: str,
                    checksum_name: str, tick: Callable[[], None] = lambda: None) -> tuple[dict[str, Any], int]:
    """Write resident.bin from ``get(name)`` tensors, 64-byte aligned, the ``dense_quantisable`` ones
    as GGUF blocks when ``dense`` is int8 / int4; a tied vocab head read as blocks gets its own
    copy (the embedding stays lossless). Returns (the manifest's tensor entries, file size)."""
    names = list(names)
    tied = dense != "f32" and "lm_head.weight" not in names and "model.embed_tokens.weight" in names
    if tied:
        names.append("lm_head.weight")
    checksum = CHECKSUMS[checksum_name]
    meta: dict[str, Any] = {}
    with open(path, "wb") as f:
        off = 0
        for name in names:
            t = get("model.embed_tokens.weight" if tied and name == "lm_head.weight" else name)
            qtype = DENSE_QTYPES[dense] if dense != "f32" and dense_quantisable(name, t) else None
            data = _tensor_bytes(quantize_dense(t, dense) if qtype else t)
            pad = _align(off, RESIDENT_ALIGN) - off
            f.write(b"\0" * pad)
            off += pad
            f.write(data)
            meta[name] = {"offset": off, "nbytes": len(data), "shape": list(t.shape),
                          "dtype": "U8" if qtype else dtype_name(t.dtype), checksum_name: checksum(data)}
            if qtype:
                meta[name]["qtype"] = qtype
            off += len(data)
            tick()
    return meta, off


def open_source(src: str | os.PathLike[str]) -> PackSource:
    """What ``pack`` reads: a GGUF MoE file (``gguf_moe``) or an HF safetensors directory."""
    path = Path(src)
    if path.is_file() and path.suffix.lower() == ".gguf":
        return GGUFSource(path)
    return SafetensorsSource(path)


def pack(src: PackSource | str | os.PathLike[str], dst: str | os.PathLike[str], quant: str = "none",
         group_size: int = 64, progress: bool = True,
         on_progress: Callable[[int], None] | None = None, dense: str = "f32") -> Manifest:
    """Convert an opened source (``open_source``; a path is opened here) of an MoE checkpoint (HF
    safetensors directory or GGUF MoE file) into the flash layout (see module docstring).
    ``quant``: the experts; ``dense``: the resident matrices every token reads (``f32`` lossless,
    ``int8`` / ``int4`` GGUF blocks)."""
    if quant not in QUANT_METHODS:
        raise PackError(f"unknown quantisation {quant!r} (choose from {', '.join(QUANT_METHODS)})")
    if dense not in DENSE_METHODS:
        raise PackError(f"unknown dense format {dense!r} (choose from {', '.join(DENSE_METHODS)})")
    srcv = src if isinstance(src, PackSource) else open_source(src)
    dst = Path(dst)
    where = srcv.config_where
    cfg = srcv.config
    spec = arch_spec(cfg, where)
    hidden, inter = expert_dims(cfg)
    n_exp = num_experts(cfg)
    layers = [i for i, is_moe in enumerate(moe_layers(cfg)) if is_moe]
    if quant != "none":
        check_group_size(quant, group_size, {"hidden size": hidden, "expert intermediate size": inter})
    dst.mkdir(parents=True, exist_ok=True)

    resident_names = [k for k in srcv.where if not _is_expert_tensor(k, spec)]
    total = len(resident_names) + len(layers) * n_exp
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=total, unit="tensor", desc=f"pack {srcv.src.name} -> {dst.name} [{quant}]")

    def tick() -> None:
        if bar is not None:
            bar.update(1)
        if on_progress is not None:
            on_progress(1)

    # Resident tensors: one at a time (lossless, or the dense matrices as GGUF blocks).
    checksum = CHECKSUMS[CHECKSUM]
    res_meta, res_size = _write_resident(dst / RESIDENT_FILE, resident_names, srcv.get, dense, CHECKSUM, tick)

    # Expert bundles: fixed layout, so the first bundle defines parts/stride for all.
    parts: list[dict[str, Any]] | None = None
    stride = bundle_nbytes = 0
    crcs: list[int] = []
    with open(dst / EXPERTS_FILE, "wb") as f:
        for layer in layers:
            for e in range(n_exp):
                arrays = _bundle_arrays(*_expert_tensors(srcv, spec, layer, e, inter), quant, group_size)
                blobs = [_tensor_bytes(a) for _, a in arrays]
                if parts is None:
                    parts, rel = [], 0
                    for (pname, a), b in zip(arrays, blobs, strict=True):
                        rel = _align(rel, RESIDENT_ALIGN)
                        parts.append({"name": pname, "shape": list(a.shape), "dtype": dtype_name(a.dtype),
                                      "offset": rel, "nbytes": len(b)})
                        rel += len(b)
                    bundle_nbytes = rel
                    stride = _align(rel, ALIGN)
                bundle = bytearray(stride)
                for p, b in zip(parts, blobs, strict=True):
                    if len(b) != p["nbytes"]:
                        raise PackError(f"{srcv.src}: layer {layer} expert {e} has a different shape than expert 0")
                    bundle[p["offset"]:p["offset"] + len(b)] = b
                crcs.append(checksum(memoryview(bundle)[:bundle_nbytes]))
                f.write(bundle)
                tick()
    if bar is not None:
        bar.close()

    manifest = {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "checksum": CHECKSUM,
        "arch": spec.model_type,
        "config": cfg,
        "quant": {"method": quant, "group_size": group_size, "scale_dtype": "F16", "dense": dense},
        "alignment": ALIGN,
        "resident": {"file": RESIDENT_FILE, "file_nbytes": res_size, "tensors": res_meta},
        "experts": {
            "file": EXPERTS_FILE,
            "file_nbytes": len(crcs) * stride,
            "num_experts": n_exp,
            "layers": layers,
            "layer_slot": {str(layer): i for i, layer in enumerate(layers)},
            "hidden_size": hidden,
            "intermediate_size": inter,
            "stride": stride,
            "bundle_nbytes": bundle_nbytes,
            "parts": parts or [],
            CHECKSUM: crcs,
        },
    }
    srcv.write_tokenizer(dst)  # small: lets Engine.open(dst) tokenise and chat
    tmp = dst / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=1))
    os.replace(tmp, dst / MANIFEST)  # the manifest appears only once the data is complete
    return read_manifest(dst)


def redense(src: str | os.PathLike[str], dst: str | os.PathLike[str], dense: str) -> Manifest:
    """A copy of the lossless-dense pack ``src`` with its resident matrices stored as ``dense``
    (``pack(..., dense=...)`` gives the same bytes): only resident.bin and the manifest are
    written; experts.bin is hard-linked (copied where a link cannot be made), so trying a dense
    format on a large pack takes seconds, not a re-quantisation of every expert."""
    if dense not in DENSE_METHODS:
        raise PackError(f"unknown dense format {dense!r} (choose from {', '.join(DENSE_METHODS)})")
    m = read_manifest(src)
    if m.dense != "f32":
        raise PackError(f"{m.root}: its dense matrices are already {m.dense}: redense needs a lossless (f32) pack")
    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    tensors = load_resident(m)
    meta, size = _write_resident(dst / RESIDENT_FILE, list(tensors), tensors.__getitem__, dense, m.checksum)
    experts = dst / EXPERTS_FILE
    if experts.exists():
        experts.unlink()
    try:
        os.link(m.root / EXPERTS_FILE, experts)
    except OSError:
        shutil.copyfile(m.root / EXPERTS_FILE, experts)
    raw = json.loads(json.dumps(m.raw))
    raw["quant"]["dense"] = dense
    raw["resident"] = {**raw["resident"], "file_nbytes": size, "tensors": meta}
    copy_tokenizer_files(m.root, dst)
    tmp = dst / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(raw, indent=1))
    os.replace(tmp, dst / MANIFEST)
    return read_manifest(dst)
