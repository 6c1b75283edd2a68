"""The fitted `knn` artefact: a small .npz of arrays plus a JSON metadata file that names it.

The metadata carries the format version, the sha256 of the .npz (checked on load: a truncated or
edited artefact is refused, not half-used), the embedding settings it was fitted with, the signal
order, and the calibrated thresholds. Arrays only (allow_pickle=False): loading runs no code.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from gateway.classify.difficulty.calibrate import Calibration
from gateway.classify.difficulty.data import sha256_file
from gateway.classify.difficulty.signals import SIGNAL_NAMES

FORMAT_VERSION = 1
DATA_DIR = Path(__file__).resolve().parents[2] / "data"
# v2: static MiniLM word-piece embeddings (default). v1: the MiniLM transformer, kept for comparison
# and for anyone who prefers it (`artefact: gateway/data/difficulty-v1.json`, ~30 ms per request).
SHIPPED = DATA_DIR / "difficulty-v2.json"
SHIPPED_MINILM = DATA_DIR / "difficulty-v1.json"
ARRAYS = ("sig_mean", "sig_scale", "w_emb", "w_sig", "w_knn", "intercept", "protos", "proto_hard", "proto_n")


class ArtefactError(RuntimeError):
    """The artefact is missing, corrupt, or was fitted for something else; the message says which."""


@dataclass(frozen=True)
class Artefact:
    meta: dict[str, Any]
    arrays: dict[str, np.ndarray]
    path: Path

    @property
    def version(self) -> str:
        return f"{self.meta['name']}-v{self.meta['version']}"

    def thresholds(self, method: str) -> tuple[float, float] | None:
        cal = self.calibration(method)
        return (cal.medium, cal.hard) if cal else None

    def calibration(self, method: str) -> Calibration | None:
        """The calibration shipped for `method`: thresholds and (since 2026-12) score quantiles."""
        t = (self.meta.get("thresholds") or {}).get(method)
        return Calibration.from_dict(t, method, f"{self.path} ({method})") if t else None


def load_artefact(path: str | Path | None = None) -> Artefact:
    meta_path = Path(path) if path else SHIPPED
    if not meta_path.is_file():
        raise ArtefactError(f"{meta_path}: difficulty artefact not found")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ArtefactError(f"{meta_path}: unreadable artefact metadata ({exc})") from exc
    if meta.get("format") != FORMAT_VERSION:
        raise ArtefactError(f"{meta_path}: artefact format {meta.get('format')!r}, expected {FORMAT_VERSION}")
    if tuple(meta.get("signals", ())) != SIGNAL_NAMES:
        raise ArtefactError(f"{meta_path}: fitted on other signals {meta.get('signals')}; retrain it")
    npz = meta_path.parent / meta["arrays"]
    if not npz.is_file():
        raise ArtefactError(f"{npz}: artefact arrays not found")
    digest = sha256_file(npz)
    if digest != meta.get("sha256"):
        raise ArtefactError(f"{npz}: sha256 {digest[:12]}… does not match the metadata ({str(meta.get('sha256'))[:12]}…)")
    with np.load(npz, allow_pickle=False) as z:
        missing = [a for a in ARRAYS if a not in z.files]
        if missing:
            raise ArtefactError(f"{npz}: missing arrays {missing}")
        arrays = {a: np.asarray(z[a]) for a in ARRAYS}
    dim = int(meta["embedding"]["dim"])
    if arrays["w_emb"].shape != (dim,) or arrays["protos"].shape[1] != dim:
        raise ArtefactError(f"{npz}: arrays do not match embedding dim {dim}")
    return Artefact(meta=meta, arrays=arrays, path=meta_path)


def save_artefact(meta_path: Path, meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> Path:
    """Write the .npz next to the metadata and record its hash there."""
    meta_path.parent.mkdir(parents=True, exist_ok=True)
    npz = meta_path.with_suffix(".npz")
    with npz.open("wb") as fh:  # a file handle: np.savez would otherwise append ".npz" itself
        named: dict[str, Any] = {a: arrays[a] for a in ARRAYS}  # Any: the stub's allow_pickle keyword shares **kwds
        np.savez_compressed(fh, **named)
    meta = {**meta, "format": FORMAT_VERSION, "arrays": npz.name, "sha256": sha256_file(npz),
            "signals": list(SIGNAL_NAMES)}
    meta_path.write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    return meta_path


def update_thresholds(meta_path: Path, method: str, thresholds: dict[str, Any]) -> None:
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    meta.setdefault("thresholds", {})[method] = thresholds
    meta_path.write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n", encoding="utf-8")
