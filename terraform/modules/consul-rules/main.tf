# One owner per Consul key. This module owns `<kv_prefix>rules` and nothing else: the rule set is
# reviewed in Git and applied with Terraform. Budgets (`<kv_prefix>budgets/<name>`) and project
# locks (`<kv_prefix>locks/<project>`) are run-time data owned by `facefleet budget set` and
# `facefleet lock`/`unlock`, which audit every change; Terraform never writes or deletes them, so
# a cap finance set yesterday survives today's apply. Seed their first values with
# `deploy/consul/seed_kv.py --no-rules POLICY_DIR`, which only creates keys that do not exist.
locals {
  rules_file = "${var.policy_dir}/rules.yaml"
}

# The active rule set, byte for byte. The scheduler validates every change and keeps the last
# good set on error. consul_keys writes the one key it declares (an existing value is replaced,
# e.g. one written by seed_kv.py), unlike consul_key_prefix, which refuses a prefix that already
# has keys and would delete every key under it that it does not list.
resource "consul_keys" "rules" {
  datacenter = var.datacenter

  key {
    path   = "${var.kv_prefix}rules"
    value  = file(local.rules_file)
    delete = false # destroying this module leaves the rules: a scheduler keeps working
  }

  lifecycle {
    precondition {
      condition     = fileexists(local.rules_file)
      error_message = "No rules.yaml in policy_dir; point policy_dir at a directory laid out like policies/default."
    }
  }
}
