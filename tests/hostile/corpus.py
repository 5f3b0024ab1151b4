"""The hostile-input corpus: strings and files an attacker or a careless user would feed facefleet.

Files live in tests/hostile/corpus/ (non-UTF-8, BOMs, deep nesting, NaN/inf, huge numbers, control
characters, markup, path escapes, an alias bomb, broken media, a damaged audit log); strings are
below. `hostile_text()` mixes both with hypothesis-generated text.
"""

from __future__ import annotations

from pathlib import Path

from hypothesis import strategies as st

CORPUS_DIR = Path(__file__).parent / "corpus"
CORPUS_FILES = sorted(CORPUS_DIR.iterdir())

STRINGS: tuple[str, ...] = (
    "",
    " ",
    "\t\n",
    "\x00",
    "nul\x00inside",
    "[/]",
    "[bold]bold[/bold]",
    "GDPR-142, see [/legal/gdpr] folder",
    "[link=file:///etc/passwd]x[/link]",
    ":warning: :thumbs_up:",
    "\x1b[2J\x1b[H",
    "\x1b]0;pwned\x07",
    "\x07\x08\x7f\x9b",
    "line1\nline2\r\nerror: fake",
    "\u202eevil\u202c",
    "\ufeffbom",
    "\u0301\u0301\u0301",
    "😀" * 50,
    "x" * 100_000,
    "../../etc/passwd",
    "../escaped",
    "/etc/passwd",
    "/",
    ".",
    "..",
    "~root",
    "file:///etc/passwd",
    "file:///../../etc/shadow",
    "s3://bucket/../../x",
    "http://169.254.169.254/latest/meta-data/",
    "C:\\Windows\\System32",
    "NaN",
    "nan",
    "inf",
    "-inf",
    "1e309",
    "-1",
    "0",
    "99999999999999999999999999",
    "0x41",
    "Film-X",
    "film-x\n",
    " film-x",
    "'; DROP TABLE tasks;--",
    "$(touch /tmp/facefleet-pwned)",
    "`id`",
    "%s%n%x",
    "{0}{1}",
    "${jndi:ldap://x}",
    "nosuch://x",
    "postgresql+psycopg://u:secret@127.0.0.1:1/db",
    "127.0.0.1:1",
    "[::1]:0",
    "-",
    "--help",
    "--json",
)

# Strings a client can put in a protobuf string field (valid UTF-8: no lone surrogates).
WIRE_STRINGS = STRINGS
# Strings that exist only on the command line (argv decoded with surrogateescape) or in files.
ARGV_ONLY_STRINGS = ("\ud800", "caf\udce9", "\udcff\udcfe")

NUMBERS: tuple[float, ...] = (0, -1, 1, 2**31 - 1, 2**31, 2**63 - 1, -(2**63), 1e308, float("nan"), float("inf"))


def hostile_text(wire: bool = False) -> st.SearchStrategy[str]:
    """A corpus string, or text hypothesis makes up (control characters included)."""
    corpus = WIRE_STRINGS if wire else STRINGS + ARGV_ONLY_STRINGS
    return st.one_of(st.sampled_from(corpus), st.text(max_size=40))


def hostile_path() -> st.SearchStrategy[str]:
    """A corpus file, a missing or escaping path, or a directory."""
    return st.one_of(
        st.sampled_from([str(path) for path in CORPUS_FILES]),
        st.sampled_from(["missing.yaml", "../../etc/passwd", "/etc/shadow", "/proc/self/mem", str(CORPUS_DIR), ""]),
    )
