"""Terraform modules, parsed with python-hcl2 (no terraform binary here): structure and safety."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import hcl2
import pytest
import typer
from terraform_files import (
    MODULES,
    ROOTS,
    TERRAFORM_ROOT,
    Module,
    all_tf_files,
    load_module,
    render_template,
    template_variables,
)

from facefleet.cli import app as facefleet_app
from facefleet.config import Settings
from facefleet.scheduler.rules_source import ConsulRuleSource, resolve_endpoint
from tests.consul_double import ConsulKVDouble

AWS = TERRAFORM_ROOT / "modules" / "aws-spot-agents"
AZURE = TERRAFORM_ROOT / "modules" / "azure-spot-agents"
CONSUL = TERRAFORM_ROOT / "modules" / "consul-rules"
SHELLCHECK = shutil.which("shellcheck") or str(Path(sys.executable).with_name("shellcheck"))

SAMPLE_TEMPLATE_VALUES: dict[str, object] = {
    "pool": "aws-spot",
    "region": "westeurope",
    "scheduler_address": "scheduler.corp.example:50051",
    "grpc_port": 50061,
    "metrics_port": 9465,
    "slots": 2,
    "task_bucket": "facefleet-tasks",
    "models_prefix": "models/",
    "tls_parameter_prefix": "/facefleet/agent-tls",
    "agent_package": "facefleet[gpu]==0.1.0",
    "identity_client": "00000000-0000-0000-0000-000000000000",
    "key_vault_uri": "https://facefleet-kv.vault.azure.net",
    "models_blob_url": "https://facefleettasks.blob.core.windows.net/tasks/models",
}


def _strings(value: Any) -> list[str]:
    """Every string inside a parsed HCL value (lists, dicts, nested blocks)."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for item in value.values() for s in _strings(item)]
    if isinstance(value, list):
        return [s for item in value for s in _strings(item)]
    return []


def _agent_run_options() -> set[str]:
    command: Any = typer.main.get_command(facefleet_app)
    agent = command.commands["agent"]
    assert hasattr(agent, "commands"), "`facefleet agent` must be a command group with `run`"
    run = agent.commands["run"]
    return {opt for param in run.params for opt in param.opts if opt.startswith("--")}


@pytest.fixture(scope="module")
def modules() -> dict[str, Module]:
    return {path.name: load_module(path) for path in ROOTS}


@pytest.mark.parametrize("path", list(all_tf_files()), ids=lambda p: str(p.relative_to(TERRAFORM_ROOT)))
def test_every_tf_file_parses(path: Path) -> None:
    with path.open() as handle:
        assert hcl2.load(handle), f"{path} parsed to nothing"


def test_expected_layout() -> None:
    for name in MODULES:
        for part in ("main.tf", "variables.tf", "outputs.tf", "versions.tf", "README.md"):
            assert (TERRAFORM_ROOT / "modules" / name / part).is_file(), f"{name}/{part} missing"
    for name in ("aws-spot-agents", "azure-spot-agents"):
        assert (TERRAFORM_ROOT / "modules" / name / "templates" / "agent-boot.sh.tftpl").is_file()


@pytest.mark.parametrize("root", ROOTS, ids=lambda p: p.name)
def test_variables_are_typed_and_described(root: Path, modules: dict[str, Module]) -> None:
    variables = modules[root.name].named("variable")
    assert variables, f"{root} declares no variables"
    for name, body in variables.items():
        assert body.get("type"), f"{root.name}: variable {name!r} has no type"
        assert len(str(body.get("description", ""))) >= 10, f"{root.name}: variable {name!r} needs a description"


@pytest.mark.parametrize("root", ROOTS, ids=lambda p: p.name)
def test_outputs_are_described(root: Path, modules: dict[str, Module]) -> None:
    outputs = modules[root.name].named("output")
    assert outputs, f"{root} declares no outputs"
    for name, body in outputs.items():
        assert len(str(body.get("description", ""))) >= 10, f"{root.name}: output {name!r} needs a description"


@pytest.mark.parametrize("root", ROOTS, ids=lambda p: p.name)
def test_readme_documents_every_input_and_output(root: Path, modules: dict[str, Module]) -> None:
    readme = (root / "README.md").read_text()
    module = modules[root.name]
    for name in [*module.named("variable"), *module.named("output")]:
        assert f"`{name}`" in readme, f"{root.name}/README.md does not document `{name}`"


@pytest.mark.parametrize("root", ROOTS, ids=lambda p: p.name)
def test_every_variable_is_used_and_every_reference_declared(root: Path, modules: dict[str, Module]) -> None:
    module = modules[root.name]
    declared = set(module.named("variable"))
    text = module.text()
    referenced = set(re.findall(r"\bvar\.(\w+)", text))
    assert referenced <= declared, f"{root.name}: undeclared variables {sorted(referenced - declared)}"
    assert declared <= referenced, f"{root.name}: unused variables {sorted(declared - referenced)}"


