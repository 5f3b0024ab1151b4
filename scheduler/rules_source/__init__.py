"""Where rules, budgets and locks come from: a watched directory (default) or Consul KV."""

from facefleet.scheduler.rules_source.base import ActiveConfig, RuleSource, SourceError
from facefleet.scheduler.rules_source.consul import ConsulError, ConsulRuleSource
from facefleet.scheduler.rules_source.consul_endpoint import ConsulEndpoint, ConsulSettingsError, resolve_endpoint
from facefleet.scheduler.rules_source.files import FileRuleSource, default_policy_dir, read_policy_dir

__all__ = [
    "ActiveConfig",
    "ConsulEndpoint",
    "ConsulError",
    "ConsulRuleSource",
    "ConsulSettingsError",
    "FileRuleSource",
    "RuleSource",
    "SourceError",
    "default_policy_dir",
    "read_policy_dir",
    "resolve_endpoint",
]
