"""deploy/k8s: every overlay rendered with `kubectl kustomize`, validated, scanned, and its promises.

Validation: core kinds strictly (unknown fields rejected) against the Kubernetes 1.31 OpenAPI schemas
shipped in `kubernetes-validate`; custom resources (ServiceMonitor, PrometheusRule, Certificate,
Issuer) strictly against JSON schemas of the cloudcoil models generated from the upstream CRDs, with
every object closed (`additionalProperties: false`). checkov's `kustomize` framework renders base
and overlays itself and runs the Kubernetes checks on the result (raw kustomize patches are
fragments, not objects), plus `dockerfile` over deploy/ and `terraform` over terraform/.
"""

from __future__ import annotations

import copy
import itertools
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from facefleet.config import Settings, TLSConfig, load_settings
from facefleet.grpc_server import ServerHandle, build_server
from facefleet.scheduler.leader import FileLeaderLock, LeaderLock, PostgresLeaderLock
from facefleet.scheduler.rules_source.consul_endpoint import resolve_endpoint
from facefleet.security import certs
from facefleet.security.tls import server_credentials

REPO_ROOT = Path(__file__).resolve().parents[2]
K8S_DIR = REPO_ROOT / "deploy" / "k8s"
OVERLAYS = sorted(path.name for path in (K8S_DIR / "overlays").iterdir() if path.is_dir())
KUBERNETES_VERSION = "1.31"
BIN_DIR = Path(sys.executable).parent
KUBECTL = str(BIN_DIR / "kubectl") if (BIN_DIR / "kubectl").exists() else shutil.which("kubectl")
CHECKOV = REPO_ROOT / ".venv-checkov" / "bin" / "checkov"
SHELLCHECK = shutil.which("shellcheck") or str(BIN_DIR / "shellcheck")
WORKLOAD_KINDS = {"StatefulSet", "DaemonSet", "Deployment"}
SCHEDULER = {"app.kubernetes.io/name": "facefleet", "app.kubernetes.io/component": "scheduler"}
AGENT = {"app.kubernetes.io/name": "facefleet", "app.kubernetes.io/component": "agent"}
HEALTHCHECK = ["python", "-m", "facefleet.healthcheck"]
PROBE_TIMING = {"periodSeconds", "timeoutSeconds", "failureThreshold", "initialDelaySeconds"}


def _crd_models() -> dict[tuple[str, str], Any]:
    from cloudcoil.models.cert_manager.v1 import Certificate, Issuer
    from cloudcoil.models.prometheus_operator.v1 import PrometheusRule, ServiceMonitor

    return {
        ("monitoring.coreos.com/v1", "ServiceMonitor"): ServiceMonitor,
        ("monitoring.coreos.com/v1", "PrometheusRule"): PrometheusRule,
        ("cert-manager.io/v1", "Certificate"): Certificate,
        ("cert-manager.io/v1", "Issuer"): Issuer,
    }


CRD_MODELS = _crd_models()


def _render(overlay: str) -> list[dict[str, Any]]:
    assert KUBECTL, "kubectl missing: bash scripts/install-deps installs it with the test extra"
    result = subprocess.run(
        [KUBECTL, "kustomize", str(K8S_DIR / "overlays" / overlay)],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert result.returncode == 0, f"kubectl kustomize {overlay} failed:\n{result.stderr}"
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict[str, Any]]]:
    return {overlay: _render(overlay) for overlay in OVERLAYS}


