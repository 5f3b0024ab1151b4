"""`facefleet proto ...`: the gRPC contract's generated stubs."""

from __future__ import annotations

import typer

from facefleet.cli.output import console, fail


def register(app: typer.Typer) -> None:
    proto = typer.Typer(help="The gRPC contract in proto/: regenerate or check the Python stubs.")
    app.add_typer(proto, name="proto")

    @proto.command("gen")
    def gen() -> None:
        """Regenerate facefleet/v1/*_pb2*.py from proto/facefleet/v1/*.proto."""
        from facefleet import contract

        for path in contract.generate():
            console.print(f"wrote {path.relative_to(contract.REPO_ROOT)}")

    @proto.command("check")
    def check() -> None:
        """Fail when the committed stubs differ from a fresh generation."""
        from facefleet import contract

        differing = contract.drift()
        if differing:
            fail(f"stubs out of date: {', '.join(differing)}", hint="run `facefleet proto gen` and commit")
        console.print("stubs match proto/")
