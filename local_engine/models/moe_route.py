"""MoE routing, pure functions reproducing transformers exactly (Mixtral, Qwen2-MoE, Qwen3-MoE,
OLMoE), and which of a token's experts may be served by a low-bit stand-in."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from local_engine.formats.pack import ARCHS


def route_mixtral(router_logits: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax in fp32 -> top-k -> renormalise (always). Returns (weights [T,k], idx [T,k])."""
    probs = F.softmax(router_logits.float(), dim=-1)
    w, idx = torch.topk(probs, top_k, dim=-1)
    w = w / w.sum(dim=-1, keepdim=True)
    return w, idx


def route_qwen(router_logits: torch.Tensor, top_k: int, norm_topk_prob: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Qwen2-MoE / Qwen3-MoE / OLMoE: softmax fp32 -> top-k -> renormalise only if configured."""
    probs = F.softmax(router_logits, dtype=torch.float, dim=-1)
    w, idx = torch.topk(probs, top_k, dim=-1)
    if norm_topk_prob:
        w = w / w.sum(dim=-1, keepdim=True)
    return w.to(router_logits.dtype), idx


def router_for(config: dict[str, Any]) -> Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    k = int(config["num_experts_per_tok"])
    if ARCHS[config["model_type"]].renormalise:
        return lambda lg: route_mixtral(lg, k)
    norm = bool(config.get("norm_topk_prob", False))
    return lambda lg: route_qwen(lg, k, norm)


DEFAULT_STANDIN_BELOW = 0.1  # with top-8 routing a weight below 0.1 is under the mean share (0.125)


def standin_candidates(experts: list[int], weights: list[float], below: float) -> set[int]:
    """The experts of one token whose router weight (after top-k renormalisation where the model
    does it) is below ``below``: a miss of one of them is served by its low-bit stand-in rather
    than waited for (HOBBIT: an expert that contributes little is not worth a full-precision read)."""
    return {e for e, w in zip(experts, weights, strict=True) if w < below}
