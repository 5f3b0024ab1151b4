locals {
  rules_file   = "${var.policy_dir}/rules.yaml"
  budgets_file = "${var.policy_dir}/budgets.yaml"
  locks_file   = "${var.policy_dir}/locks.yaml"

  # budgets.yaml: `budgets: [{name, monthly_cap_usd, alert_pct}]` -> one key per account.
  budget_entries = fileexists(local.budgets_file) ? try(yamldecode(file(local.budgets_file)).budgets, []) : []
  budgets = {
    for entry in local.budget_entries : entry.name => yamlencode({
      monthly_cap_usd = entry.monthly_cap_usd
      alert_pct       = try(entry.alert_pct, 80)
    })
  }

  # locks.yaml: `locks: [{project, reason, by}]` -> one key per locked project.
  lock_entries = fileexists(local.locks_file) ? try(yamldecode(file(local.locks_file)).locks, []) : []
  locks = {
    for entry in local.lock_entries : entry.project => yamlencode({
      reason = entry.reason
      by     = try(entry.by, "terraform")
    })
  }
}

# The active rule set, byte for byte. The scheduler validates every change and keeps the last
# good set on error.
resource "consul_keys" "rules" {
  datacenter = var.datacenter

  key {
    path  = "${var.kv_prefix}rules"
    value = file(local.rules_file)
  }

  lifecycle {
    precondition {
      condition     = fileexists(local.rules_file)
      error_message = "No rules.yaml in policy_dir; point policy_dir at a directory laid out like policies/default."
    }
  }
}

# One key per budget account; the prefix is owned here, so an account removed from budgets.yaml is deleted.
resource "consul_key_prefix" "budgets" {
  datacenter  = var.datacenter
  path_prefix = "${var.kv_prefix}budgets/"
  subkeys     = local.budgets
}

# Compliance locks per project. Owning the prefix makes Terraform the source of truth for locks;
# set manage_locks = false when operators lock and unlock projects with the CLI instead.
resource "consul_key_prefix" "locks" {
  count = var.manage_locks ? 1 : 0

  datacenter  = var.datacenter
  path_prefix = "${var.kv_prefix}locks/"
  subkeys     = local.locks
}
