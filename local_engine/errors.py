"""Engine error tree. Every message names the file (or model) and the problem in one line.

    EngineError
      ModelFileError          missing / unreadable / corrupt / truncated model file or directory
      UnsupportedModel        readable, but an architecture, tensor type or option we do not run
      PackError               a packed MoE directory (or a pack source) is missing, malformed,
                              truncated or corrupt (also a RuntimeError)
        UnsupportedArchitecture   a checkpoint whose MoE family we do not know how to route
      BudgetError             an expert-cache budget below what one layer needs (also a ValueError)
      ContextOverflow         a sequence longer than its KV cache holds (also a ValueError)

Callers catch ``EngineError`` for all of them; the second bases stay for code that caught the
built-in type before the tree existed.
"""

from __future__ import annotations

from pathlib import Path


class EngineError(Exception):
    """Base class: the CLI prints ``str(err)`` and exits 2; the gateway maps it to a BackendError."""


class ModelFileError(EngineError):
    def __init__(self, path: str | Path, problem: str) -> None:
        super().__init__(f"{path}: {problem}")
        self.path = str(path)
        self.problem = problem


class UnsupportedModel(EngineError):
    def __init__(self, path: str | Path, problem: str) -> None:
        super().__init__(f"{path}: unsupported: {problem}")
        self.path = str(path)
        self.problem = problem


class PackError(EngineError, RuntimeError):
    """A packed directory (or a pack source) is missing, malformed, truncated or corrupt."""


class UnsupportedArchitecture(PackError):
    """The checkpoint's architecture is not one of the MoE families we know how to route."""


class BudgetError(EngineError, ValueError):
    """The memory budget cannot hold what one layer must have resident at once."""


class ContextOverflow(EngineError, ValueError):
    """More tokens than the KV cache was allocated for."""
