"""The vault: which original value each placeholder (or surrogate) stands for.

One vault per request (or per conversation, when the client sends a conversation id), never
shared otherwise, guarded by a lock, and never printed: `repr()` shows counts only. Values live
in memory and die with the vault (the request, or the conversation's TTL); a conversation's vault
on a shared store (gateway/store/vaults.py) leaves the process only encrypted.
"""

from __future__ import annotations

import bisect
import copy
import random
import re
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, Literal, Self

from gateway.privacy.restore import StreamRestorer, TextRestorer
from gateway.privacy.surrogate import make_surrogate

Mode = Literal["placeholder", "surrogate"]


class Vault:
    def __init__(self, mode: Mode = "placeholder") -> None:
        self._mode: Mode = mode
        self._lock = threading.RLock()
        self._replacement: dict[str, str] = {}  # original -> what the cloud sees
        self._original: dict[str, str] = {}  # placeholder key (PERSON_1) or surrogate -> original
        self._type: dict[str, str] = {}  # original -> entity type
        self._next: dict[str, int] = {}
        # Surrogates are drawn from a per-vault random stream: nothing about them derives from values.
        self._rng = random.Random(secrets.randbits(64))
        self._pattern: re.Pattern[str] | None = None

    @property
    def mode(self) -> Mode:
        return self._mode

    @mode.setter
    def mode(self, mode: Mode) -> None:
        # Fixed once the first value is in: mixing placeholders and surrogates would break restore.
        with self._lock:
            if mode != self._mode and self._replacement:
                raise ValueError("cannot change the mode of a vault that already holds values")
            self._mode = mode

    # -- redaction side -------------------------------------------------------------------
    def replacement_for(self, entity_type: str, value: str) -> str:
        """The placeholder/surrogate for `value`; the same value always gets the same one."""
        with self._lock:
            existing = self._replacement.get(value)
            if existing is not None:
                return existing
            n = self._next.get(entity_type, 0) + 1
            self._next[entity_type] = n
            if self.mode == "surrogate":
                rep = make_surrogate(entity_type, n, self._rng)
                while rep in self._original or rep in self._replacement:
                    n += 1
                    rep = make_surrogate(entity_type, n, self._rng)
                key = rep
            else:
                key = f"{entity_type}_{n}"
                rep = f"<{key}>"
            self._replacement[value] = rep
            self._original[key] = value
            self._type[value] = entity_type
            self._pattern = None
            return rep

    def pseudonym_for_name(self, name: str) -> str:
        """An identifier-safe stand-in for a message's `name` field (`PERSON_2`, no brackets).

        "john_smith" reuses the number of "John Smith" when that person is already in the vault.
        """
        spoken = re.sub(r"[_\-.]+", " ", name).strip().casefold()
        with self._lock:
            same = (
                rep
                for value, rep in self._replacement.items()
                if self._type.get(value) == "PERSON" and value.casefold() in (spoken, name.casefold())
            )
            rep = next(same, None) or self.replacement_for("PERSON", name)
        if self._mode == "surrogate":
            return re.sub(r"[^A-Za-z0-9_-]+", "_", rep)
        return rep.strip("<>")

    def _matcher(self) -> tuple[re.Pattern[str], dict[str, str]] | None:
        """One pattern for all the vault's values (longest first), and value -> replacement."""
        with self._lock:
            if not self._replacement:
                return None
            if self._pattern is None:
                self._pattern = re.compile(
                    "|".join(_bounded(v) for v in sorted(self._replacement, key=len, reverse=True))
                )
            return self._pattern, dict(self._replacement)

    def redact_text(self, text: str) -> str:
        """Every occurrence (whole words) of every value in the vault replaced."""
        matcher = self._matcher()
        if matcher is None:
            return text
        pattern, table = matcher
        return pattern.sub(lambda m: table[m.group(0)], text)

    def redact_parts(self, texts: list[str]) -> list[str]:
        """A message's text parts redacted as `redact_text` does, and a value that runs across
        a boundary between parts replaced too: its placeholder goes where it starts, and the
        rest of it is cut from the parts that follow (neither half leaves)."""
        matcher = self._matcher()
        out = list(texts)
        if matcher is not None:
            pattern, table = matcher
            starts = [0]
            for t in texts:
                starts.append(starts[-1] + len(t))
            head_cut = [0] * len(texts)  # characters removed from a part's start
            tail: list[tuple[int, str] | None] = [None] * len(texts)  # (where, placeholder) ending a part
            for m in pattern.finditer("".join(texts)):
                first = bisect.bisect_right(starts, m.start()) - 1
                last = bisect.bisect_left(starts, m.end()) - 1
                if first == last:
                    continue  # inside one part: the per-part pass below replaces it
                tail[first] = (m.start() - starts[first], table[m.group(0)])
                for k in range(first + 1, last + 1):
                    head_cut[k] = min(len(texts[k]), m.end() - starts[k])
            for k, t in enumerate(texts):
                cut = tail[k]
                end, rep = cut if cut is not None else (len(t), "")
                out[k] = t[head_cut[k] : max(end, head_cut[k])] + rep
        # Per part: a part's edge is a word boundary there ("Ann" ending one part is a name).
        return [self.redact_text(t) for t in out]

    def __len__(self) -> int:
        with self._lock:
            return len(self._replacement)

    def counts_by_type(self) -> dict[str, int]:
        with self._lock:
            out: dict[str, int] = {}
            for t in self._type.values():
                out[t] = out.get(t, 0) + 1
            return out

    def __repr__(self) -> str:  # never the values
        return f"Vault(mode={self.mode}, redacted={len(self)}, types={self.counts_by_type()})"

    __str__ = __repr__

    def __reduce__(self) -> Any:
        raise TypeError("a Vault holds sensitive values and cannot be pickled or copied out of process")

    def to_state(self) -> dict[str, Any]:
        """Everything needed to rebuild the vault: for the encrypting shared store only."""
        with self._lock:
            return {"mode": self._mode, "replacement": dict(self._replacement), "original": dict(self._original),
                    "type": dict(self._type), "next": dict(self._next)}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> Vault:
        vault = cls(state["mode"])
        vault._replacement = dict(state["replacement"])
        vault._original = dict(state["original"])
        vault._type = dict(state["type"])
        vault._next = {k: int(v) for k, v in state["next"].items()}
        return vault

    # -- restoration side -----------------------------------------------------------------
    def _restorer(self, json_escape: bool) -> TextRestorer:
        with self._lock:
            table = dict(self._original)
        if self.mode == "surrogate":
            return TextRestorer(surrogates=table, json_escape=json_escape)
        return TextRestorer(placeholders=table, json_escape=json_escape)

    def restorers(self) -> tuple[TextRestorer, TextRestorer]:
        """(plain text, inside JSON strings): for restoring positions of another API's answers."""
        return self._restorer(False), self._restorer(True)

    def restore_text(self, text: str, *, json_escape: bool = False) -> str:
        return self._restorer(json_escape).restore(text)

    def restore_completion(self, completion: dict[str, Any]) -> dict[str, Any]:
        """A copy of a `chat.completion` dict with content and tool-call arguments restored."""
        if not self._original:
            return completion
        text_r, args_r = self._restorer(False), self._restorer(True)
        out = dict(completion)
        choices = []
        for choice in completion.get("choices") or []:
            msg = choice.get("message") if isinstance(choice, dict) else None
            if not isinstance(msg, dict):
                choices.append(choice)
                continue
            new_msg = dict(msg)
            for field in ("content", "reasoning_content", "refusal"):
                if isinstance(msg.get(field), str):
                    new_msg[field] = text_r.restore(msg[field])
            if isinstance(msg.get("tool_calls"), list):
                new_msg["tool_calls"] = [_restore_call(c, args_r.restore) for c in msg["tool_calls"]]
            if isinstance(msg.get("function_call"), dict):
                new_msg["function_call"] = _restore_fn(msg["function_call"], args_r.restore)
            choices.append(dict(choice, message=new_msg))
        out["choices"] = choices
        return out

    def stream_restorer(self) -> StreamRestorer:
        """Restores `chat.completion.chunk` dicts as they arrive (see StreamRestorer)."""
        return StreamRestorer(self._restorer(False), self._restorer(True))


