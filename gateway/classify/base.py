"""The classifier seam: a classifier takes the request body and returns a finding with evidence.

Classifiers are synchronous and CPU-bound; the pipeline runs them in a worker thread under a
time budget, so an implementation never needs to know about asyncio. A classifier whose work is
trivially cheap (microseconds: no model) sets `runs_inline = True`; the pipeline then calls it on
the event loop and saves the thread hand-off, which costs more than the work itself.
"""

from __future__ import annotations

from typing import Any, Protocol

from gateway.features import DifficultyFinding, SensitivityFinding


class SensitivityClassifier(Protocol):
    runs_inline: bool  # cheap enough to run on the event loop (see above)

    def classify(self, body: dict[str, Any]) -> SensitivityFinding: ...


class DifficultyClassifier(Protocol):
    runs_inline: bool

    def classify(self, body: dict[str, Any]) -> DifficultyFinding: ...
