"""The insecure-code rules behind the `code_guard` shield: Python read as a syntax tree
(`ast`), other languages by regular expressions. Each rule has an id (what
`violation_type` names, after `code_guard:`), the CWE it stands for, and what to do
instead."""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Final


@dataclass(frozen=True)
class Rule:
    id: str
    cwe: str
    title: str
    instead: str  # what the user should do instead, for suggested_user_response


RULES: Final = {
    rule.id: rule
    for rule in (
        Rule(
            "eval-exec",
            "CWE-95",
            "code evaluated from a string that is not a constant",
            "parse the data instead (json.loads, ast.literal_eval) rather than evaluating it",
        ),
        Rule(
            "shell-injection",
            "CWE-78",
            "a command run through a shell",
            "pass the program and its arguments as a list (subprocess.run([...]) without "
            "shell=True; execve-style calls) so no shell interprets them",
        ),
        Rule(
            "unsafe-deserialization",
            "CWE-502",
            "deserialization that can run code from its input",
            "exchange data as JSON (or another format that cannot carry code)",
        ),
        Rule(
            "unsafe-yaml-load",
            "CWE-502",
            "yaml.load without a safe loader",
            "use yaml.safe_load (or Loader=yaml.SafeLoader)",
        ),
        Rule(
            "weak-hash",
            "CWE-328",
            "a broken hash function (MD5 or SHA-1)",
            "use hashlib.sha256 (or a password hash such as hashlib.scrypt for passwords)",
        ),
        Rule(
            "sql-injection",
            "CWE-89",
            "an SQL statement built from strings",
            "pass values as query parameters (cursor.execute(sql, params)) instead of "
            "formatting them into the statement",
        ),
        Rule(
            "hard-coded-secret",
            "CWE-798",
            "a credential written into the code",
            "read secrets from the environment or a secret store at run time",
        ),
        Rule(
            "remote-script-execution",
            "CWE-494",
            "a downloaded script piped into a shell",
            "download the script, verify it (checksum or signature), then run it",
        ),
        Rule(
            "destructive-command",
            "CWE-1188",
            "a recursive forced delete of a root or home directory",
            "delete only the specific paths meant, never / or ~",
        ),
        Rule(
            "buffer-overflow",
            "CWE-120",
            "a copy into a buffer without a bound (gets, strcpy, strcat, sprintf)",
            "use the bounded forms (fgets, snprintf, strncpy/strlcpy with the buffer's size)",
        ),
    )
}


@dataclass(frozen=True)
class Finding:
    rule: str  # a RULES key
    line: int  # 1-based, within the code it was found in
    what: str  # the construct, e.g. "pickle.loads"


# --- Python -------------------------------------------------------------------------------

_EVAL = frozenset({"eval", "exec", "compile", "builtins.eval", "builtins.exec"})
_SHELL_ALWAYS = frozenset(
    {
        "os.system",
        "os.popen",
        "subprocess.getoutput",
        "subprocess.getstatusoutput",
        "asyncio.create_subprocess_shell",
        "commands.getoutput",
    }
)
_SUBPROCESS = frozenset(
    {
        "subprocess.run",
        "subprocess.call",
        "subprocess.check_call",
        "subprocess.check_output",
        "subprocess.Popen",
    }
)
_DESERIALIZE = frozenset(
    {
        *(
            f"{module}.{name}"
            for module in ("pickle", "cPickle", "_pickle", "dill")
            for name in ("load", "loads", "Unpickler")
        ),
        "marshal.load",
        "marshal.loads",
        "shelve.open",
        "jsonpickle.decode",
        "pandas.read_pickle",
        "torch.load",
    }
)
_YAML_LOAD = frozenset({"yaml.load", "yaml.load_all"})
_YAML_UNSAFE = frozenset({"yaml.unsafe_load", "yaml.unsafe_load_all"})
_SAFE_LOADERS = frozenset({"SafeLoader", "CSafeLoader", "BaseLoader", "CBaseLoader"})
_WEAK_HASHES = frozenset({"md5", "sha1"})
_SQL_METHODS = frozenset({"execute", "executemany", "executescript", "raw"})
_SQL = re.compile(
    r"\b(select\s.+\sfrom|insert\s+into|update\s.+\sset|delete\s+from|drop\s+table|"
    r"create\s+table|alter\s+table|where\s)",
    re.IGNORECASE | re.DOTALL,
)
_SECRET_WORDS = frozenset({"password", "passwd", "pwd", "secret", "token", "apikey"})
_SECRET_KEYS = frozenset({"api", "secret", "access", "private", "auth", "signing"})


