"""YAML from people and files (task files, policies, world snapshots, workloads), read safely.

Bytes go to PyYAML undecoded, so it detects UTF-8/UTF-16 with or without a BOM and reports bytes
that are not text as a YAML error with their position. Everything that can go wrong while reading
(a missing file, invalid encoding, bad syntax, nesting deep enough to exhaust the parser's stack)
is one `YamlInputError` that says where.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml


class YamlInputError(ValueError):
    """A YAML document that could not be read; the message names the file or source."""


def parse_yaml(document: str | bytes, where: str) -> Any:
    """The value of one YAML document (None for an empty one)."""
    try:
        return yaml.safe_load(document)
    except yaml.reader.ReaderError as exc:
        encoding = f"{exc.encoding.upper()} " if isinstance(exc.encoding, str) else ""
        raise YamlInputError(
            f"{where}: not {encoding}text: byte {exc.position} is {exc.character!r} ({exc.reason}); save it as UTF-8"
        ) from None
    except yaml.YAMLError as exc:
        raise YamlInputError(f"{where}: not valid YAML: {exc}") from None
    except RecursionError:
        raise YamlInputError(f"{where}: nested too deeply to be a facefleet document") from None


def read_yaml_file(path: Path, what: str = "file") -> Any:
    """The value of the YAML file at `path`; YamlInputError when it cannot be read or parsed."""
    try:
        document = Path(path).read_bytes()
    except FileNotFoundError:
        raise YamlInputError(f"{what} {path} does not exist") from None
    except OSError as exc:
        raise YamlInputError(f"cannot read {what} {path}: {exc.strerror or exc}") from None
    return parse_yaml(document, f"{what} {path}")
