"""Cut the schema fragments the tests validate against out of the published OpenAPI documents.

    python tests/api/schemas/vendor.py OPENAI_OPENAPI_JSON ANTHROPIC_OPENAPI_JSON

Each fragment is `{"components": {"schemas": {...}}}` holding the named roots and every schema
they reach through `$ref`, copied unchanged, so `#/components/schemas/X` resolves inside it.
Run by hand when updating (PROVENANCE.md says from where); nothing is fetched at test time.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).parent
PREFIX = "#/components/schemas/"
ROOTS = {
    "openai.json": ("CreateChatCompletionResponse", "CreateChatCompletionStreamResponse", "Response",
                    "ResponseStreamEvent", "ErrorResponse", "CreateEmbeddingResponse"),
    "anthropic.json": ("Message", "MessageStreamEvent", "ErrorResponse"),
}


def _refs(node: Any) -> list[str]:
    if isinstance(node, dict):
        out = [node["$ref"][len(PREFIX):]] if isinstance(node.get("$ref"), str) and node["$ref"].startswith(PREFIX) else []
        return out + [r for v in node.values() for r in _refs(v)]
    if isinstance(node, list):
        return [r for v in node for r in _refs(v)]
    return []


def fragment(document: dict[str, Any], roots: tuple[str, ...]) -> dict[str, Any]:
    schemas = document["components"]["schemas"]
    keep: dict[str, Any] = {}
    todo = list(roots)
    while todo:
        name = todo.pop()
        if name not in keep:
            keep[name] = schemas[name]
            todo.extend(_refs(schemas[name]))
    return {"components": {"schemas": dict(sorted(keep.items()))}}


def main(openai_path: str, anthropic_path: str) -> None:
    for out, source in (("openai.json", openai_path), ("anthropic.json", anthropic_path)):
        document = json.loads(Path(source).read_text())
        (HERE / out).write_text(json.dumps(fragment(document, ROOTS[out]), indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":
    main(*sys.argv[1:3])
