"""One error boundary for every `facefleet` command.

Commands report the failures they expect with `output.fail` (one `error:` line, one `hint:` line,
exit 1). What still escapes a command ends here instead of in a traceback:
- usage errors (bad option values, unknown commands, `typer.BadParameter`): `error:` + `hint:`, exit 2;
- the operating system's refusals (missing file, permission, disk full): `error:` + `hint:`, exit 1;
- text that cannot be encoded (an argument holding undecodable bytes, sent where UTF-8 is required): exit 1;
- an expected failure raised below the command that carries its own `hint` (a database schema that
  this release cannot use, `scheduler.schema.SchemaMismatch`): `error:` + that hint, exit 1;
- anything else is a bug: `error: internal error ...` with a hint to rerun with `--debug`, exit 1.
`--debug` (or FACEFLEET_DEBUG=1) lets the exception through with its traceback.
"""

from __future__ import annotations

from typing import Any

import typer
from typer._click import Context  # typer >= 0.29 vendors click: its exceptions, not click's, reach here
from typer._click.exceptions import ClickException, NoArgsIsHelpError, UsageError
from typer.core import TyperGroup

from facefleet.cli.output import print_error, printable

INTERNAL_ERROR = "internal error"  # the words that mark a bug, never an expected failure (tests look for them)
DEBUG_HINT = "this is a bug in facefleet: rerun with --debug for the traceback and report it"


def describe_os_error(error: OSError) -> str:
    """`cannot use /x/y: No such file or directory` from an OSError, without its errno prefix."""
    where = f" {error.filename}" if error.filename is not None else ""
    return f"cannot use{where}: {error.strerror or error}"


class GuardedGroup(TyperGroup):
    """The root command group: turns exceptions that escape a command into `error:`/`hint:` lines."""

    def parse_args(self, ctx: Context, args: list[str]) -> list[str]:
        """The root's own options (`facefleet --bogus`) are parsed before `invoke`: same rule."""
        try:
            return super().parse_args(ctx, args)
        except NoArgsIsHelpError:
            raise
        except UsageError as error:
            print_error(error.format_message(), f"see `{ctx.command_path} --help`")
            raise typer.Exit(2) from None

    def invoke(self, ctx: Context) -> Any:
        try:
            return super().invoke(ctx)
        except (typer.Exit, typer.Abort, NoArgsIsHelpError):
            raise
        except UsageError as error:
            if ctx.params.get("debug"):
                raise
            command = error.ctx.command_path if error.ctx is not None else ctx.command_path
            print_error(error.format_message(), f"see `{command} --help`")
            raise typer.Exit(2) from None
        except ClickException:
            raise
        except Exception as error:
            if ctx.params.get("debug"):
                raise
            if isinstance(error, OSError):
                print_error(describe_os_error(error), "check the path, its permissions and free disk space")
            elif isinstance(getattr(error, "hint", None), str):
                print_error(str(error), error.hint)  # type: ignore[attr-defined]
            elif isinstance(error, UnicodeEncodeError):
                bad = printable(error.object[error.start : error.end])
                print_error(f"an argument holds {bad}, which is not UTF-8 text", "pass names and reasons as UTF-8 text")
            else:
                print_error(f"{INTERNAL_ERROR} ({type(error).__name__}: {error})", DEBUG_HINT)
            raise typer.Exit(1) from None