@pytest.mark.parametrize("root", ROOTS, ids=lambda p: p.name)
def test_provider_versions_are_constrained(root: Path, modules: dict[str, Module]) -> None:
    terraform = modules[root.name].blocks["terraform"][0]
    assert terraform["required_version"].startswith(">=")
    for providers in terraform["required_providers"]:
        for name, spec in providers.items():
            assert spec["source"].startswith("hashicorp/"), name
            assert "<" in spec["version"], f"{root.name}: provider {name} needs an upper version bound"


# --- AWS ----------------------------------------------------------------------------------------


def test_aws_launch_template_is_spot_with_terminate_on_interruption(modules: dict[str, Module]) -> None:
    (template,) = modules[AWS.name].of_type("aws_launch_template")
    (market,) = template["instance_market_options"]
    assert market["market_type"] == "spot"
    (spot,) = market["spot_options"]
    assert spot["instance_interruption_behavior"] == "terminate"
    assert "var.spot_max_price" in spot["max_price"]
    (metadata,) = template["metadata_options"]
    assert metadata["http_tokens"] == "required", "IMDSv2 only"
    assert "agent-boot.sh.tftpl" in template["user_data"]
    assert "aws_iam_instance_profile.agent" in template["iam_instance_profile"][0]["arn"]


def test_aws_ingress_only_from_scheduler_on_grpc_port(modules: dict[str, Module]) -> None:
    module = modules[AWS.name]
    (group,) = module.of_type("aws_security_group")
    assert "ingress" not in group and "egress" not in group, "use separate rule resources, no inline rules"
    assert not module.of_type("aws_security_group_rule"), "legacy rule resources bypass this check"
    rules = module.resources()
    ingress = {name: body for (rtype, name), body in rules.items() if rtype == "aws_vpc_security_group_ingress_rule"}
    assert ingress, "no ingress rules: the scheduler could not reach the agents"
    grpc_rules = {n: b for n, b in ingress.items() if b["from_port"] == "${var.agent_grpc_port}"}
    assert set(grpc_rules) == {"grpc_from_scheduler_cidr", "grpc_from_scheduler_sg"}
    for name, body in ingress.items():
        assert body["from_port"] == body["to_port"], f"{name}: one port per rule"
        source = body.get("cidr_ipv4") or body.get("referenced_security_group_id")
        if name in grpc_rules:
            assert source in ("${each.value}", "${var.scheduler_security_group_id}"), name
            assert "scheduler" in (body.get("for_each", "") + body.get("count", "") + source), name
        else:
            assert body["from_port"] == "${var.agent_metrics_port}", f"{name}: unexpected ingress port"
            assert body["for_each"] == "${toset(var.metrics_source_cidr_blocks)}", name
        assert "0.0.0.0/0" not in _strings(body), f"{name}: open to the world"


def test_aws_iam_policy_limited_to_task_bucket_and_tls_parameters(modules: dict[str, Module]) -> None:
    module = modules[AWS.name]
    policy = module.resources("data")[("aws_iam_policy_document", "agent")]
    statements = {s["sid"]: s for s in policy["statement"]}
    assert statements["TaskObjects"]["actions"] == ["s3:GetObject", "s3:PutObject"]
    assert statements["TaskObjects"]["resources"] == ["${local.bucket_arn}/*"]
    assert statements["TaskBucketList"]["actions"] == ["s3:ListBucket"]
    assert statements["TaskBucketList"]["resources"] == ["${local.bucket_arn}"]
    assert statements["AgentTLSParameters"]["actions"] == ["ssm:GetParameter"]
    assert statements["AgentTLSParameters"]["resources"] == "${local.tls_parameter_arns}"
    assert set(statements) == {"TaskObjects", "TaskBucketList", "AgentTLSParameters"}
    for statement in statements.values():
        assert statement["effect"] == "Allow"
        assert not any("*" in action for action in statement["actions"]), "no wildcard actions"
    (kms,) = [d["statement"] for d in policy["dynamic"]]
    (kms_content,) = kms["content"]
    assert kms_content["actions"] == ["kms:Decrypt"]
    assert kms_content["condition"][0]["variable"] == "kms:ViaService"
    # The locals the statements use: exactly the bucket, and exactly three named parameters.
    text = module.text()
    assert 's3:::${var.task_bucket_name}"' in text
    assert 'tls_parameter_names = ["ca.pem", "agent.pem", "agent-key.pem"]' in text
    # Exactly one inline policy, no managed policy attachments that could widen it.
    assert len(module.of_type("aws_iam_role_policy")) == 1
    assert not module.of_type("aws_iam_role_policy_attachment")
    assert not module.of_type("aws_iam_policy")


