"""The credential formats a developer's prompt can carry, as one table of declarations.

Each row says what a token of that format looks like: its literal prefixes, then its body as a
sequence of literal pieces and random runs (alphabet, length), an optional checksum, and a
near-miss (prose that mentions the format without holding one, which must stay unredacted).
The matching regex and the test specimens are both derived from the same row, so the two
cannot drift apart; rows whose secret sits inside a larger structure (the password of a URL,
the key of a connection string, a PEM block) declare their regex and a specimen builder.

Reference data: gitleaks' published rule set (config/gitleaks.toml) and detect-secrets' plugins
for the prefixes, alphabets and lengths; nothing of either is imported at run time (one regex
per format behind a substring pre-check costs microseconds; detect-secrets' line-by-line
scanner and entropy plugins would not fit the +0.5 ms per KB budget).

A token whose shape matches a known format is a secret whatever it looks like: runs of one
character or the word EXAMPLE do not make it safe to send (a real token can look like that).
Only the generic, label-based rows (`password = ...`, a URL's password) skip values that are
placeholders or code (`${TOKEN}`, `os.environ["KEY"]`).
"""

from __future__ import annotations

import base64
import math
import random
import re
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field

# Body alphabets, as regex class contents (expanded to characters for specimens).
BASE62 = "A-Za-z0-9"
BASE64URL = "A-Za-z0-9_-"
BASE64 = "A-Za-z0-9+/"
HEX = "0-9a-f"
UPPER_ALNUM = "A-Z0-9"
DIGITS = "0-9"

_B = r"(?<![A-Za-z0-9_-])"  # start of a token: a secret is never the tail of a longer word
_E = r"(?![A-Za-z0-9_-])"


@dataclass(frozen=True)
class Run:
    """A run of random characters from `alphabet`, `low` to `high` long (`size` in specimens)."""

    alphabet: str
    low: int
    high: int | None = None  # None: exactly `low`
    size: int | None = None  # the specimen's length (default: `low`)

    def regex(self) -> str:
        high = self.low if self.high is None else self.high
        count = f"{{{self.low}}}" if high == self.low else f"{{{self.low},{high}}}"
        return f"[{self.alphabet}]{count}"

    def draw(self, rng: random.Random) -> str:
        chars = _expand(self.alphabet)
        return "".join(rng.choice(chars) for _ in range(self.size or self.low))


Piece = str | Run  # a literal, or a random run
Specimen = tuple[str, tuple[str, ...]]  # (text to embed, the values that must never leave)


@dataclass(frozen=True)
class CredentialFormat:
    name: str
    entity: str  # the placeholder type the cloud sees (<API_KEY_1>)
    prefixes: tuple[str, ...]
    body: tuple[Piece, ...]
    near_miss: str  # prose naming the format: must not be redacted
    checksum: str | None = None  # a key of CHECKSUMS: a valid one raises the score to 1.0
    # Structured rows: the full regex (group `group` is the secret) and a specimen builder.
    regex: str | None = None
    group: int | str = 0
    build: Callable[[random.Random], Specimen] | None = None
    flags: int = 0
    # The regex runs only when one of these substrings is in the text (default: the prefixes);
    # `any_case` compares them with the lower-cased text.
    needles: tuple[str, ...] = ()
    any_case: bool = False
    # Label rows: lower-case substrings one of which every match's label holds. The regex is
    # then tried only at the word starts of the identifier around each (GITHUB_TOKEN, db.password)
    # instead of at every position of the text: ~0.15 ms less per KB of technical prose.
    anchors: tuple[str, ...] = ()
    # A further test of a match (the generic rows: no placeholders, random-looking values).
    check: Callable[[re.Match[str]], bool] | None = None
    # Label-based (a value named by its label, not by its shape): loses to any shaped format.
    generic: bool = False
    score: float = 0.95
    notes: str = field(default="", compare=False)

    def pattern(self) -> str:
        if self.regex is not None:
            return self.regex
        prefixes = "|".join(re.escape(p) for p in sorted(self.prefixes, key=len, reverse=True))
        body = "".join(p.regex() if isinstance(p, Run) else re.escape(p) for p in self.body)
        return f"{_B}(?:{prefixes}){body}{_E}"

    def specimens(self, rng: random.Random) -> list[Specimen]:
        """One specimen per prefix (or the builder's one): random bodies, valid checksums."""
        if self.build is not None:
            return [self.build(rng)]
        out: list[tuple[str, tuple[str, ...]]] = []
        for prefix in self.prefixes:
            body = "".join(p.draw(rng) if isinstance(p, Run) else p for p in self.body)
            if self.checksum is not None:
                body = CHECKSUMS[self.checksum].complete(body)
            out.append((prefix + body, (prefix + body,)))
        return out


