"""Cues a user would cite for why a request is hard or easy, each with its reason in words.

The fitted score (knn or heuristic) was learned on exam questions (MMLU, GSM8K): it has never seen
a greeting, a phone number, a request for a 300-line program or a proof asked in six words, and it
makes the mistakes a user notices at once (issue #21). Each cue here is something a user would
point at ("asks for a proof", "short factual question"); it moves the logit of the fitted score by a
fixed amount, so a request with no cue keeps its fitted score. The shipped thresholds are
calibrated on the combined score (`difficulty recalibrate`, `difficulty train`), so a cloud share
still means what its calibration says. The weights are in logit units, set on the dev half of
`benchmarks/data/difficulty/everyday.jsonl` (its README tells how the test half was used).

Pure functions of the request text and the turn count; no prompt text leaves this module, only
cue names and reasons.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from gateway.classify.difficulty.identifiers import mask_identifiers


@dataclass(frozen=True)
class Cue:
    name: str  # stable machine name (evidence key)
    reason: str  # what `explain` shows
    weight: float  # added to the logit of the fitted score


# The cues, by name: reason in words and logit shift.
CUES: dict[str, tuple[str, float]] = {
    "asks_for_proof": ("asks for a proof", 2.6),
    "asks_for_derivation": ("asks for a derivation or worked steps", 1.0),
    "advanced_maths": ("advanced maths (calculus, linear algebra, probability, recurrences)", 1.3),
    "asks_for_code": ("asks for code", 0.5),
    "large_program": ("asks for a substantial program (many parts, tests, concurrency)", 1.5),
    "debug_code": ("asks to find a bug in the code given", 0.7),
    "asks_for_plan": ("asks for a plan", 0.4),
    "several_constraints": ("several constraints to satisfy at once", 0.9),
    "many_constraints": ("many constraints to satisfy at once", 1.6),
    "asks_for_analysis": ("asks for analysis or judgement (compare, critique, rank, justify)", 0.8),
    "specialist_domain": ("specialist domain (law, medicine, regulation)", 1.0),
    "long_context": ("long document to work through", 0.3),
    "multi_turn_state": ("builds on earlier turns of the conversation", 0.8),
    "explanation": ("asks for an explanation", 0.5),
    "short_factual": ("short factual question", -1.2),
    "chit_chat": ("chit-chat", -2.0),
    "short_calculation": ("short calculation", -2.0),
    "short_edit": ("short rewrite, classification or extraction", -1.2),
    "short_lookup": ("a short question about the document given", -2.6),
    "identifiers_not_maths": ("digits are a phone number, id, date or address, not maths", -1.2),
}

# A prompt this long carries a document; its instruction is what comes before the first blank line.
DOCUMENT_CHARS = 1500
# "Short": an instruction of at most this many words.
SHORT_WORDS = 14
SHORT_CHARS = 220

_I = re.IGNORECASE


@dataclass(frozen=True)
class _Guarded:
    """A regex run only when the prompt has one of the words a match must contain: a dozen regex
    alternations over a 1 KB prompt cost ~0.6 ms, a set test on its words almost nothing."""

    triggers: frozenset[str]
    regex: re.Pattern[str]

    def search(self, text: str, words: frozenset[str]) -> bool:
        return not self.triggers.isdisjoint(words) and self.regex.search(text) is not None


def _words(spaced: str) -> frozenset[str]:
    return frozenset(spaced.split())


def _guard(triggers: str, pattern: str) -> _Guarded:
    return _Guarded(_words(triggers), re.compile(pattern, _I))


# "show that" asks for a proof when it opens the ask ("Show that…", "Can you show that…"), not in a
# story ("his report card needs to show that he received 80")
_PROOF = _guard("prove proof show demonstrate rigorous rigorously",
                r"\b(prove|proof|rigorous(?:ly)?)\b|(?:^|[.?!:;]\s+|\n|\b(?:please|you|and|then)\s+)"
                r"(?:show|demonstrate) that\b")
_DERIVE = _guard("derive derivation from show justify", r"\b(derive|derivation|from first principles|show (?:all |every |your |the )*"
                     r"(?:working|steps|substitutions?)|justify the bound)\b")
_ADV_MATHS = _guard(
    "integral integrate derivative differentiate eigen eigenvalue eigenvalues eigenvector eigenvectors matrix "
    "matrices diagonalise diagonalize recurrence taylor series convergence converge converges convergent "
    "probability expected markov variance limit differential ways permutation permutations combination "
    "combinations modulo integer polynomial logarithm asymptotic big-o",
    r"\b(integral|integrate|derivative|differentiate|eigen\w*|matri(?:x|ces)|diagonali[sz]e|recurrence|"
    r"taylor|series|convergen\w*|probability|expected (?:number|value)|markov|variance|limit of|"
    r"differential equation|how many ways|permutations?|combinations?|modulo|integer solutions|"
    r"polynomial|logarithm|asymptotic|big-o)\b")
_CODE_ASK = _guard(
    "write implement build create code develop generate",
    r"\b(write|implement|build|create|code|develop|generate)\b[^.?!\n]{0,80}?\b(function|class|script|program|"
    r"app|application|api|server|parser|interpreter|compiler|kernel|query|tests?|module|library|cli|bot|"
    r"cache|buffer|queue|service|tokenizer|one-liner)s?\b"
    r"|\b(implement|write|build|code)\b[^.?!\n]{0,120}?\bin (python|go|golang|rust|c|c\+\+|c#|java|javascript|"
    r"typescript|kotlin|swift|ruby|php|scala|haskell|sql|bash)\b")
_LARGE_PROGRAM = re.compile(
    r"\b(complete|full|entire|production[- ]ready|end-to-end|interpreter|compiler|tokenizer|distributed|"
    r"concurrent|concurrency|thread-safe|lock-free|memory ordering|raft|paxos|consensus|unit tests|"
    r"tests covering|with tests|include everything|cuda|kernel|simulated network)\b|\b\d{3,}\s*lines\b", _I)
_DEBUG = _guard("bug bugs deadlock deadlocks deadlocked deadlocking race crash crashes crashed crashing wrong broken "
                "fix leak", r"\b(bug|bugs|deadlock\w*|race condition|crash\w*|wrong|broken|fix|leak)\b")
_CODE_LINE = re.compile(r"^\s*(def |class |func |function |import |return\b|for\b|if\b|while\b|\}|.*[;{]\s*$)",
                        re.MULTILINE)
_PLAN = _words("plan planning schedule itinerary roadmap runbook checklist timeline milestone milestones "
               "agenda strategy phases")
_ANALYSIS = _guard(
    "critique compare evaluate assess rank reconcile justify trade-off trade-offs tradeoff tradeoffs threats root "
    "flag claims decide cite citing quote causal cluster urgent estimate",
    r"\b(critique|compare|evaluate|assess|rank|reconcile|justify|trade-?offs?|threats to validity|root cause|"
    r"flag|which claims|decide|cite|citing|quote|causal|cluster|most urgent|estimate)\b")
# "court" is left out: a basketball court is not law
_DOMAIN = _guard("gdpr icd-10 clause clauses statute convention liability jurisdiction diagnosis diagnoses "
                 "diagnosed diagnostic clinical medication medications dose discharge regulation article",
                 r"\b(gdpr|icd-10|clauses?|statute|convention|liability|jurisdiction|"
                 r"diagnos\w*|clinical|medication|dose|discharge|regulation|article \d+)\b")
_EXPLAIN = _guard("explain why how cause causes caused difference makes", r"\b(explain|why|how does|how do|causes? of|caused|difference between|what makes)\b")
_QUESTION_START = re.compile(r"^\s*(what|what's|whats|who|whom|when|where|which|how many|how much|how tall|"
                             r"how long|how old|how far|is|are|does|do|did|can|was|were)\b", _I)
_CHAT = re.compile(r"^\s*(hi|hello|hey|yo|thanks|thank you|thx|good (?:morning|night|evening|afternoon)|"
                   r"how are you|lol|haha|ok|okay|cool|bye|see you|happy birthday|tell me a joke|"
                   r"tell me a fun fact|i'm bored|im bored|what's your favou?rite|what do you think about|"
                   r"do you like|can you tell me something|write a (?:short )?(?:poem|haiku|limerick))\b", _I)
_EDIT = re.compile(
    r"\b(rewrite|rephrase|paraphrase|fix the grammar|correct the spelling|proofread|make (?:this|it) "
    r"(?:more|sound|less)|shorten|translate|capitali[sz]e|polite|friendlier|passive voice|"
    r"positive or negative|spam or not|which language|formal or informal|question or a statement|"
    r"sentiment|classify|label|extract|pull out|get the \w+ out|what's the \w+ in|what date|which city|"
    r"in this (?:sentence|message|text|forecast))\b", _I)
_DIGIT_OP = re.compile(r"\d\s*[-+*/x×÷^%]\s*\d|\d\s*%|\d\s+times\b|\bconvert\b|\bround\b", _I)
_NUMBER = re.compile(r"\d")
_STATE = re.compile(r"\b(i gave you|you said|as i said|above|earlier|previous|before|so far|keeping every|"
                    r"constraints? i (?:gave|mentioned))\b", _I)
_SEPARATOR_WORDS = _words("and each every exactly keep keeping without within must none")
_SEPARATOR_PHRASES = ("no more than", "at most", "at least", "under ")
_WORD = re.compile(r"\S+")
_LOWER_WORD = re.compile(r"[a-z][a-z0-9'-]*")
_SENTENCE = re.compile(r"(?<=[.?!])\s+|\n+")  # not at ':': a list after it belongs to its ask
_IMPERATIVE = re.compile(
    r"\s*(?:[-*\d.)]+\s*)?(?:please\s+)?(give|list|write|plan|create|build|design|make|include|keep|rewrite|"
    r"extract|classify|assign|compare|rank|add|use|say|explain|describe|identify|suggest|propose|draft|"
    r"translate|summari[sz]e|turn|convert|put|tag|sort|label|decide|find|read|outline|break|cover|"
    r"schedule|cut|preserve|resolve|note|cite|quote|show|implement|solve|compute|evaluate|critique)\b", _I)
_MODAL = re.compile(r"\b(must|should|has to|have to|needs? to|exactly|at most|at least|no more than|"
                    r"without|do not|don't)\b", _I)


def _requirements(instr: str) -> int:
    """Separators between requirements, counted in imperative sentences only ("Give the phases, a
    rollback plan, ..."): the commas of a story problem's narrative are not constraints."""
    return sum(_separators(sent) for sent in _SENTENCE.split(instr) if _IMPERATIVE.match(sent) or _MODAL.search(sent))


def _separators(sent: str) -> int:
    low = sent.lower()
    return (sent.count(",") + sent.count(";") + sum(1 for w in _LOWER_WORD.findall(low) if w in _SEPARATOR_WORDS)
            + sum(low.count(p) for p in _SEPARATOR_PHRASES))


def instruction_of(text: str) -> str:
    """The request's own words: for a prompt carrying a document, what precedes the first blank line."""
    if len(text) > DOCUMENT_CHARS:
        head = text.split("\n\n", 1)[0]
        if len(head) < len(text) // 2:
            return head
    return text


def detect(text: str, *, turns: int = 1) -> list[Cue]:
    """The cues present in the last user message `text` of a request with `turns` user turns."""
    found: list[str] = []
    instr = instruction_of(text)
    words = len(_WORD.findall(instr))
    vocab = frozenset(_LOWER_WORD.findall(instr.lower()))
    short = words <= SHORT_WORDS and len(instr) <= SHORT_CHARS and "\n" not in instr.strip()

    proof = _PROOF.search(instr, vocab)
    if proof:
        found.append("asks_for_proof")
    elif _DERIVE.search(instr, vocab):
        found.append("asks_for_derivation")
    if not proof and _ADV_MATHS.search(instr, vocab):
        found.append("advanced_maths")
    if _CODE_ASK.search(instr, vocab):
        found.append("large_program" if _LARGE_PROGRAM.search(instr) else "asks_for_code")
    if _DEBUG.search(instr, vocab) and len(_CODE_LINE.findall(text)) >= 3:  # the code scan costs more
        found.append("debug_code")
    if not _PLAN.isdisjoint(vocab):
        found.append("asks_for_plan")
    seps = _requirements(instr) if words >= 30 else 0
    if seps >= 10 and words >= 40:
        found.append("many_constraints")
    elif seps >= 5:
        found.append("several_constraints")
    if _ANALYSIS.search(instr, vocab):
        found.append("asks_for_analysis")
    if _DOMAIN.search(instr, vocab):
        found.append("specialist_domain")
    if turns >= 3 or (turns >= 2 and _STATE.search(instr)):
        found.append("multi_turn_state")
    hard_ask = bool(found)  # a long document alone does not make the ask hard: its instruction does
    document = len(text) > DOCUMENT_CHARS
    if document:
        found.append("long_context")
    explains = _EXPLAIN.search(instr, vocab)
    if not hard_ask and explains and not short:
        found.append("explanation")

    if short and not hard_ask and document:
        if _QUESTION_START.search(instr) or instr.rstrip().endswith("?"):
            found.append("short_lookup")
    elif short and not hard_ask and not explains:
        masked, idents = mask_identifiers(instr)
        if _CHAT.search(instr):
            found.append("chit_chat")
        elif idents:
            found.append("identifiers_not_maths")
        elif _NUMBER.search(masked) and _DIGIT_OP.search(masked):
            found.append("short_calculation")
        elif _EDIT.search(instr):
            found.append("short_edit")
        elif _QUESTION_START.search(instr) or instr.rstrip().endswith("?"):
            found.append("short_factual")
    elif not hard_ask and len(text) <= 2 * SHORT_CHARS and mask_identifiers(instr)[1]:
        found.append("identifiers_not_maths")
    return [Cue(n, *CUES[n]) for n in found]


def cue_shift(text: str, *, turns: int = 1) -> float:
    """The logit shift the cues of `text` add (training and calibration use it on bare prompts)."""
    return sum(c.weight for c in detect(text, turns=turns))


def reasons(cues: list[Cue], limit: int = 3) -> list[str]:
    """The strongest cues in words, strongest first."""
    return [c.reason for c in sorted(cues, key=lambda c: -abs(c.weight))[:limit]]
