"""The model seam: what ``Engine`` (local_engine/engine.py) asks of any causal LM a loader builds.

``new_cache`` and ``forward`` are required. The rest is declared here with the answer of a model
that has nothing to add (no description, no counters, nothing held open), so the engine calls it
without probing. Capabilities only some models have (chunked prefill, batched decode, self-draft,
a fast verify, a memory report) stay small Protocols next to the code that uses them.
"""

from __future__ import annotations

import abc
from typing import Any

import torch


class CausalLM(abc.ABC):
    # The longest sequence a cache of this model holds (a loader's model sets its own).
    max_seq: int = 4096

    @abc.abstractmethod
    def new_cache(self) -> Any:
        """An empty KV cache for one sequence."""

    @abc.abstractmethod
    def forward(self, ids: torch.Tensor, cache: Any, last_only: bool = False) -> torch.Tensor:
        """Logits [T or 1, vocab] for ``ids`` [T] run after the tokens already in ``cache``,
        which it advances."""

    def describe(self) -> dict[str, Any]:
        """Merged into ``Engine.info()`` (architecture, sizes, weight representation)."""
        return {}

    def stats(self) -> dict[str, Any]:
        """Merged into each run's stats (e.g. a packed MoE's expert-cache hits)."""
        return {}

    def close(self) -> None:
        """Release what the model holds open (a packed MoE's expert file and reader threads)."""
        return None