# --- Azure --------------------------------------------------------------------------------------


def test_azure_scale_set_is_spot_with_price_and_eviction(modules: dict[str, Module]) -> None:
    module = modules[AZURE.name]
    (scale_set,) = module.of_type("azurerm_linux_virtual_machine_scale_set")
    assert scale_set["priority"] == "Spot"
    assert scale_set["max_bid_price"] == "${var.max_bid_price}"
    assert scale_set["eviction_policy"] == "${var.eviction_policy}"
    assert scale_set["disable_password_authentication"] is True
    assert "agent-boot.sh.tftpl" in scale_set["custom_data"]
    (nic,) = scale_set["network_interface"]
    assert nic["network_security_group_id"] == "${azurerm_network_security_group.agents.id}"
    eviction = module.named("variable")["eviction_policy"]
    assert "Delete" in eviction["validation"][0]["condition"]
    assert "Deallocate" in eviction["validation"][0]["condition"]


def test_azure_nsg_allows_only_scheduler_and_denies_the_rest(modules: dict[str, Module]) -> None:
    (nsg,) = modules[AZURE.name].of_type("azurerm_network_security_group")
    rules = list(nsg["security_rule"]) + [d["security_rule"]["content"][0] for d in nsg.get("dynamic", [])]
    inbound_allow = [r for r in rules if r["direction"] == "Inbound" and r["access"] == "Allow"]
    by_port = {r["destination_port_range"]: r for r in inbound_allow}
    assert set(by_port) == {"${tostring(var.agent_grpc_port)}", "${tostring(var.agent_metrics_port)}"}
    assert by_port["${tostring(var.agent_grpc_port)}"]["source_address_prefixes"] == (
        "${var.scheduler_source_address_prefixes}"
    )
    assert by_port["${tostring(var.agent_metrics_port)}"]["source_address_prefixes"] == (
        "${var.metrics_source_address_prefixes}"
    )
    for rule in inbound_allow:
        assert "source_address_prefix" not in rule, f"{rule['name']}: wildcard source"
    (deny,) = [r for r in rules if r["access"] == "Deny"]
    assert deny["direction"] == "Inbound" and deny["source_address_prefix"] == "*"
    assert deny["priority"] > max(r["priority"] for r in inbound_allow)
    assert deny["priority"] < 65000, "must come before Azure's DefaultAllowVnetInBound"


def test_azure_identity_scoped_to_container_and_tls_secrets(modules: dict[str, Module]) -> None:
    assignments = modules[AZURE.name].of_type("azurerm_role_assignment")
    scopes = {a["role_definition_name"]: a["scope"] for a in assignments}
    assert scopes == {
        "Storage Blob Data Contributor": "${var.task_storage_container_id}",
        "Key Vault Secrets User": "${var.tls_key_vault_id}/secrets/${each.value}",
    }


# --- Consul KV ----------------------------------------------------------------------------------


def test_consul_rules_module_owns_only_the_rules_key(modules: dict[str, Module]) -> None:
    """consul_key_prefix refuses a prefix that already has keys (apply fails after seed_kv.py) and
    deletes keys it does not list (caps set with `facefleet budget set`): no module may use it."""
    for name, module in modules.items():
        assert not module.of_type("consul_key_prefix"), f"{name} uses consul_key_prefix"
    (rules,) = modules[CONSUL.name].of_type("consul_keys")
    (key,) = rules["key"]
    assert key == {"path": "${var.kv_prefix}rules", "value": "${file(local.rules_file)}", "delete": False}
    assert rules["datacenter"] == "${var.datacenter}"
    assert modules[CONSUL.name].named("variable")["kv_prefix"]["default"] == "facefleet/"


def test_terraform_and_the_cli_never_write_the_same_key(modules: dict[str, Module]) -> None:
    """One owner per key: Terraform the rules, `facefleet budget set` / `lock` budgets and locks."""
    prefix = "facefleet/"
    terraform_keys = {
        entry["path"].replace("${var.kv_prefix}", prefix)
        for module in modules.values()
        for resource in module.of_type("consul_keys")
        for entry in resource["key"]
    }
    with ConsulKVDouble() as double:
        source = ConsulRuleSource(resolve_endpoint(double.address, environ={}), prefix)
        source.set_budget("marketing", 10, 80)
        source.set_lock("film-x", "talent contract", "compliance")
        cli_keys = set(double.store.entries)
    assert terraform_keys == {f"{prefix}rules"}
    assert cli_keys == {f"{prefix}budgets/marketing", f"{prefix}locks/film-x"}
    assert not terraform_keys & cli_keys


