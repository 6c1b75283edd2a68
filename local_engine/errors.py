"""Engine error tree. Every message names the file (or model) and the problem in one line.

    EngineError
      ModelFileError      missing / unreadable / corrupt / truncated model file or directory
      UnsupportedModel    readable, but an architecture, tensor type or option we do not run
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