def _one(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    (found,) = [doc for doc in docs if doc["kind"] == kind and doc["metadata"]["name"] == name]
    return found


def _all(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [doc for doc in docs if doc["kind"] == kind]


def _workloads(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [doc for doc in docs if doc["kind"] in WORKLOAD_KINDS]


def _containers(workload: dict[str, Any]) -> list[dict[str, Any]]:
    spec = workload["spec"]["template"]["spec"]
    return [*spec.get("initContainers", []), *spec["containers"]]


def _container(workload: dict[str, Any], name: str) -> dict[str, Any]:
    (found,) = [c for c in _containers(workload) if c["name"] == name]
    return found


def _matches(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    """A label selector (matchLabels only: all ours use) against a label set; {} selects everything."""
    assert set(selector) <= {"matchLabels"}, f"selector form not handled here: {selector}"
    return all(labels.get(key) == value for key, value in selector.get("matchLabels", {}).items())


def _pod_labels(docs: list[dict[str, Any]], component: dict[str, str]) -> dict[str, str]:
    (workload,) = [
        w for w in _workloads(docs) if _matches({"matchLabels": component}, w["spec"]["template"]["metadata"]["labels"])
    ]
    return dict(workload["spec"]["template"]["metadata"]["labels"])


def _closed(schema: Any) -> Any:
    """The schema with every object that lists properties closed to other properties."""
    if isinstance(schema, dict):
        if "properties" in schema:
            schema.setdefault("additionalProperties", False)
        for value in schema.values():
            _closed(value)
    elif isinstance(schema, list):
        for value in schema:
            _closed(value)
    return schema


def _custom_resource_errors(doc: dict[str, Any]) -> list[str]:
    model = CRD_MODELS[(doc["apiVersion"], doc["kind"])]
    validator = jsonschema.Draft202012Validator(_closed(model.model_json_schema(by_alias=True)))
    return [f"{error.json_path}: {error.message}" for error in validator.iter_errors(doc)]


def _validate(doc: dict[str, Any]) -> list[str]:
    """Errors for one rendered object: core kinds by kubernetes-validate (strict), CRs by their schema."""
    if (doc["apiVersion"], doc["kind"]) in CRD_MODELS:
        return _custom_resource_errors(doc)
    try:
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.ValidationError as error:
        return [f"{'.'.join(str(p) for p in error.path)}: {error.message}"]
    return []


# --- rendering and schemas ----------------------------------------------------------------------


def test_overlays_exist_and_render(rendered: dict[str, list[dict[str, Any]]]) -> None:
    assert {"onprem", "dev"} <= set(OVERLAYS)
    for overlay, docs in rendered.items():
        kinds = {doc["kind"] for doc in docs}
        assert {"Namespace", "StatefulSet", "DaemonSet", "Service", "ConfigMap", "NetworkPolicy"} <= kinds, overlay
        assert {doc["metadata"].get("namespace", "facefleet") for doc in docs} == {"facefleet"}, overlay


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_rendered_object_validates_strictly(rendered: dict[str, list[dict[str, Any]]], overlay: str) -> None:
    problems = {f"{doc['kind']}/{doc['metadata']['name']}": _validate(doc) for doc in rendered[overlay]}
    assert not {name: errors for name, errors in problems.items() if errors}


def test_validation_rejects_unknown_fields(rendered: dict[str, list[dict[str, Any]]]) -> None:
    """The validators are not vacuous: a misspelt field fails in a core kind and in each CR kind."""
    docs = rendered["onprem"]
    statefulset = copy.deepcopy(_one(docs, "StatefulSet", "facefleet-scheduler"))
    statefulset["spec"]["template"]["spec"]["containers"][0]["securityContext"]["readOnlyRootFilesytem"] = True
    assert _validate(statefulset)
    with pytest.raises(kubernetes_validate.SchemaNotFoundError):
        kubernetes_validate.validate({**statefulset, "kind": "StatefulSett"}, KUBERNETES_VERSION, strict=True)
    for kind in ("ServiceMonitor", "PrometheusRule", "Certificate"):
        custom = copy.deepcopy(_all(docs, kind)[0])
        custom["spec"]["unknownField"] = 1
        assert _custom_resource_errors(custom), kind
    certificate = copy.deepcopy(_all(docs, "Certificate")[0])
    certificate["spec"]["dnsNames"] = "one-string-not-a-list"
    assert _custom_resource_errors(certificate)


# --- hardening ----------------------------------------------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_pod_is_hardened(rendered: dict[str, list[dict[str, Any]]], overlay: str) -> None:
    docs = rendered[overlay]
    workloads = _workloads(docs)
    assert {w["metadata"]["name"] for w in workloads} == {"facefleet-scheduler", "facefleet-agent"}
    for workload in workloads:
        name = workload["metadata"]["name"]
        pod = workload["spec"]["template"]["spec"]
        assert pod["automountServiceAccountToken"] is False, name
        account = _one(docs, "ServiceAccount", pod["serviceAccountName"])
        assert account["automountServiceAccountToken"] is False, name
        assert pod["securityContext"]["runAsNonRoot"] is True, name
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}, name
        assert not pod.get("hostNetwork") and not pod.get("hostPID") and not pod.get("hostIPC"), name
        assert not [v for v in pod["volumes"] if "hostPath" in v], f"{name}: hostPath volume"
        for container in _containers(workload):
            where = f"{name}/{container['name']}"
            context = container["securityContext"]
            assert context["runAsNonRoot"] is True and context["runAsUser"] != 0, where
            assert context["readOnlyRootFilesystem"] is True, where
            assert context["allowPrivilegeEscalation"] is False, where
            assert context["capabilities"] == {"drop": ["ALL"]}, where
            assert context["seccompProfile"] == {"type": "RuntimeDefault"}, where
            assert not context.get("privileged"), where
            for bound in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(container["resources"][bound]), f"{where}: {bound}"
            image = container["image"]
            pinned = "@sha256:" in image or (":" in image.rsplit("/", 1)[-1] and not image.endswith(":latest"))
            assert pinned, f"{where}: image {image} is neither a digest nor a pinned tag"


def test_namespace_enforces_the_restricted_pod_security_profile(rendered: dict[str, list[dict[str, Any]]]) -> None:
    for docs in rendered.values():
        labels = _one(docs, "Namespace", "facefleet")["metadata"]["labels"]
        assert labels["pod-security.kubernetes.io/enforce"] == "restricted"


# --- probes: gRPC health over mTLS, never plaintext ----------------------------------------------


def _container_env(docs: list[dict[str, Any]], container: dict[str, Any]) -> dict[str, str]:
    """The container's plain environment: its `env` values and the ConfigMaps of its `envFrom`."""
    env = {e["name"]: e["value"] for e in container.get("env", []) if "value" in e}
    for source in container.get("envFrom", []):
        env.update(_one(docs, "ConfigMap", source["configMapRef"]["name"])["data"])
    return env


def _settings_of(
    docs: list[dict[str, Any]], workload: dict[str, Any], container: dict[str, Any], root: Path
) -> Settings:
    """The settings the container reads: its ConfigMap's facefleet.toml and its FACEFLEET_* env."""
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in workload["spec"]["template"]["spec"]["volumes"]}
    env = _container_env(docs, container)
    config_path = Path(env["FACEFLEET_CONFIG"])
    (volume_name,) = [name for name, path in mounts.items() if config_path.parent == Path(path)]
    config_map = _one(docs, "ConfigMap", volumes[volume_name]["configMap"]["name"])
    toml_file = root / "facefleet.toml"
    toml_file.write_text(config_map["data"][config_path.name])
    facefleet_env = {
        key: value for key, value in env.items() if key.startswith("FACEFLEET_") and key != "FACEFLEET_CONFIG"
    }
    saved = {key: os.environ.pop(key) for key in list(os.environ) if key.startswith("FACEFLEET_")}
    os.environ.update(facefleet_env)
    try:
        return load_settings(toml_file)
    finally:
        for key in facefleet_env:
            os.environ.pop(key, None)
        os.environ.update(saved)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_probes_are_grpc_health_over_mtls(
    rendered: dict[str, list[dict[str, Any]]], overlay: str, tmp_path: Path
) -> None:
    docs = rendered[overlay]
    for workload in _workloads(docs):
        component = workload["metadata"]["labels"]["app.kubernetes.io/component"]
        container = _container(workload, component)
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            spec = container[probe]
            assert set(spec) - PROBE_TIMING == {"exec"}, f"{component} {probe}: only an exec probe"
            command = spec["exec"]["command"]
            assert command[:4] == [*HEALTHCHECK, component], f"{component} {probe}: {command}"
            assert "--insecure" not in command
        settings = _settings_of(docs, workload, container, tmp_path)
        assert settings.tls.insecure is False, f"{overlay}/{component} would serve plaintext"
        tls_mount = _mount(container, "tls")
        for path in (settings.tls.ca, settings.tls.cert, settings.tls.key):
            assert path is not None and path.parent == Path(tls_mount["mountPath"]), path
        assert tls_mount["readOnly"] is True
        # Every port the container exposes is its gRPC (mTLS) or its /metrics port: no plaintext API.
        ports = {p["containerPort"] for p in container["ports"]}
        listen = settings.scheduler.listen if component == "scheduler" else settings.agent.listen
        metrics = settings.scheduler.metrics_port if component == "scheduler" else settings.agent.metrics_port
        assert ports == {int(listen.rsplit(":", 1)[1]), metrics}, component


def _mount(container: dict[str, Any], volume: str) -> dict[str, Any]:
    (found,) = [m for m in container["volumeMounts"] if m["name"] == volume]
    return found


def _serve_health(tls_dir: Path, hosts: list[str], role: str) -> ServerHandle:
    """A gRPC server with the health service, mTLS with a certificate for `hosts`, Secret key layout."""
    ca = certs.create_ca("test CA")
    tls_dir.mkdir(parents=True, exist_ok=True)
    certs.save_ca(ca, tls_dir)
    issued = certs.issue_to_files(ca, tls_dir, role, roles=[role], hosts=hosts, server=True)
    (tls_dir / certs.CA_CERT_FILE).rename(tls_dir / "ca.crt")
    issued.cert.rename(tls_dir / "tls.crt")
    issued.key.rename(tls_dir / "tls.key")
    tls = TLSConfig(ca=tls_dir / "ca.crt", cert=tls_dir / "tls.crt", key=tls_dir / "tls.key")
    return build_server("127.0.0.1:0", [], credentials=server_credentials(tls, role))


def _run_probe(
    command: list[str], config_text: str, tls_dir: Path, mount: str, listen_env: str, port: int
) -> subprocess.CompletedProcess[str]:
    config = tls_dir.parent / "facefleet.toml"
    config.write_text(config_text.replace(mount, str(tls_dir)))
    env = {key: value for key, value in os.environ.items() if not key.startswith("FACEFLEET_")}
    env |= {"FACEFLEET_CONFIG": str(config), listen_env: f"0.0.0.0:{port}"}
    return subprocess.run(
        [sys.executable, *command[1:]], env=env, capture_output=True, text=True, timeout=30, check=False
    )


@pytest.mark.parametrize("component", ["scheduler", "agent"])
def test_probe_command_passes_against_a_server_holding_the_cert_manager_certificate(
    rendered: dict[str, list[dict[str, Any]]], component: str, tmp_path: Path
) -> None:
    """Run the manifest's probe as the kubelet would, with the manifest's config, against an mTLS
    server whose certificate has exactly the Certificate's dnsNames; a wrong name or a plaintext
    server makes it fail."""
    docs = rendered["onprem"]
    workload = _one(docs, "StatefulSet" if component == "scheduler" else "DaemonSet", f"facefleet-{component}")
    container = _container(workload, component)
    command = container["readinessProbe"]["exec"]["command"]
    (config_volume,) = [v for v in workload["spec"]["template"]["spec"]["volumes"] if v["name"] == "config"]
    config_text = _one(docs, "ConfigMap", config_volume["configMap"]["name"])["data"]["facefleet.toml"]
    mount = _mount(container, "tls")["mountPath"]
    certificate = _one(docs, "Certificate", f"facefleet-{component}")
    tls_volume = next(v for v in workload["spec"]["template"]["spec"]["volumes"] if v["name"] == "tls")
    assert certificate["spec"]["secretName"] == tls_volume["secret"]["secretName"]
    listen_env = f"FACEFLEET_{component.upper()}__LISTEN"

    server = _serve_health(tmp_path / "good" / "tls", certificate["spec"]["dnsNames"], component)
    try:
        result = _run_probe(command, config_text, tmp_path / "good" / "tls", mount, listen_env, server.port)
        assert result.returncode == 0, result.stdout + result.stderr
        assert "SERVING" in result.stdout
    finally:
        server.stop(0)

    server = _serve_health(tmp_path / "wrong" / "tls", ["someone-else"], component)
    try:
        result = _run_probe(command, config_text, tmp_path / "wrong" / "tls", mount, listen_env, server.port)
        assert result.returncode == 1, result.stdout + result.stderr
    finally:
        server.stop(0)

    plaintext = build_server("127.0.0.1:0", [], credentials=None)
    try:
        result = _run_probe(command, config_text, tmp_path / "good" / "tls", mount, listen_env, plaintext.port)
        assert result.returncode == 1, "the probe must not accept a plaintext server"
    finally:
        plaintext.stop(0)


# --- scheduler pair, agents, slots --------------------------------------------------------------


def test_onprem_runs_a_scheduler_pair_on_postgresql_with_consul_rules(
    rendered: dict[str, list[dict[str, Any]]], tmp_path: Path
) -> None:
    docs = rendered["onprem"]
    statefulset = _one(docs, "StatefulSet", "facefleet-scheduler")
    assert statefulset["spec"]["replicas"] == 2
    settings = _settings_of(docs, statefulset, _container(statefulset, "scheduler"), tmp_path)
    assert isinstance(LeaderLock.for_url(settings.scheduler.store_url), PostgresLeaderLock)
    assert settings.policy.source == "consul"
    # The Consul endpoint as the scheduler resolves it, with the ACL token read from the mounted Secret.
    scheduler = _container(statefulset, "scheduler")
    token_mount = _mount(scheduler, "consul-token")
    assert token_mount["readOnly"] is True
    env = _container_env(docs, scheduler)
    token_file = tmp_path / "consul-token"
    token_file.write_text("acl-token-from-secret\n")
    assert Path(env["CONSUL_HTTP_TOKEN_FILE"]).parent == Path(token_mount["mountPath"])
    endpoint = resolve_endpoint(
        settings.policy.consul_addr,
        token=settings.policy.consul_token,
        environ={**env, "CONSUL_HTTP_TOKEN_FILE": str(token_file)},
    )
    assert endpoint.host.endswith(".svc.cluster.local") and endpoint.token == "acl-token-from-secret"
    assert not [key for key in env if "TOKEN" in key and not key.endswith("_FILE")], "no credential in the environment"
    assert settings.scheduler.prometheus_url
    # The PostgreSQL client certificate the store URL names is mounted read-only.
    postgres = _mount(_container(statefulset, "scheduler"), "postgres-client")
    assert postgres["readOnly"] is True and f"sslcert={postgres['mountPath']}/tls.crt" in settings.scheduler.store_url
    budget = _one(docs, "PodDisruptionBudget", "facefleet-scheduler")
    assert budget["spec"]["minAvailable"] == 1
    assert _matches(budget["spec"]["selector"], _pod_labels(docs, SCHEDULER))


def test_dev_runs_one_scheduler_on_sqlite(rendered: dict[str, list[dict[str, Any]]], tmp_path: Path) -> None:
    docs = rendered["dev"]
    statefulset = _one(docs, "StatefulSet", "facefleet-scheduler")
    assert statefulset["spec"]["replicas"] == 1
    settings = _settings_of(docs, statefulset, _container(statefulset, "scheduler"), tmp_path)
    lock = LeaderLock.for_url(settings.scheduler.store_url)
    assert isinstance(lock, FileLeaderLock)
    data = _mount(_container(statefulset, "scheduler"), "data")["mountPath"]
    assert settings.scheduler.store_url.startswith(f"sqlite:///{data}/"), "the SQLite file is on the replica's volume"
    assert settings.policy.source == "file"
    dockerfile = (REPO_ROOT / "deploy" / "docker" / "scheduler.Dockerfile").read_text()
    assert f"COPY policies {settings.policy.dir.parent}" in dockerfile, "the policy files are baked into the image"
    assert (REPO_ROOT / "policies" / settings.policy.dir.name / "rules.yaml").exists()
    assert not _all(docs, "PodDisruptionBudget"), "one replica: a budget would block draining the node"


def _options(args: list[str]) -> dict[str, str]:
    return {flag: value for flag, value in itertools.pairwise(args) if flag.startswith("--")}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_agents_heartbeat_to_every_scheduler_replica(rendered: dict[str, list[dict[str, Any]]], overlay: str) -> None:
    docs = rendered[overlay]
    statefulset = _one(docs, "StatefulSet", "facefleet-scheduler")
    service = _one(docs, "Service", statefulset["spec"]["serviceName"])
    assert service["spec"]["clusterIP"] == "None" and service["spec"]["publishNotReadyAddresses"] is True
    names = [
        f"facefleet-scheduler-{ordinal}.{service['metadata']['name']}.facefleet.svc.cluster.local:50051"
        for ordinal in range(statefulset["spec"]["replicas"])
    ]
    agent = _container(_one(docs, "DaemonSet", "facefleet-agent"), "agent")
    assert _options(agent["args"])["--scheduler"].split(",") == names


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_agent_slots_equal_its_gpu_count(rendered: dict[str, list[dict[str, Any]]], overlay: str) -> None:
    daemonset = _one(rendered[overlay], "DaemonSet", "facefleet-agent")
    agent = _container(daemonset, "agent")
    gpus = agent["resources"]["limits"]["nvidia.com/gpu"]
    assert agent["resources"]["requests"]["nvidia.com/gpu"] == gpus
    env = {e["name"]: e.get("value") for e in agent["env"]}
    assert _options(agent["args"])["--slots"] == "$(GPU_COUNT)"
    assert env["GPU_COUNT"] == str(gpus), f"{overlay}: {env['GPU_COUNT']} slots for {gpus} GPUs"
    assert _options(agent["args"])["--trust-zone"] == "private"
    assert daemonset["spec"]["template"]["metadata"]["labels"]["facefleet.io/trust-zone"] == "private"


def test_onprem_agents_run_on_gpu_operator_nodes(rendered: dict[str, list[dict[str, Any]]]) -> None:
    pod = _one(rendered["onprem"], "DaemonSet", "facefleet-agent")["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    gpus = _container(_one(rendered["onprem"], "DaemonSet", "facefleet-agent"), "agent")["resources"]["limits"]
    assert gpus["nvidia.com/gpu"] > 1, "the overlay's GPU count reaches the agent (not the base's default)"


def _kubelet_expand(text: str, env: dict[str, str]) -> str:
    """`$(VAR)` references in command/args, replaced from the container's env as the kubelet does."""
    for name, value in env.items():
        text = text.replace(f"$({name})", value)
    return text


def test_agent_entry_advertises_its_pod_dns_name_covered_by_its_certificate(
    rendered: dict[str, list[dict[str, Any]]], tmp_path: Path
) -> None:
    """Run the agent container's command as the kubelet would (bash, pod env, $(VAR) expansion) with
    a stand-in `facefleet` that records what it was started with."""
    docs = rendered["onprem"]
    agent = _container(_one(docs, "DaemonSet", "facefleet-agent"), "agent")
    shell, flag, script, name = agent["command"]
    script_file = tmp_path / "entry.sh"
    script_file.write_text(f"#!{shell}\nset {flag}\n{script}\n")
    lint = subprocess.run(
        [SHELLCHECK, "--shell=bash", "--severity=style", str(script_file)], capture_output=True, text=True, check=False
    )
    assert lint.returncode == 0, lint.stdout
    stand_in = tmp_path / "bin" / "facefleet"
    stand_in.parent.mkdir()
    stand_in.write_text('#!/bin/bash\nprintf "%s\\n" "$FACEFLEET_AGENT__ADVERTISE_ADDRESS" "$@"\n')
    stand_in.chmod(0o755)
    env = _container_env(docs, agent) | {"POD_IP": "10.42.7.19", "POD_NAMESPACE": "facefleet"}
    args = [_kubelet_expand(arg, env) for arg in agent["args"]]
    result = subprocess.run(
        [shell, flag, script, name, *args],
        env={"PATH": f"{stand_in.parent}{os.pathsep}{os.environ['PATH']}", **env},
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    )
    advertised, *passed = result.stdout.splitlines()
    assert advertised == "10-42-7-19.facefleet-agent.facefleet.svc.cluster.local:50061"
    assert passed == args and _options(passed)["--slots"] == str(agent["resources"]["limits"]["nvidia.com/gpu"])
    host = advertised.rsplit(":", 1)[0]
    names = _one(docs, "Certificate", "facefleet-agent")["spec"]["dnsNames"]
    assert any(n == host or (n.startswith("*.") and host.split(".", 1)[1] == n[2:]) for n in names), names


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_models_are_mounted_read_only_and_verified_before_the_agent_starts(
    rendered: dict[str, list[dict[str, Any]]], overlay: str
) -> None:
    daemonset = _one(rendered[overlay], "DaemonSet", "facefleet-agent")
    pod = daemonset["spec"]["template"]["spec"]
    (volume,) = [v for v in pod["volumes"] if v["name"] == "models"]
    assert volume["persistentVolumeClaim"]["readOnly"] is True
    agent = _container(daemonset, "agent")
    models_dir = _options(agent["args"])["--models"]
    (init,) = pod["initContainers"]
    assert init["args"] == ["agent", "verify-models", "--models", models_dir]
    assert init["image"] == agent["image"], "verified by the same code the agent runs"
    for container in (agent, init):
        mount = _mount(container, "models")
        assert mount["mountPath"] == models_dir and mount["readOnly"] is True


# --- the private zone as a network fact ---------------------------------------------------------


def _policies_for(docs: list[dict[str, Any]], labels: dict[str, str], direction: str) -> list[dict[str, Any]]:
    return [
        policy
        for policy in _all(docs, "NetworkPolicy")
        if _matches(policy["spec"]["podSelector"], labels) and direction in policy["spec"]["policyTypes"]
    ]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_default_deny_covers_every_pod(rendered: dict[str, list[dict[str, Any]]], overlay: str) -> None:
    docs = rendered[overlay]
    deny = _one(docs, "NetworkPolicy", "default-deny")
    assert deny["spec"] == {"podSelector": {}, "policyTypes": ["Ingress", "Egress"]}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_network_policy_selectors_match_the_pods(rendered: dict[str, list[dict[str, Any]]], overlay: str) -> None:
    docs = rendered[overlay]
    pods = {name: _pod_labels(docs, labels) for name, labels in (("scheduler", SCHEDULER), ("agent", AGENT))}
    for policy in _all(docs, "NetworkPolicy"):
        selected = [name for name, labels in pods.items() if _matches(policy["spec"]["podSelector"], labels)]
        assert selected, f"{policy['metadata']['name']} selects no facefleet pod"
        for rule in [*policy["spec"].get("ingress", []), *policy["spec"].get("egress", [])]:
            for peer in [*rule.get("from", []), *rule.get("to", [])]:
                if set(peer) == {"podSelector"}:  # a pod of this namespace: must be one of ours
                    assert any(_matches(peer["podSelector"], labels) for labels in pods.values()), peer
    assert [p["metadata"]["name"] for p in _policies_for(docs, pods["agent"], "Egress")] == [
        "default-deny",
        "facefleet-agent",
    ], "only the agent policy opens egress for agents (no later policy widens it)"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_agents_accept_only_the_scheduler(rendered: dict[str, list[dict[str, Any]]], overlay: str) -> None:
    docs = rendered[overlay]
    agent, scheduler = _pod_labels(docs, AGENT), _pod_labels(docs, SCHEDULER)
    agent_args = _options(_container(_one(docs, "DaemonSet", "facefleet-agent"), "agent")["args"])
    grpc_port = int(agent_args["--listen"].rsplit(":", 1)[1])
    rules = [rule for policy in _policies_for(docs, agent, "Ingress") for rule in policy["spec"].get("ingress", [])]
    for rule in rules:
        assert rule.get("from"), f"an ingress rule without `from` admits everyone: {rule}"
        ports = {p["port"] for p in rule["ports"]}
        for peer in rule["from"]:
            if ports == {grpc_port}:
                assert set(peer) == {"podSelector"} and _matches(peer["podSelector"], scheduler), peer
            else:  # /metrics only, only for Prometheus
                assert ports == {9465} and set(peer) == {"namespaceSelector", "podSelector"}, rule
                assert peer["podSelector"] == {"matchLabels": {"app.kubernetes.io/name": "prometheus"}}
    assert any({p["port"] for p in rule["ports"]} == {grpc_port} for rule in rules)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_private_zone_pods_reach_only_the_scheduler_storage_and_dns(
    rendered: dict[str, list[dict[str, Any]]], overlay: str
) -> None:
    docs = rendered[overlay]
    scheduler = _pod_labels(docs, SCHEDULER)
    pods = [_pod_labels(docs, labels) for labels in (SCHEDULER, AGENT)]
    private_pods = [labels for labels in pods if labels.get("facefleet.io/trust-zone") == "private"]
    assert private_pods, "the agents are labelled facefleet.io/trust-zone=private"
    for labels in private_pods:
        for policy in _policies_for(docs, labels, "Egress"):
            for rule in policy["spec"].get("egress", []):
                assert rule.get("to"), f"{policy['metadata']['name']}: egress without `to` reaches anywhere"
                for peer in rule["to"]:
                    assert "ipBlock" not in peer, f"{policy['metadata']['name']}: {peer}"
                    if set(peer) == {"podSelector"}:
                        assert _matches(peer["podSelector"], scheduler)
                        assert {p["port"] for p in rule["ports"]} == {50051}
                    elif set(peer) == {"namespaceSelector"}:
                        assert peer["namespaceSelector"] == {"matchLabels": {"facefleet.io/private-storage": "true"}}
                    else:
                        assert peer == {
                            "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "kube-system"}},
                            "podSelector": {"matchLabels": {"k8s-app": "kube-dns"}},
                        }
                        assert {p["port"] for p in rule["ports"]} == {53}


# --- monitoring ---------------------------------------------------------------------------------


def test_prometheus_rule_carries_the_alerts_of_deploy_prometheus(rendered: dict[str, list[dict[str, Any]]]) -> None:
    alerts = yaml.safe_load((REPO_ROOT / "deploy" / "prometheus" / "alerts.yml").read_text())
    (rule,) = _all(rendered["onprem"], "PrometheusRule")
    assert rule["spec"]["groups"] == alerts["groups"]
    check = subprocess.run(
        [sys.executable, str(K8S_DIR / "prometheusrule_from_alerts.py"), "--check"],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert check.returncode == 0, check.stderr


def test_service_monitors_scrape_the_jobs_the_alerts_name(rendered: dict[str, list[dict[str, Any]]]) -> None:
    docs = rendered["onprem"]
    alerts_text = (REPO_ROOT / "deploy" / "prometheus" / "alerts.yml").read_text()
    for monitor in _all(docs, "ServiceMonitor"):
        services = [s for s in _all(docs, "Service") if _matches(monitor["spec"]["selector"], s["metadata"]["labels"])]
        scraped = [s for s in services if any(p["name"] == "metrics" for p in s["spec"]["ports"])]
        (service,) = scraped
        assert f'job="{service["metadata"]["name"]}"' in alerts_text, "the job (= Service name) the alerts query"
        assert [e["port"] for e in monitor["spec"]["endpoints"]] == ["metrics"]


def test_dev_needs_no_operator_crds(rendered: dict[str, list[dict[str, Any]]]) -> None:
    assert not [doc for doc in rendered["dev"] if (doc["apiVersion"], doc["kind"]) in CRD_MODELS]


# --- checkov ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def checkov_reports() -> Iterator[dict[str, dict[str, Any]]]:
    """One checkov run per framework group (it is slow), JSON reports keyed by check type."""
    assert CHECKOV.exists(), "checkov missing: bash scripts/install-deps makes .venv-checkov"
    env = {**os.environ, "PATH": f"{BIN_DIR}{os.pathsep}{os.environ['PATH']}", "BC_SKIP_MAPPING": "TRUE"}
    reports: dict[str, dict[str, Any]] = {}
    for directory, frameworks in (("deploy", ["kustomize", "dockerfile"]), ("terraform", ["terraform"])):
        result = subprocess.run(
            [str(CHECKOV), "-d", directory, "--framework", *frameworks, "--skip-download", "-o", "json"],
            cwd=REPO_ROOT,
            env=env,
            capture_output=True,
            text=True,
            check=False,
            timeout=600,
        )
        parsed = json.loads(result.stdout)
        for report in parsed if isinstance(parsed, list) else [parsed]:
            reports[report["check_type"]] = report
    yield reports


@pytest.mark.slow
@pytest.mark.parametrize("check_type", ["kustomize", "dockerfile", "terraform"])
def test_checkov_reports_zero_failed_checks(checkov_reports: dict[str, dict[str, Any]], check_type: str) -> None:
    report = checkov_reports[check_type]
    failed = [
        f"{c['check_id']} {c['resource']} ({c['file_path']}): {c['check_name']}"
        for c in report["results"].get("failed_checks", [])
    ]
    assert report["summary"]["failed"] == 0 and not failed, "\n".join(failed)
    assert report["summary"]["parsing_errors"] == 0
    assert report["summary"]["passed"] > 0, f"checkov scanned nothing for {check_type}"
    for skipped in report["results"].get("skipped_checks", []):
        reason = skipped["check_result"].get("suppress_comment", "")
        assert len(reason.split()) >= 5, f"{skipped['check_id']} {skipped['resource']}: an inline skip must say why"
