"""Every `facefleet` command fed the hostile corpus and hypothesis-made arguments, in-process
(typer's CliRunner), the client commands against the real mTLS stack of conftest.py.

Each invocation must end in a correct result (exit 0) or a clear error (`error:` + `hint:`, exit 1;
2 for usage), never a traceback, never the error boundary's internal-error report; afterwards the
servers still answer their health checks and no accepted task is lost. Commands that would serve
forever (`scheduler run`, `agent run`, `up`, `console serve`) get inputs that fail before they serve;
`proto gen|check` take no input."""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.hostile.cli_checks import assert_clean, run_cli
from tests.hostile.conftest import HostileStack
from tests.hostile.corpus import CORPUS_DIR, CORPUS_FILES, STRINGS, hostile_path, hostile_text

EXAMPLES = 8  # per command
Args = list[str]
Template = Callable[[HostileStack, Path, st.DataObject], Args]


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """Relative paths a command writes (certs init --dir ../x) land in a scratch directory."""
    inner = tmp_path / "a" / "b"
    inner.mkdir(parents=True)
    monkeypatch.chdir(inner)
    yield inner


def no_tls_config(work: Path) -> str:
    """A config whose TLS material is missing: a server command fails before it could serve."""
    config = work / "no-tls.toml"
    config.write_text(f'[tls]\ndir = "{work / "no-certs"}"\n[audit]\npath = "{work / "audit.jsonl"}"\n')
    return str(config)


def text(data: st.DataObject) -> str:
    return data.draw(hostile_text())


def path(data: st.DataObject) -> str:
    return data.draw(hostile_path())


def maybe(data: st.DataObject, *args: str) -> Args:
    return list(args) if data.draw(st.booleans()) else []


COMMANDS: dict[str, Template] = {
    "submit": lambda s, w, d: ["submit", path(d), "--config", str(s.config), *maybe(d, "--idempotency-key", text(d))],
    "status": lambda s, w, d: ["status", text(d), "--config", str(s.config), *maybe(d, "--json")],
    "watch": lambda s, w, d: ["watch", text(d), "--config", str(s.config)],
    "cancel": lambda s, w, d: ["cancel", text(d), "--reason", text(d), "--config", str(s.config)],
    "tasks": lambda s, w, d: [
        "tasks",
        "--config",
        str(s.config),
        "--project",
        text(d),
        "--pool",
        text(d),
        "--page-token",
        text(d),
        *maybe(d, "--state", text(d)),
        *maybe(d, "--limit", text(d)),
    ],
    "explain": lambda s, w, d: ["explain", path(d), "--world", path(d), *maybe(d, "--policy", path(d))],
    "explain --task-id": lambda s, w, d: ["explain", "--task-id", text(d), "--config", str(s.config)],
    "simulate": lambda s, w, d: [
        "simulate",
        "--workload",
        path(d),
        "--world",
        path(d),
        *maybe(d, "--sweep", text(d)),
    ],
    "lock": lambda s, w, d: ["lock", text(d), "--reason", text(d), "--config", str(s.config)],
    "unlock": lambda s, w, d: ["unlock", text(d), "--reason", text(d), "--config", str(s.config)],
    "swap": lambda s, w, d: [
        "swap",
        "--source",
        path(d),
        "--target",
        path(d),
        "--output",
        str(w / "out.png"),
        *maybe(d, "--face-selector", text(d)),
        *maybe(d, "--mask", text(d)),
        *maybe(d, "--provider", text(d)),
    ],
    "scheduler run": lambda s, w, d: [
        "scheduler",
        "run",
        "--config",
        no_tls_config(w),
        "--listen",
        "127.0.0.1:0",
        "--metrics-port",
        "0",
        *maybe(d, "--store", text(d)),
        *maybe(d, "--policy", path(d)),
    ],
    "agent run": lambda s, w, d: [
        "agent",
        "run",
        "--config",
        no_tls_config(w),
        "--listen",
        "127.0.0.1:0",
        "--metrics-port",
        "0",
        "--pool",
        text(d),
        "--trust-zone",
        d.draw(st.sampled_from(["private", "cloud", *STRINGS[:8]])),
        "--models",
        path(d),
        "--scheduler",
        s.address,
    ],
    "agent describe": lambda s, w, d: [
        "agent",
        "describe",
        d.draw(st.sampled_from([s.agent_address, "127.0.0.1:1"])),
        "--config",
        str(s.config),
        "--as",
        d.draw(st.sampled_from(["operator", *STRINGS])),
    ],
    "agent verify-models": lambda s, w, d: ["agent", "verify-models", "--models", path(d)],
    "policy validate": lambda s, w, d: ["policy", "validate", path(d), *maybe(d, "--json")],
    "policy test": lambda s, w, d: ["policy", "test", path(d)],
    "budget show": lambda s, w, d: ["budget", "show", "--config", str(s.config), *maybe(d, "--store", text(d))],
    "budget set": lambda s, w, d: [
        "budget",
        "set",
        text(d),
        "--monthly-cap",
        text(d),
        "--reason",
        text(d),
        "--config",
        str(s.config),
        *maybe(d, "--alert-pct", text(d)),
        *maybe(d, "--create"),
    ],
    "budget report": lambda s, w, d: [
        "budget",
        "report",
        "--config",
        str(s.config),
        "--since",
        text(d),
        "--format",
        text(d),
        *maybe(d, "--output", text(d)),
    ],
    "budget history": lambda s, w, d: ["budget", "history", "--config", str(s.config), "-o", text(d)],
    "certs init": lambda s, w, d: ["certs", "init", "--dir", text(d), *maybe(d, "--host", text(d))],
    "certs issue": lambda s, w, d: [
        "certs",
        "issue",
        text(d),
        "--role",
        d.draw(st.sampled_from(["finance", *STRINGS])),
        "--dir",
        str(s.root / "certs"),
        *maybe(d, "--host", text(d)),
    ],
    "audit verify": lambda s, w, d: ["audit", "verify", path(d), *maybe(d, "--anchor", text(d))],
    "audit query": lambda s, w, d: [
        "audit",
        "query",
        "--path",
        path(d),
        "--project",
        text(d),
        *maybe(d, "--since", text(d)),
        *maybe(d, "--kind", text(d)),
    ],
    "audit proof": lambda s, w, d: [
        "audit",
        "proof",
        "--project",
        text(d),
        "--path",
        path(d),
        *maybe(d, "--since", text(d)),
        *maybe(d, "--world", path(d)),
        *maybe(d, "--key", path(d)),
    ],
    "up": lambda s, w, d: ["up", "--dir", d.draw(st.sampled_from([str(CORPUS_DIR), str(CORPUS_FILES[0])]))],
    "console token": lambda s, w, d: [
        "console",
        "token",
        "--role",
        text(d),
        "--subject",
        text(d),
        "--config",
        str(s.config),
    ],
}


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_generated_arguments_end_cleanly(
    stack: HostileStack, workdir: Path, name: str, capfd: pytest.CaptureFixture[str]
) -> None:
    template = COMMANDS[name]

    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        derandomize=True,
        suppress_health_check=[HealthCheck.function_scoped_fixture],
    )
    @given(data=st.data())
    def call(data: st.DataObject) -> None:
        args = template(stack, workdir, data)
        assert_clean(run_cli(args), args)

    call()
    stack.assert_healthy()
    logs = capfd.readouterr()
    assert "Traceback" not in logs.out + logs.err, (logs.out + logs.err)[-3000:]
    assert not Path("/tmp/facefleet-pwned").exists()  # "$(touch /tmp/facefleet-pwned)" stayed text


