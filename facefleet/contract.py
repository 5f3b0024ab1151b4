"""The gRPC contract: `proto/` is the source of truth; Python stubs live in `facefleet/v1/`.

Regenerate with `facefleet proto gen` (or `python -m facefleet.contract`). The committed stubs
are checked against a fresh generation by `tests/test_contract.py`, so drift fails CI.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = REPO_ROOT / "proto"
PROTO_FILES = ("types.proto", "scheduler.proto", "agent.proto", "admin.proto")


def generate(out_dir: Path = REPO_ROOT) -> list[Path]:
    """Run protoc (grpcio-tools) for every contract file; return the files written."""
    import grpc_tools
    from grpc_tools import protoc

    include = Path(grpc_tools.__file__).parent / "_proto"
    sources = [str(PROTO_ROOT / "facefleet" / "v1" / name) for name in PROTO_FILES]
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_ROOT}",
        f"-I{include}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *sources,
    ]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed for {sources}")
    generated = sorted((out_dir / "facefleet" / "v1").glob("*_pb2*.py*"))
    return [p for p in generated if p.suffix in (".py", ".pyi")]


def drift() -> list[str]:
    """Names of stub files that differ from a fresh generation (empty when in sync)."""
    committed = REPO_ROOT / "facefleet" / "v1"
    with tempfile.TemporaryDirectory() as tmp:
        fresh = generate(Path(tmp))
        differing = []
        for path in fresh:
            mine = committed / path.name
            if not mine.exists() or mine.read_bytes() != path.read_bytes():
                differing.append(path.name)
        return differing


if __name__ == "__main__":
    for written in generate():
        print(written.relative_to(REPO_ROOT))
    sys.exit(0)