# -- checksums --------------------------------------------------------------------------------

_B62_DIGITS = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"


def _base62(n: int, width: int) -> str:
    out = ""
    while n:
        n, r = divmod(n, 62)
        out = _B62_DIGITS[r] + out
    return out.rjust(width, "0")


@dataclass(frozen=True)
class Checksum:
    valid: Callable[[str], bool]  # the token's body (after the prefix)
    complete: Callable[[str], str]  # a body with its checksum part replaced by a valid one


def _crc32_b62_valid(body: str) -> bool:
    # GitHub (2021) and npm tokens: 30 random base62 characters, then the CRC32 of those 30
    # in base62, 6 characters, zero-padded.
    return len(body) == 36 and _base62(zlib.crc32(body[:30].encode()), 6) == body[30:]


def _crc32_b62_complete(body: str) -> str:
    return body[:30] + _base62(zlib.crc32(body[:30].encode()), 6)


CHECKSUMS: dict[str, Checksum] = {"crc32_base62": Checksum(_crc32_b62_valid, _crc32_b62_complete)}


def checksum_ok(fmt: CredentialFormat, token: str) -> bool:
    if fmt.checksum is None:
        return False
    prefix = next((p for p in sorted(fmt.prefixes, key=len, reverse=True) if token.startswith(p)), "")
    return CHECKSUMS[fmt.checksum].valid(token[len(prefix):])


# -- checks of the generic rows ---------------------------------------------------------------

_PLACEHOLDER = re.compile(
    r"""^(?:[<$%{\[(*]|\{\{)"""  # <PASSWORD_1>, ${TOKEN}, $TOKEN, %TOKEN%, {{ token }}, ***
    r"""|^(?:none|null|nil|true|false|undefined|required|optional|string|str|bytes|int|secret|password|"""
    r"""changeme|redacted|hidden|masked|xxx+|\.\.\.+|your[_-].*|my[_-].*|<.*>)$""",
    re.IGNORECASE,
)
# os.environ["X"], getenv("X"), settings.API_KEY, config.get(...), self.token: code, not a value.
_CODE = re.compile(r"^[A-Za-z_][\w]*(?:\.[A-Za-z_]\w*)+(?:\(|\[|$)|^[A-Za-z_]\w*[(\[]")


def _is_reference(value: str) -> bool:
    # No letter or digit at all ("…", "***", "--"): an elision, not a value.
    return bool(_PLACEHOLDER.match(value) or _CODE.match(value)) or not any(c.isalnum() for c in value)


def entropy(value: str) -> float:
    """Shannon entropy in bits per character."""
    counts: dict[str, int] = {}
    for c in value:
        counts[c] = counts.get(c, 0) + 1
    n = len(value)
    return -sum(k / n * math.log2(k / n) for k in counts.values()) if n else 0.0


def looks_random(value: str) -> bool:
    """A machine-made value: long, letters mixed with digits or both cases, high entropy
    ("unused-without-clients" is words joined, not a key)."""
    lower, upper, digit = (bool(re.search(rx, value)) for rx in (r"[a-z]", r"[A-Z]", r"\d"))
    mixed = (digit and (lower or upper)) or (lower and upper)
    return len(value) >= 16 and mixed and entropy(value) >= 3.0


def _password_ok(m: re.Match[str]) -> bool:
    return not _is_reference(m.group("value"))


_PASSWORD_LABEL = re.compile(r"(?i)pass|pwd")


def _assignment_ok(m: re.Match[str]) -> bool:
    value = m.group("value")
    if _is_reference(value):
        return False
    # A password is a secret however it looks; a token, key or secret only when machine-made
    # ("token: generated by the server" is prose).
    return bool(_PASSWORD_LABEL.search(m.group("label"))) or looks_random(value)


_AWS_NEAR = 300


def _aws_secret_ok(m: re.Match[str]) -> bool:
    value, start, end = m.group(0), m.start(), m.end()
    # Random base64 of 40 characters has both cases (a git SHA-1 is lower-case hex), and it
    # counts only next to an AWS key id or the word aws (within a few lines).
    if not (re.search(r"[a-z]", value) and re.search(r"[A-Z]", value)):
        return False
    near = m.string[max(0, start - _AWS_NEAR) : end + _AWS_NEAR].lower()
    return any(n in near for n in ("akia", "asia", "aws"))