FILE_COMMANDS: dict[str, Callable[[HostileStack, Path], Args]] = {
    "submit": lambda s, f: ["submit", str(f), "--config", str(s.config)],
    "explain": lambda s, f: ["explain", str(f), "--world", str(f)],
    "simulate": lambda s, f: ["simulate", "--workload", str(f), "--world", "policies/default/world.yaml"],
    "audit verify": lambda s, f: ["audit", "verify", str(f)],
    "audit query": lambda s, f: ["audit", "query", "--path", str(f)],
    "audit proof": lambda s, f: ["audit", "proof", "--project", "film-x", "--path", str(f), "--world", str(f)],
    "swap": lambda s, f: ["swap", "--source", str(f), "--target", str(f), "--output", str(s.root / "o.png")],
    "tasks --config": lambda s, f: ["tasks", "--config", str(f)],
    "audit verify --config": lambda s, f: ["audit", "verify", "--config", str(f)],
}


@pytest.mark.parametrize("corpus_file", CORPUS_FILES, ids=lambda p: p.name)
def test_every_corpus_file_through_every_file_command(
    stack: HostileStack, corpus_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(Path(__file__).parents[2])  # the repository: policies/default is there
    for template in FILE_COMMANDS.values():
        args = template(stack, corpus_file)
        assert_clean(run_cli(args), args)
    for document in ("rules.yaml", "budgets.yaml", "locks.yaml"):  # the file as each policy document
        policy = tmp_path / document.removesuffix(".yaml")
        shutil.copytree("policies/default", policy)
        shutil.copyfile(corpus_file, policy / document)
        for args in (["policy", "validate", str(policy)], ["policy", "test", str(policy)]):
            assert_clean(run_cli(args), args)


# ---- regressions that need the live stack --------------------------------------------------------


def test_lock_with_a_markup_reason_applies_and_prints_it(stack: HostileStack) -> None:
    reason = "GDPR-142, see [/legal/gdpr] folder"
    result = run_cli(["lock", "legal-review", "--reason", reason, "--config", str(stack.config)])
    assert_clean(result)
    assert result.exit_code == 0 and reason in result.output, result.output
    for args in (
        ["audit", "query", "--project", "legal-review", "--config", str(stack.config)],
        ["audit", "proof", "--project", "legal-review", "--config", str(stack.config)],
    ):
        shown = run_cli(args)
        assert_clean(shown, args)
        assert shown.exit_code == 0 and "[/legal/gdpr]" in shown.output, shown.output


def test_lock_refuses_a_project_name_no_task_can_carry(stack: HostileStack) -> None:
    result = run_cli(["lock", "Film-X", "--reason", "talent contract", "--config", str(stack.config)])
    assert_clean(result)
    assert result.exit_code == 1 and "did you mean 'film-x'" in result.output, result.output
    assert "Film-X" not in stack.scheduler.rules.current().locks