def python_findings(tree: ast.AST) -> list[Finding]:
    """Every rule broken in a parsed Python module, in line order."""
    visitor = _PythonRules(_aliases(tree))
    visitor.visit(tree)
    return sorted(visitor.findings, key=lambda f: f.line)


def _aliases(tree: ast.AST) -> dict[str, str]:
    """Local name -> what it was imported as (`import subprocess as sp`: sp -> subprocess;
    `from os import system`: system -> os.system)."""
    aliases: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                aliases[alias.asname or alias.name.split(".")[0]] = (
                    alias.name if alias.asname else alias.name.split(".")[0]
                )
        elif isinstance(node, ast.ImportFrom) and node.module:
            for alias in node.names:
                aliases[alias.asname or alias.name] = f"{node.module}.{alias.name}"
    return aliases


def _is_sql_string(node: ast.AST, tainted: set[str]) -> bool:
    """A statement put together from strings: an f-string, `+`, `%` or `.format` whose
    literal text reads as SQL; or a name such a string was assigned to."""
    if isinstance(node, ast.Name):
        return node.id in tainted
    if isinstance(node, ast.JoinedStr):
        if not any(isinstance(part, ast.FormattedValue) for part in node.values):
            return False
        return _reads_as_sql(node)
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add | ast.Mod):
        return _reads_as_sql(node)
    if (
        isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr == "format"
    ):
        return _reads_as_sql(node.func.value)
    return False


def _reads_as_sql(node: ast.AST) -> bool:
    text = " ".join(
        part.value
        for part in ast.walk(node)
        if isinstance(part, ast.Constant) and isinstance(part.value, str)
    )
    return bool(_SQL.search(text))


def _secret_name(name: str) -> bool:
    words = [
        w for w in re.split(r"[^a-z0-9]+", re.sub(r"([a-z])([A-Z])", r"\1_\2", name).lower()) if w
    ]
    if not words:
        return False
    last = words[-1]
    if last in _SECRET_WORDS:
        return True
    return last == "key" and len(words) > 1 and words[-2] in _SECRET_KEYS


def _secret_value(node: ast.AST | None) -> bool:
    if not (isinstance(node, ast.Constant) and isinstance(node.value, str)):
        return False
    value = node.value.strip()
    # Empty or placeholder values ("", "<your key>", "***", "...") are not secrets.
    return len(value) >= 4 and len(set(value)) > 1 and not value.startswith(("<", "{", "$"))