# -- specimen builders of the structured rows -------------------------------------------------


def _draw(rng: random.Random, alphabet: str, n: int) -> str:
    return Run(alphabet, n).draw(rng)


def _pem(rng: random.Random) -> Specimen:
    body = base64.b64encode(rng.randbytes(600)).decode()
    lines = "\n".join(body[i : i + 64] for i in range(0, len(body), 64))
    block = f"-----BEGIN RSA PRIVATE KEY-----\n{lines}\n-----END RSA PRIVATE KEY-----"
    return block, (block, *(body[i : i + 64] for i in range(0, len(body), 64)))


def _url_auth(rng: random.Random) -> Specimen:
    pw = _draw(rng, BASE62, 10) + "!x"
    return f"https://deploy:{pw}@git.internal.example/repo.git", (pw,)


def _db_url(rng: random.Random) -> Specimen:
    pw = _draw(rng, BASE62, 8) + "@" + _draw(rng, BASE62, 4)  # an @ inside the password
    return f"postgresql://app_user:{pw}@db.internal:5432/orders", (pw,)


def _db_keyvalue(rng: random.Random) -> Specimen:
    pw = _draw(rng, BASE62, 12)
    return f"Server=sql01.internal;Database=orders;User Id=app;Password={pw};Encrypt=true", (pw,)


def _azure(rng: random.Random) -> Specimen:
    key = base64.b64encode(rng.randbytes(64)).decode()  # 88 characters, "==" at the end
    text = f"DefaultEndpointsProtocol=https;AccountName=devstore1;AccountKey={key};EndpointSuffix=core.windows.net"
    return text, (key,)


def _aws_pair(rng: random.Random) -> Specimen:
    key_id = "AKIA" + _draw(rng, "A-Z2-7", 16)
    secret = _draw(rng, BASE64, 40)
    while not re.search(r"[a-z]", secret) or not re.search(r"[A-Z]", secret):
        secret = _draw(rng, BASE64, 40)
    return f"aws_access_key_id = {key_id}\nsecret: {secret}", (key_id, secret)


def _assignment(rng: random.Random) -> Specimen:
    value = _draw(rng, BASE62, 28)
    return f'API_TOKEN="{value}"', (value,)


def _basic_header(rng: random.Random) -> Specimen:
    creds = base64.b64encode(f"svc:{_draw(rng, BASE62, 14)}".encode()).decode()
    return f"Authorization: Basic {creds}", (creds,)


def _bearer(rng: random.Random) -> Specimen:
    token = _draw(rng, BASE64URL, 40)
    return f"Authorization: Bearer {token}", (token,)


# -- the table --------------------------------------------------------------------------------
# Order matters only between rows matching the very same span: the earlier row names it
# (Anthropic's sk-ant- before the generic sk- row).

# A line of a PEM body: base64, long, or short with a digit or +/= (a last line; not a word).
# Atomic: a full line matches both branches, and backtracking over that choice line by line
# would be exponential in the number of lines.
_PEM_LINE = r"(?>[A-Za-z0-9+/=]{16,}|[A-Za-z]*[0-9+/=][A-Za-z0-9+/=]*)"

_ASSIGNMENT_LABELS = (
    r"password|passwd|passphrase|pwd|pass|secret|client_secret|secret[_-]?key|token|access_token|"
    r"auth_token|refresh_token|api[_-]?token|api[_-]?key|apikey|access[_-]?key|aws_secret_access_key|"
    r"private[_-]?key|key"
)

