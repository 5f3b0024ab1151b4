"""`python -m facefleet` is the `facefleet` command."""

from facefleet.cli import app

app(prog_name="facefleet")
