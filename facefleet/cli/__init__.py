"""The `facefleet` command: one typer app, one module per concern registering its commands."""

from __future__ import annotations

import typer

from facefleet.cli import (
    agent_cmds,
    budget_cmds,
    console_cmds,
    contract_cmds,
    demo_cmds,
    placement_cmds,
    scheduler_cmds,
    security_cmds,
    swap_cmds,
)
from facefleet.cli.error_boundary import GuardedGroup

app = typer.Typer(
    name="facefleet",
    help=(
        "Hybrid-cloud scheduling for GPU face-swap work. Private data stays on-prem, always; "
        "public work bursts to cloud spot GPUs within budget. Start with `facefleet up`."
    ),
    no_args_is_help=True,
    cls=GuardedGroup,
    rich_markup_mode=None,  # help texts are plain text: "[audit] path" must not be read as a markup tag
    pretty_exceptions_enable=False,
)


@app.callback()
def root(
    debug: bool = typer.Option(
        False, "--debug", envvar="FACEFLEET_DEBUG", help="Show the traceback of an unexpected error."
    ),
) -> None:
    """Hybrid-cloud scheduling for GPU face-swap work."""


for module in (
    demo_cmds,
    scheduler_cmds,
    agent_cmds,
    placement_cmds,
    budget_cmds,
    security_cmds,
    contract_cmds,
    console_cmds,
    swap_cmds,  # after agent_cmds: replaces its placeholder `swap`
):
    module.register(app)


if __name__ == "__main__":
    app()