def test_consul_rules_datacenter_reaches_the_scheduler(
    modules: dict[str, Module], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The module's `datacenter` has a scheduler counterpart ([policy] consul_dc) in its output."""
    output = modules[CONSUL.name].named("output")["scheduler_environment"]["value"]
    assert "FACEFLEET_POLICY__CONSUL_DC = var.datacenter" in output
    assert "FACEFLEET_POLICY__CONSUL_PREFIX = var.kv_prefix" in output
    sample = {"SOURCE": "consul", "CONSUL_PREFIX": "studio/", "CONSUL_DC": "eu-west"}
    names = set(re.findall(r"FACEFLEET_POLICY__(\w+)", output))
    assert names == set(sample)
    for name in names:
        monkeypatch.setenv(f"FACEFLEET_POLICY__{name}", sample[name])
    policy = Settings().policy  # the scheduler reads exactly these variables
    assert (policy.source, policy.consul_prefix, policy.consul_dc) == ("consul", "studio/", "eu-west")
    hybrid = modules["hybrid"]
    assert hybrid.named("module")["rules"]["datacenter"] == "${var.consul_datacenter}"
    assert hybrid.named("output")["scheduler_policy_environment"]["value"] == "${module.rules.scheduler_environment}"


def test_hybrid_example_uses_all_three_modules(modules: dict[str, Module]) -> None:
    calls = modules["hybrid"].named("module")
    sources = {body["source"] for body in calls.values()}
    assert sources == {f"../../modules/{name}" for name in MODULES}
    for name, body in calls.items():
        module_vars = modules[Path(body["source"]).name].named("variable")
        passed = set(body) - {"source"}
        assert passed <= set(module_vars), f"module {name}: unknown inputs {sorted(passed - set(module_vars))}"
        required = {v for v, spec in module_vars.items() if "default" not in spec}
        assert required <= passed, f"module {name}: missing required inputs {sorted(required - passed)}"


# --- boot scripts -------------------------------------------------------------------------------


@pytest.mark.parametrize(("root", "provider"), [(AWS, "aws"), (AZURE, "azure")], ids=["aws", "azure"])
def test_boot_script_template_matches_templatefile_call(root: Path, provider: str) -> None:
    template = (root / "templates" / "agent-boot.sh.tftpl").read_text()
    main = (root / "main.tf").read_text()
    call = main[main.index("templatefile(") :]
    call = call[: call.index("}))")]
    passed = set(re.findall(r"^\s+(\w+)\s+=", call, flags=re.MULTILINE))
    assert template_variables(template) == passed, "template variables and templatefile() map differ"


@pytest.mark.parametrize(("root", "provider"), [(AWS, "aws"), (AZURE, "azure")], ids=["aws", "azure"])
def test_boot_script_runs_the_real_agent_command(root: Path, provider: str) -> None:
    rendered = render_template((root / "templates" / "agent-boot.sh.tftpl").read_text(), SAMPLE_TEMPLATE_VALUES)
    (exec_line,) = [line for line in rendered.splitlines() if line.startswith("ExecStart=")]
    argv = shlex.split(exec_line.removeprefix("ExecStart="))
    assert argv[:3] == ["/usr/local/bin/facefleet", "agent", "run"]
    flags = {arg for arg in argv if arg.startswith("--")}
    known = _agent_run_options()
    assert flags <= known, f"boot script passes flags `facefleet agent run` lacks: {sorted(flags - known)}"
    values = dict(zip(argv[3::2], argv[4::2], strict=True))
    assert values["--trust-zone"] == "cloud"
    assert values["--provider"] == provider
    for required in ("--pool", "--scheduler", "--models", "--tls-dir", "--listen"):
        assert required in values, f"boot script does not pass {required}"
    assert "--insecure" not in flags


@pytest.mark.parametrize("root", [AWS, AZURE], ids=["aws", "azure"])
def test_rendered_boot_script_passes_shellcheck(root: Path, tmp_path: Path) -> None:
    rendered = render_template((root / "templates" / "agent-boot.sh.tftpl").read_text(), SAMPLE_TEMPLATE_VALUES)
    script = tmp_path / "boot.sh"
    script.write_text(rendered)
    result = subprocess.run(
        [SHELLCHECK, "--shell=bash", "--severity=style", str(script)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
    syntax = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True, check=False)
    assert syntax.returncode == 0, syntax.stderr


def test_render_template_rejects_unknown_variables() -> None:
    with pytest.raises(KeyError, match="nope"):
        render_template("echo ${nope}", {})
    assert render_template("a=$${HOME} b=${x}", {"x": 1}) == "a=${HOME} b=1"
