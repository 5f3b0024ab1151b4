"""Load Terraform modules with python-hcl2 into plain dicts, and render their .tftpl boot scripts."""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hcl2

REPO_ROOT = Path(__file__).resolve().parents[2]
TERRAFORM_ROOT = REPO_ROOT / "terraform"
MODULES = ("aws-spot-agents", "azure-spot-agents", "consul-rules")
ROOTS = [TERRAFORM_ROOT / "modules" / name for name in MODULES] + [TERRAFORM_ROOT / "examples" / "hybrid"]

_OPTIONS = hcl2.SerializationOptions(strip_string_quotes=True, explicit_blocks=False, with_comments=False)
_TEMPLATE_VAR = re.compile(r"(?<!\$)\$\{(\w+)\}")


@dataclass
class Module:
    path: Path
    blocks: dict[str, list[dict[str, Any]]]

    def named(self, kind: str) -> dict[str, dict[str, Any]]:
        """`variable`/`output`/`module` blocks by name."""
        return {name: body for block in self.blocks.get(kind, []) for name, body in block.items()}

    def resources(self, kind: str = "resource") -> dict[tuple[str, str], dict[str, Any]]:
        """`resource`/`data` blocks keyed by (type, name)."""
        found: dict[tuple[str, str], dict[str, Any]] = {}
        for block in self.blocks.get(kind, []):
            for rtype, named in block.items():
                for name, body in named.items():
                    found[(rtype, name)] = body
        return found

    def of_type(self, rtype: str, kind: str = "resource") -> list[dict[str, Any]]:
        return [body for (found_type, _), body in self.resources(kind).items() if found_type == rtype]

    def text(self) -> str:
        return "\n".join(path.read_text() for path in sorted(self.path.glob("*.tf")))


def load_module(path: Path) -> Module:
    blocks: dict[str, list[dict[str, Any]]] = {}
    for tf in sorted(path.glob("*.tf")):
        with tf.open() as handle:
            for kind, entries in hcl2.load(handle, serialization_options=_OPTIONS).items():
                blocks.setdefault(kind, []).extend(entries)
    return Module(path, blocks)


def all_tf_files() -> Iterator[Path]:
    yield from sorted(TERRAFORM_ROOT.rglob("*.tf"))


def template_variables(template: str) -> set[str]:
    return set(_TEMPLATE_VAR.findall(template))


def render_template(template: str, values: dict[str, object]) -> str:
    """Render a directive-free Terraform template the way templatefile() does (`$${` is a literal `${`)."""
    if "%{" in template:
        raise ValueError("template uses %{ } directives; this renderer handles interpolation only")
    missing = template_variables(template) - values.keys()
    if missing:
        raise KeyError(f"no value for template variables {sorted(missing)}")
    rendered = _TEMPLATE_VAR.sub(lambda match: str(values[match.group(1)]), template)
    return rendered.replace("$${", "${")
