"""The CLI's one output layer: rich tables for people, `--json` for machines, actionable errors.

Data is printed as text, never as markup: both consoles run with `markup=False` and `emoji=False`,
so a lock reason like "see [/legal] folder" or a record holding `[bold]` or `:warning:` prints
verbatim, in plain strings, table cells and titles alike. Control characters (an ESC sequence that
would repaint the terminal) and lone surrogates are shown as escapes (`\x1b`, `\ud800`), never sent
to the terminal. Styles go on our own words only, as `Text` spans built with `styled()` and joined
with `line()`.
"""

from __future__ import annotations

import json
import re
import sys
from typing import Any, NoReturn

import typer
from rich.console import Console
from rich.text import Text
from typer._click.globals import get_current_context

UNPRINTABLE = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\ud800-\udfff]")  # all but \t and \n


def printable(text: str) -> str:
    """`text` with control characters and lone surrogates written as Python escapes."""
    return UNPRINTABLE.sub(lambda found: ascii(found.group())[1:-1], text)


class TextConsole(Console):
    """A console for data: every string it renders (print arguments, table cells, titles) is text."""

    def __init__(self, **options: Any) -> None:
        super().__init__(markup=False, emoji=False, highlight=False, **options)

    def render_str(self, text: str, **options: Any) -> Text:
        return super().render_str(printable(text), **options)


console = TextConsole()
err_console = TextConsole(stderr=True, soft_wrap=True)  # an error or hint is one line, however long

JSON_OPTION = typer.Option(False, "--json", help="Print machine-readable JSON instead of a table.")


def styled(text: object, style: str) -> Text:
    """Our own word in a style, e.g. styled("PASS", "bold green"); the text is never parsed."""
    return Text(printable(str(text)), style=style)


def line(*parts: str | Text) -> Text:
    """Plain strings and styled spans joined into one line; strings stay literal text."""
    return Text.assemble(*(printable(part) if isinstance(part, str) else part for part in parts))


def print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")


def print_error(message: str, hint: str = "") -> None:
    """One `error:` line (the message may continue on indented lines) and one `hint:` line, on stderr.
    Without a hint of its own, the hint points at the running command's --help."""
    err_console.print(line(styled("error:", "bold red"), " ", message))
    err_console.print(line(styled("hint:", "yellow"), " ", hint or f"see `{_command_path()} --help`"))


def _command_path() -> str:
    context = get_current_context(silent=True)
    return context.command_path if context is not None else "facefleet"


def fail(message: str, hint: str = "", code: int = 1) -> NoReturn:
    """Print an error a person can act on and exit non-zero (1; 2 for usage errors)."""
    print_error(message, hint)
    raise typer.Exit(code)


def not_yet(command: str, issue: int) -> NoReturn:
    fail(f"`facefleet {command}` is not implemented yet (tracked in issue #{issue}).", code=2)
