"""Where the suite finds the labelled routing prompts: inside the repository, never beside it."""

from pathlib import Path

ROUTING_DATA = Path(__file__).resolve().parents[1] / "benchmarks" / "data" / "routing"
LABELLED_PROMPTS = ROUTING_DATA / "labelled_prompts.jsonl"
