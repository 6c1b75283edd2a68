"""The labelled routing data and its train / validation / test split.

The split is grouped: every MMLU subject lies wholly in one part, so validation and test scores
measure what happens on subjects the model never saw (the prompts held back from us are other
subjects). GSM8K is one source, so its prompts are spread over the parts in small hashed groups.
Assignment is a hash of the group name: deterministic, and independent of row order.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# Salt picked among 60 candidates only for part sizes (closest to 60/20/20 rows, GSM8K in every
# part), before any model was fitted: it is not tuned to scores.
SPLIT_SALT = "difficulty-split-v21"
# Share of groups in each part, by hash bucket (0..99): [0, 20) test, [20, 40) validation, rest train.
TEST_BUCKETS = 20
VAL_BUCKETS = 20


class DataError(ValueError):
    """The data file is missing or malformed; the message names the file and line."""


@dataclass(frozen=True)
class Example:
    prompt: str
    source: str
    weak_correct: bool
    strong_correct: bool

    @property
    def hard(self) -> bool:
        """"Hard" = the weak (local) model fails: the prompt is worth the cloud."""
        return not self.weak_correct


def load_examples(path: str | Path) -> list[Example]:
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{p}: no such data file")
    out: list[Example] = []
    with p.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
                out.append(
                    Example(
                        prompt=str(obj["prompt"]),
                        source=str(obj.get("source", "unknown")),
                        weak_correct=bool(obj["weak_correct"]),
                        strong_correct=bool(obj["strong_correct"]),
                    )
                )
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise DataError(
                    f"{p}:{lineno}: expected a JSON object with prompt, weak_correct, strong_correct ({exc})"
                ) from exc
    if not out:
        raise DataError(f"{p}: no examples")
    return out


def _h(text: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{SPLIT_SALT}:{text}".encode()).digest()[:8], "big")


def group_of(ex: Example) -> str:
    """The split unit: the MMLU subject, or a hashed tenth of a single-task source like GSM8K."""
    if ex.source.startswith("mmlu:"):
        return ex.source
    return f"{ex.source}#{_h(ex.prompt) % 10}"


def part_of(group: str) -> str:
    bucket = _h(group) % 100
    if bucket < TEST_BUCKETS:
        return "test"
    if bucket < TEST_BUCKETS + VAL_BUCKETS:
        return "val"
    return "train"


def split_indices(examples: Iterable[Example]) -> dict[str, np.ndarray]:
    parts: dict[str, list[int]] = {"train": [], "val": [], "test": []}
    for i, ex in enumerate(examples):
        parts[part_of(group_of(ex))].append(i)
    return {k: np.asarray(v, dtype=np.int64) for k, v in parts.items()}


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
