"""Where rules, budgets and locks come from: a watched directory (default) or Consul KV."""

from facefleet.scheduler.rules_source.base import ActiveConfig, RuleSource
from facefleet.scheduler.rules_source.consul import ConsulRuleSource
from facefleet.scheduler.rules_source.files import FileRuleSource, default_policy_dir, read_policy_dir

__all__ = ["ActiveConfig", "ConsulRuleSource", "FileRuleSource", "RuleSource", "default_policy_dir", "read_policy_dir"]