def _bounded(value: str) -> str:
    # Whole words only where the value starts/ends with a word character: "Ann" not in "Annual".
    pre = r"(?<!\w)" if value[:1].isalnum() or value[:1] == "_" else ""
    post = r"(?!\w)" if value[-1:].isalnum() or value[-1:] == "_" else ""
    return pre + re.escape(value) + post


def _restore_fn(fn: Any, restore: Callable[[str], str]) -> Any:
    if isinstance(fn, dict) and isinstance(fn.get("arguments"), str):
        return dict(fn, arguments=restore(fn["arguments"]))
    return fn


def _restore_call(call: Any, restore: Callable[[str], str]) -> Any:
    if isinstance(call, dict) and isinstance(call.get("function"), dict):
        return dict(call, function=_restore_fn(call["function"], restore))
    return call


class VaultStore:
    """Conversation-scoped vaults keyed by a client-supplied id, expiring `ttl_s` after last use.

    `get(None)` is a fresh per-request vault. Bounded: beyond `max_conversations` the least
    recently used conversation is dropped.
    """

    def __init__(
        self,
        ttl_s: float,
        *,
        mode: Mode = "placeholder",
        max_conversations: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._ttl = ttl_s
        self._mode: Mode = mode
        self._max = max_conversations
        self._clock = clock
        self._lock = threading.Lock()
        self._vaults: OrderedDict[str, tuple[Vault, float]] = OrderedDict()

    def get(self, conversation_id: str | None) -> Vault:
        if not conversation_id:
            return Vault(self._mode)
        now = self._clock()
        with self._lock:
            self._expire(now)
            entry = self._vaults.pop(conversation_id, None)
            vault = entry[0] if entry is not None else Vault(self._mode)
            self._vaults[conversation_id] = (vault, now)
            while len(self._vaults) > self._max:
                self._vaults.popitem(last=False)
            return vault

    async def load(self, conversation_id: str | None) -> Vault:
        """The conversation's vault from wherever this store keeps it (raises
        gateway.store.StoreUnavailable when a shared store cannot answer)."""
        return self.get(conversation_id)

    async def save(self, conversation_id: str | None, vault: Vault) -> None:
        """Write back what this turn added; in memory the vault object is the stored one."""
        return None

    @property
    def ttl_s(self) -> float:
        return self._ttl

    def with_ttl(self, ttl_s: float) -> Self:
        """The same conversations (shared with this store, not copied) expiring `ttl_s` after last
        use: what a policy reload that changes `vault_ttl_s` swaps in."""
        other = copy.copy(self)
        other._ttl = ttl_s
        return other

    def _expire(self, now: float) -> None:
        # Entries are in last-use order: stop at the first one still alive.
        while self._vaults:
            key, (_, last) = next(iter(self._vaults.items()))
            if now - last <= self._ttl:
                break
            del self._vaults[key]

    def __len__(self) -> int:
        with self._lock:
            self._expire(self._clock())
            return len(self._vaults)

    def __repr__(self) -> str:
        return f"VaultStore(conversations={len(self)}, ttl_s={self._ttl})"