class _PythonRules(ast.NodeVisitor):
    def __init__(self, aliases: dict[str, str]) -> None:
        self.findings: list[Finding] = []
        self._aliases = aliases
        self._sql_names: set[str] = set()

    def _add(self, rule: str, node: ast.AST, what: str) -> None:
        self.findings.append(Finding(rule, getattr(node, "lineno", 1), what))

    def _name(self, node: ast.AST) -> str | None:
        if isinstance(node, ast.Name):
            return self._aliases.get(node.id, node.id)
        if isinstance(node, ast.Attribute):
            base = self._name(node.value)
            return f"{base}.{node.attr}" if base else None
        return None

    def visit_Assign(self, node: ast.Assign) -> None:
        for target in node.targets:
            self._assigned(target, node.value, node)
        self.generic_visit(node)

    def visit_AnnAssign(self, node: ast.AnnAssign) -> None:
        self._assigned(node.target, node.value, node)
        self.generic_visit(node)

    def _assigned(self, target: ast.AST, value: ast.AST | None, node: ast.AST) -> None:
        name = target.id if isinstance(target, ast.Name) else None
        if isinstance(target, ast.Attribute):
            name = target.attr
        if name is None:
            return
        if _secret_name(name) and _secret_value(value):
            self._add("hard-coded-secret", node, f"{name} = '...'")
        if value is not None and isinstance(target, ast.Name):
            if _is_sql_string(value, self._sql_names):
                self._sql_names.add(name)
            else:
                self._sql_names.discard(name)

    def visit_Dict(self, node: ast.Dict) -> None:
        for key, value in zip(node.keys, node.values, strict=True):
            if (
                isinstance(key, ast.Constant)
                and isinstance(key.value, str)
                and _secret_name(key.value)
                and _secret_value(value)
            ):
                self._add("hard-coded-secret", key, f"{key.value!r}: '...'")
        self.generic_visit(node)

    def visit_Call(self, node: ast.Call) -> None:
        name = self._name(node.func) or ""
        keywords = {k.arg: k.value for k in node.keywords if k.arg is not None}
        first = node.args[0] if node.args else None
        if name in _EVAL and first is not None and not isinstance(first, ast.Constant):
            self._add("eval-exec", node, f"{name}() of a non-constant")
        if name in _SHELL_ALWAYS:
            self._add("shell-injection", node, name)
        if name in _SUBPROCESS and _truthy(keywords.get("shell")):
            self._add("shell-injection", node, f"{name}(shell=True)")
        if name in _DESERIALIZE and not (
            name == "torch.load" and _truthy(keywords.get("weights_only"))
        ):
            self._add("unsafe-deserialization", node, name)
        if name in _YAML_UNSAFE:
            self._add("unsafe-yaml-load", node, name)
        if name in _YAML_LOAD:
            loader = keywords.get("Loader") or (node.args[1] if len(node.args) > 1 else None)
            loader_name = (self._name(loader) or "") if loader is not None else ""
            if loader_name.rsplit(".", 1)[-1] not in _SAFE_LOADERS:
                self._add("unsafe-yaml-load", node, f"{name} without SafeLoader")
        if not _falsy(keywords.get("usedforsecurity")):
            if name in {f"hashlib.{h}" for h in _WEAK_HASHES}:
                self._add("weak-hash", node, name)
            if (
                name == "hashlib.new"
                and isinstance(first, ast.Constant)
                and isinstance(first.value, str)
                and first.value.lower().replace("-", "") in _WEAK_HASHES
            ):
                self._add("weak-hash", node, f"hashlib.new({first.value!r})")
        if (
            isinstance(node.func, ast.Attribute)
            and node.func.attr in _SQL_METHODS
            and first is not None
            and _is_sql_string(first, self._sql_names)
        ):
            self._add("sql-injection", node, f".{node.func.attr}() of a built string")
        for keyword, value in keywords.items():
            if _secret_name(keyword) and _secret_value(value):
                self._add("hard-coded-secret", node, f"{keyword}='...'")
        self.generic_visit(node)


def _truthy(node: ast.AST | None) -> bool:
    # shell=True, or shell=<anything not a false constant>: the caller cannot rule it out.
    return node is not None and not (isinstance(node, ast.Constant) and not node.value)


def _falsy(node: ast.AST | None) -> bool:
    return isinstance(node, ast.Constant) and node.value is False


# --- other languages ----------------------------------------------------------------------

# Language (a fence's label) -> its patterns. Code without a label gets them all.
_SHELL_LANGUAGES = frozenset({"sh", "bash", "shell", "zsh", "console", "shell-session"})
_JS_LANGUAGES = frozenset({"js", "javascript", "jsx", "ts", "typescript", "tsx", "node"})
_C_LANGUAGES = frozenset({"c", "cpp", "c++", "cc", "h", "hpp", "objc"})
_JAVA_LANGUAGES = frozenset({"java", "kotlin", "scala", "groovy"})


@dataclass(frozen=True)
class _Pattern:
    rule: str
    regex: re.Pattern[str]
    what: str
    languages: frozenset[str] | None  # None: every language


