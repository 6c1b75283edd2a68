"""Capitalised words in prompts that name no person, place or people, though NER says they do.

Prompts sent to an LLM gateway are full of them, and each false finding raises the request's
sensitivity: a policy that keeps sensitive prompts local would then keep coding questions away
from the model they were meant for. Three kinds are common enough to correct:
- technology names ("Docker Swarm" as PERSON, "React" as a place, "Pydantic" as a people);
- the imperative that opens a prompt ("Convert this JSON ..." tagged PERSON);
- a language named as a language ("translate into English", "learn Spanish or German"), where
  the nationality recognizers see a nationality.
Names that are also common personal names (Julia, Ruby, Jenkins, ...) are deliberately absent.
"""

from __future__ import annotations

import regex

TECH_TERMS = frozenset(
    ["python", "java", "javascript", "typescript", "golang", "go", "rust", "kotlin", "scala", "haskell", "clojure", "erlang", "perl", "php", "lua", "matlab", "fortran", "cobol", "pascal", "sql", "nosql", "graphql", "html", "css", "sass", "json", "yaml", "toml", "xml", "csv", "markdown", "latex", "bash", "zsh", "powershell", "linux", "unix", "ubuntu", "debian", "fedora", "centos", "macos", "windows", "android", "ios", "react", "angular", "vue", "svelte", "nextjs", "next.js", "nuxt", "node", "node.js", "nodejs", "deno", "bun", "express", "django", "flask", "fastapi", "pydantic", "sqlalchemy", "pandas", "numpy", "scipy", "matplotlib", "seaborn", "pytorch", "torch", "tensorflow", "keras", "jax", "sklearn", "scikit-learn", "huggingface", "transformers", "langchain", "llamaindex", "openai", "anthropic", "gemini", "chatgpt", "gpt", "claude", "llama", "mistral", "mixtral", "qwen", "copilot", "docker", "kubernetes", "k8s", "helm", "terraform", "ansible", "puppet", "nginx", "apache", "kafka", "rabbitmq", "redis", "memcached", "postgres", "postgresql", "mysql", "sqlite", "mongodb", "cassandra", "elasticsearch", "opensearch", "snowflake", "bigquery", "redshift", "databricks", "spark", "hadoop", "airflow", "dbt", "prometheus", "grafana", "datadog", "sentry", "git", "github", "gitlab", "bitbucket", "jira", "confluence", "slack", "notion", "figma", "vscode", "vim", "emacs", "intellij", "pycharm", "xcode", "webpack", "vite", "babel", "eslint", "prettier", "jest", "pytest", "junit", "maven", "gradle", "npm", "pip", "conda", "poetry", "cargo", "rustc", "gcc", "clang", "llvm", "cmake", "aws", "azure", "gcp", "lambda", "s3", "ec2", "cloudflare", "vercel", "netlify", "heroku", "firebase", "supabase", "stripe", "twilio", "oauth", "jwt", "http", "https", "rest", "grpc", "websocket", "tcp", "udp", "dns", "ssh", "ssl", "tls", "api", "sdk", "cli", "gui", "ui", "ux", "excel", "powerpoint", "word", "outlook", "sharepoint", "tableau", "powerbi", "salesforce", "sap", "oracle", "swarm", "compose"]
)

PROMPT_VERBS = frozenset(
    ["explain", "write", "convert", "summarize", "summarise", "translate", "list", "describe", "create", "generate", "refactor", "fix", "debug", "compare", "implement", "design", "draft", "rewrite", "optimize", "optimise", "improve", "analyze", "analyse", "calculate", "solve", "give", "tell", "show", "find", "make", "help", "suggest", "review", "check", "classify", "extract", "format", "outline", "plan", "provide", "define", "build", "add", "remove", "update", "simplify", "proofread", "edit", "correct", "answer", "compose", "evaluate", "identify", "recommend", "brainstorm", "paraphrase", "rephrase", "shorten", "expand", "prove", "derive", "compute", "estimate", "predict", "sort", "parse", "test", "run", "deploy", "install", "configure", "migrate", "document"]
)

LANGUAGES = frozenset(
    ["english", "french", "spanish", "german", "portuguese", "italian", "dutch", "russian", "chinese", "mandarin", "cantonese", "japanese", "korean", "arabic", "hindi", "urdu", "bengali", "punjabi", "tamil", "telugu", "turkish", "persian", "farsi", "greek", "hebrew", "polish", "czech", "slovak", "ukrainian", "romanian", "hungarian", "swedish", "norwegian", "danish", "finnish", "icelandic", "thai", "vietnamese", "indonesian", "malay", "tagalog", "filipino", "swahili", "latin"]
)

_LANGUAGE_CUE_BEFORE = regex.compile(
    r"(?i)\b(?:translat\w*|speak\w*|spoke\w*|learn\w*|stud(?:y|ying|ied)|teach\w*|fluent\w*|native|"
    r"language|languages|subtitles?|dub\w*|grammar|pronounc\w*)\b"
    r"[^.!?\n]{0,50}$|\b(?:in|into|to|from)[ \t]+$"
)
_LANGUAGE_CUE_AFTER = regex.compile(
    r"(?i)^[ \t]+(?:language|translation|speakers?|text|version|subtitles|grammar|words?|phrases?|"
    r"sentences?|dictionary|fluently|lessons?|class|course|teacher|tutor)\b"
)
_SENTENCE_START = regex.compile(r"(?:^|[.!?\n][\"')\]]*[ \t]*|^[ \t]*[-*>#]+[ \t]*)[ \t]*$")


def is_technical(name: str) -> bool:
    """Every word of the name is a technology name ("Docker Swarm", "React", "FastAPI")."""
    words = name.casefold().split()
    return bool(words) and all(w.strip(".,:;()") in TECH_TERMS for w in words)


def is_opening_verb(text: str, start: int, end: int) -> bool:
    """A one-word finding that is the imperative opening a sentence ("Convert this ...")."""
    word = text[start:end]
    return " " not in word and word.casefold() in PROMPT_VERBS and bool(_SENTENCE_START.search(text, max(0, start - 8), start))


def is_language_use(text: str, start: int, end: int) -> bool:
    """A language name used as a language: "into English", "learn Spanish or German"."""
    if text[start:end].casefold() not in LANGUAGES:
        return False
    return bool(
        _LANGUAGE_CUE_BEFORE.search(text, max(0, start - 60), start) or _LANGUAGE_CUE_AFTER.match(text[end : end + 20])
    )


def not_personal(text: str, start: int, end: int) -> bool:
    """The finding text[start:end] (a name, place or people per NER or a gazetteer) is none."""
    return is_technical(text[start:end]) or is_opening_verb(text, start, end) or is_language_use(text, start, end)