CREDENTIAL_FORMATS: tuple[CredentialFormat, ...] = (
    CredentialFormat(
        "github_classic", "API_KEY", ("ghp_", "gho_", "ghu_", "ghs_", "ghr_"), (Run(BASE62, 36, 255, 30),),
        "Classic GitHub tokens start with ghp_ and the gh CLI keeps them in its hosts file.",
        checksum="crc32_base62",
        notes="30 random base62 + 6 base62 CRC32; GitHub may lengthen them, hence up to 255",
    ),
    CredentialFormat(
        "github_fine_grained", "API_KEY", ("github_pat_",), (Run(BASE62, 22), "_", Run(BASE62, 59)),
        "A fine-grained token (the github_pat_ kind) can be limited to a single repository.",
        regex=_B + r"github_pat_[A-Za-z0-9_]{40,255}" + _E,
    ),
    CredentialFormat(
        "gitlab", "API_KEY", ("glpat-", "gldt-", "glrt-", "glptt-", "glcbt-", "glsoat-", "glft-", "glimt-", "GR1348941"),
        (Run(BASE64URL, 20, 300),),
        "GitLab personal access tokens carry the glpat- prefix so that scanners can find them.",
        regex=_B + r"(?:glpat-|gldt-|glrt-|glptt-|glcbt-|glsoat-|glft-|glimt-|GR1348941)[A-Za-z0-9_-]{20,300}"
        r"(?:\.[A-Za-z0-9_-]+){0,2}" + _E,
    ),
    CredentialFormat(
        "slack_bot", "API_KEY", ("xoxb-",), (Run(DIGITS, 10, 13), "-", Run(DIGITS, 10, 13), "-", Run(BASE62, 24, 34)),
        "Slack issues a bot token, prefixed xoxb-, at install time.",
        regex=_B + r"xoxb-\d{8,13}-\d{8,13}-[A-Za-z0-9-]{20,40}" + _E,
    ),
    CredentialFormat(
        "slack_user", "API_KEY", ("xoxp-",),
        (Run(DIGITS, 10, 13), "-", Run(DIGITS, 10, 13), "-", Run(DIGITS, 10, 13), "-", Run(HEX, 32)),
        "User tokens from Slack look like xoxp- followed by numbers; never paste one here.",
        regex=_B + r"xox[poaesr]-(?:[A-Za-z0-9]+-){1,4}[A-Za-z0-9]{8,}" + _E,
        needles=("xoxp-", "xoxo-", "xoxa-", "xoxe-", "xoxs-", "xoxr-"),
    ),
    CredentialFormat(
        "slack_app", "API_KEY", ("xapp-",),
        (Run(DIGITS, 1), "-", Run(UPPER_ALNUM, 9, 12), "-", Run(DIGITS, 10, 13), "-", Run(HEX, 64)),
        "App-level Slack tokens begin with xapp- and are used for websockets.",
        regex=_B + r"xapp-\d-[A-Z0-9]+-\d+-[A-Za-z0-9]{16,}" + _E,
    ),
    CredentialFormat(
        "slack_webhook", "API_KEY", ("https://hooks.slack.com/services/",),
        ("T", Run(UPPER_ALNUM, 8, 12), "/B", Run(UPPER_ALNUM, 8, 12), "/", Run(BASE62, 24)),
        "Incoming webhooks post to hooks.slack.com/services/ followed by three IDs.",
        regex=r"https://hooks\.slack\.com/(?:services|workflows|triggers)/[A-Za-z0-9+/]{20,120}" + _E,
    ),
    CredentialFormat(
        "stripe_secret", "API_KEY", ("sk_live_", "sk_test_"), (Run(BASE62, 16, 247, 24),),
        "Stripe secret keys start with sk_live_ in live mode and sk_test_ in test mode.",
    ),
    CredentialFormat(
        "stripe_restricted", "API_KEY", ("rk_live_", "rk_test_"), (Run(BASE62, 16, 247, 24),),
        "Restricted keys (rk_live_) give a service only the permissions it needs.",
    ),
    CredentialFormat(
        "stripe_webhook", "API_KEY", ("whsec_",), (Run(BASE62, 24, 80, 32),),
        "Each webhook endpoint has a signing secret that begins with whsec_ in the dashboard.",
    ),
    CredentialFormat(
        "anthropic", "API_KEY", ("sk-ant-api03-", "sk-ant-admin01-"), (Run(BASE64URL, 20, 300, 95),),
        "Anthropic keys are prefixed sk-ant- and sent in the x-api-key header.",
        regex=_B + r"sk-ant-(?:[a-z]+\d*-)?[A-Za-z0-9_-]{20,300}" + _E,
        needles=("sk-ant-",),
    ),
    CredentialFormat(
        "openai", "API_KEY", ("sk-proj-", "sk-svcacct-", "sk-admin-", "sk-"), (Run(BASE64URL, 20, 300, 48),),
        "OpenAI keys start with sk- (project keys with sk-proj-); sk-learn-compatible estimators are not keys.",
        # Some stretch of 16 characters without a hyphen: "sk-learn-compatible-estimators" is prose.
        regex=_B + r"sk-(?=[A-Za-z0-9_-]{20})[A-Za-z0-9_-]*?[A-Za-z0-9_]{16}[A-Za-z0-9_-]*" + _E,
        needles=("sk-",),
    ),
    CredentialFormat(
        "google_api_key", "API_KEY", ("AIza",), (Run(BASE64URL, 35),),
        "Google API keys begin with AIza and are 39 characters long.",
    ),
    CredentialFormat(
        "google_oauth_client_secret", "API_KEY", ("GOCSPX-",), (Run(BASE64URL, 28, 40, 28),),
        "Google OAuth client secrets now start with GOCSPX- in the console.",
    ),
    CredentialFormat(
        "google_oauth_access_token", "API_KEY", ("ya29.",), (Run(BASE64URL, 30, 2048, 120),),
        "Short-lived Google access tokens start with ya29. and expire after an hour.",
    ),
    CredentialFormat(
        "aws_access_key_id", "AWS_ACCESS_KEY", ("AKIA", "ASIA", "ABIA", "ACCA", "AGPA", "AIDA", "AROA"),
        (Run(UPPER_ALNUM, 16),),
        "AWS access key ids begin with AKIA for long-term keys.",
    ),
    CredentialFormat(
        "aws_secret_access_key", "SECRET", (), (Run(BASE64, 40),),
        "The AWS secret access key is 40 characters; the console shows it only once.",
        # 40 characters of base64 are a secret only near an AWS key id or the word aws.
        regex=r"(?<![A-Za-z0-9/+=])[A-Za-z0-9/+]{40}(?![A-Za-z0-9/+=])",
        needles=("akia", "asia", "aws"), any_case=True, build=_aws_pair, check=_aws_secret_ok, score=0.9,
    ),
    CredentialFormat(
        "azure_storage_key", "API_KEY", (), (),
        "An Azure connection string names the AccountName and AccountKey of the storage account.",
        regex=r"(?:AccountKey|SharedAccessKey)=(?P<value>[A-Za-z0-9+/]{40,100}={0,2})", group="value",
        needles=("AccountKey=", "SharedAccessKey="), build=_azure,
    ),
    CredentialFormat(
        "twilio_api_key", "API_KEY", ("SK",), (Run(HEX, 32),),
        "Twilio API key SIDs start with SK; the SKU list is unrelated.",
        regex=r"(?<![A-Za-z0-9_-])SK[0-9a-fA-F]{32}" + _E,
    ),
    CredentialFormat(
        "sendgrid", "API_KEY", ("SG.",), (Run(BASE64URL, 22), ".", Run(BASE64URL, 43)),
        "sendgrid keys start with SG. followed by two base64 parts.",
    ),
    CredentialFormat(
        "npm", "API_KEY", ("npm_",), (Run(BASE62, 36, 36, 30),),
        "Automation tokens for npm start with npm_ since 2021.",
        checksum="crc32_base62",
    ),
    CredentialFormat(
        "pypi", "API_KEY", ("pypi-AgEIcHlwaS5vcmc", "pypi-AgENdGVzdC5weXBpLm9yZw"), (Run(BASE64URL, 50, 1000, 150),),
        "PyPI API tokens use the pypi- prefix and go in the password field of twine.",
    ),
    CredentialFormat(
        "huggingface", "API_KEY", ("hf_", "api_org_"), (Run(BASE62, 30, 64, 34),),
        "Hugging Face user access tokens start with hf_ and can be read-only.",
    ),
    CredentialFormat(
        "dockerhub", "API_KEY", ("dckr_pat_", "dckr_oat_"), (Run(BASE64URL, 20, 40, 27),),
        "Docker Hub personal access tokens start with dckr_pat_ when generated.",
    ),
    CredentialFormat(
        "jwt", "JWT", ("eyJ",),
        (Run(BASE64URL, 8, 2000, 36), ".eyJ", Run(BASE64URL, 8, 8000, 64), ".", Run(BASE64URL, 8, 1000, 43)),
        "A JWT has three base64url parts separated by dots; the header usually starts with eyJ.",
    ),
    CredentialFormat(
        "pem_private_key", "PRIVATE_KEY", (), (),
        "Paste the public key (BEGIN PUBLIC KEY) only: a PRIVATE KEY block must never be shared.",
        # The whole block; a block cut short (by a part boundary, or a truncated paste) up to
        # the end of its base64, and the base64 lines before an END line with no BEGIN.
        regex=(
            r"-----BEGIN (?:[A-Z0-9]+ )*PRIVATE KEY(?: BLOCK)?-----"
            r"(?:.*?-----END (?:[A-Z0-9]+ )*PRIVATE KEY(?: BLOCK)?-----"
            rf"|(?:[ \t]*\r?\n(?:[A-Za-z-]+: [^\n]*|{_PEM_LINE}))*)"
            # (at most 120 lines before END: an 8192-bit key has ~100; unbounded, every line start
            # of a long base64 blob would rescan the rest)
            rf"|(?:^{_PEM_LINE}[ \t]*\r?\n){{1,120}}-----END (?:[A-Z0-9]+ )*PRIVATE KEY(?: BLOCK)?-----"
        ),
        flags=re.DOTALL | re.MULTILINE, needles=("PRIVATE KEY",), build=_pem, score=1.0,
    ),
    CredentialFormat(
        "db_connection_url", "PASSWORD", (), (),
        "Connection strings like postgresql://host/db carry no password unless a user:password@ part is added.",
        regex=r"(?i)\b(?:postgres(?:ql)?|mysql|mariadb|mongodb(?:\+srv)?|redis|rediss|amqps?|mssql|sqlserver|"
        r"jdbc:[a-z]+|clickhouse|cockroachdb)://[^\s:/@]+:(?P<value>[^\s/]{1,256})@[^\s/@]+",
        group="value", needles=("://",), build=_db_url, check=_password_ok,
    ),
    CredentialFormat(
        "db_connection_keyvalue", "PASSWORD", (), (),
        "A SQL connection string lists the server, database and user id; keep the password in a vault.",
        regex=r"(?i)\b(?:server|data source|host|user id|uid)=[^;\n]*;(?:[^;\n]*;){0,8}?\s*(?:password|pwd)="
        r"(?P<value>[^;\s]{1,128})",
        group="value", needles=("password=", "pwd="), any_case=True, build=_db_keyvalue, check=_password_ok,
    ),
    CredentialFormat(
        "url_basic_auth", "PASSWORD", (), (),
        "Never put credentials in a URL: https://user:password@host ends up in logs.",
        regex=r"\b[a-z][a-z0-9+.-]*://[^\s:/@]+:(?P<value>[^\s/]{1,256})@[^\s/@]+",
        group="value", needles=("://",), build=_url_auth, check=_password_ok, generic=True,
    ),
    CredentialFormat(
        "http_basic_auth", "SECRET", (), (),
        "HTTP Basic authentication sends user:password base64-encoded in the Authorization header.",
        regex=r"(?i)\bauthorization[\"']?\s*[:=]?\s*[\"']?basic\s+(?P<value>[A-Za-z0-9+/]{8,}={0,2})",
        group="value", needles=("basic ",), any_case=True, build=_basic_header, generic=True,
    ),
    CredentialFormat(
        "bearer_token", "SECRET", (), (),
        "Send the bearer token in the Authorization header, never in the query string.",
        regex=r"(?i)\bbearer\s+(?P<value>[A-Za-z0-9._~+/-]{20,}=*)",
        group="value", needles=("bearer ",), any_case=True, build=_bearer, generic=True,
        check=lambda m: looks_random(m.group("value")) and not _is_reference(m.group("value")),
    ),
    CredentialFormat(
        "generic_assignment", "SECRET", (), (),
        "The token = the smallest unit a tokenizer emits; set api_key from the environment.",
        # The label may close a longer name (GITHUB_TOKEN, db.password); quotes may be escaped
        # (a JSON string inside a tool result).
        regex=rf"(?i)(?<![A-Za-z0-9])(?:[A-Za-z0-9]+[_.-]){{0,6}}(?P<label>{_ASSIGNMENT_LABELS})\b\\?[\"']?\s*[:=]\s*"
        r"\\?[\"']?(?P<value>[^\s\"',;\\]{6,})",
        group="value", needles=("pass", "pwd", "secret", "token", "key"), any_case=True,
        anchors=("pass", "pwd", "secret", "token", "key"),
        build=_assignment, check=_assignment_ok, generic=True, score=0.85,
    ),
)


def _expand(alphabet: str) -> str:
    out: list[str] = []
    i = 0
    while i < len(alphabet):
        if i + 2 < len(alphabet) and alphabet[i + 1] == "-":
            out.extend(chr(c) for c in range(ord(alphabet[i]), ord(alphabet[i + 2]) + 1))
            i += 3
        else:
            out.append(alphabet[i])
            i += 1
    return "".join(out)