_PATTERNS: Final = (
    _Pattern(
        "remote-script-execution",
        re.compile(r"\b(curl|wget)\b[^\n|;]*\|\s*(sudo\s+)?(ba|z|k|da)?sh\b"),
        "a download piped into a shell",
        None,
    ),
    _Pattern(
        "destructive-command",
        re.compile(
            r"\brm\s+(-\S+\s+)*-[a-zA-Z]*(r[a-zA-Z]*f|f[a-zA-Z]*r)[a-zA-Z]*\s+(-\S+\s+)*"
            r"(--no-preserve-root\s+)?(/\*?|~/?|\$HOME/?)(?=\s|$|[;&|'\"])",
            re.IGNORECASE,
        ),
        "rm -rf of / or ~",
        None,
    ),
    _Pattern(
        "eval-exec",
        re.compile(
            r"(?<![\w.$])eval\s*\(|\bnew\s+Function\s*\(|\bset(Timeout|Interval)\s*\(\s*['\"`]"
        ),
        "JavaScript eval / new Function",
        _JS_LANGUAGES,
    ),
    _Pattern(
        "shell-injection",
        re.compile(r"\bRuntime\s*\.\s*getRuntime\s*\(\s*\)\s*\.\s*exec\s*\("),
        "Runtime.getRuntime().exec",
        _JAVA_LANGUAGES,
    ),
    _Pattern(
        "shell-injection",
        re.compile(r"\bchild_process\b[\s\S]*?\bexec(Sync)?\s*\(|(?<![\w.])execSync\s*\("),
        "child_process.exec",
        _JS_LANGUAGES,
    ),
    _Pattern(
        "shell-injection",
        re.compile(r"(?<![\w.>])(system|popen)\s*\("),
        "system() / popen()",
        _C_LANGUAGES,
    ),
    _Pattern(
        "buffer-overflow",
        re.compile(r"(?<![\w.>])(gets|strcpy|strcat|sprintf|vsprintf)\s*\("),
        "an unbounded buffer copy",
        _C_LANGUAGES,
    ),
    _Pattern(
        "hard-coded-secret",
        re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b"),
        "an AWS access key id",
        None,
    ),
    _Pattern(
        "hard-coded-secret",
        re.compile(r"-----BEGIN (RSA |EC |DSA |OPENSSH |ENCRYPTED )?PRIVATE KEY-----"),
        "a private key",
        None,
    ),
)

# Python that does not parse (a fragment, a typo): the main patterns, read as text.
_PYTHON_TEXT_PATTERNS: Final = (
    ("eval-exec", re.compile(r"(?<![\w.])(eval|exec)\s*\(\s*(?!['\"])"), "eval/exec"),
    ("shell-injection", re.compile(r"\bos\.(system|popen)\s*\(|\bshell\s*=\s*True\b"), "a shell"),
    (
        "unsafe-deserialization",
        re.compile(r"\b(c?pickle|marshal|dill)\.loads?\s*\("),
        "pickle/marshal load",
    ),
    ("weak-hash", re.compile(r"\bhashlib\.(md5|sha1)\s*\("), "hashlib.md5/sha1"),
)


def text_findings(code: str, language: str | None) -> Iterator[Finding]:
    """The regex rules for `language` (a fence's label, lower case; None: all of them)."""
    for pattern in _PATTERNS:
        if (
            language is not None
            and pattern.languages is not None
            and language not in pattern.languages
        ):
            continue
        for match in pattern.regex.finditer(code):
            yield Finding(pattern.rule, code.count("\n", 0, match.start()) + 1, pattern.what)


def python_text_findings(code: str) -> Iterator[Finding]:
    """Python that does not parse, judged by its text."""
    for rule, regex, what in _PYTHON_TEXT_PATTERNS:
        for match in regex.finditer(code):
            yield Finding(rule, code.count("\n", 0, match.start()) + 1, what)


PYTHON_LANGUAGES: Final = frozenset({"python", "py", "python3", "py3", "ipython", "pycon"})
KNOWN_LANGUAGES: Final = (
    PYTHON_LANGUAGES | _SHELL_LANGUAGES | _JS_LANGUAGES | _C_LANGUAGES | _JAVA_LANGUAGES
)
