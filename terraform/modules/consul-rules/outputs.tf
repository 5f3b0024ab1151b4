output "rules_key" {
  description = "Consul KV key holding the rule set."
  value       = "${var.kv_prefix}rules"
}

output "budget_keys" {
  description = "Consul KV keys written for budget accounts, by account name."
  value       = { for name in keys(local.budgets) : name => "${var.kv_prefix}budgets/${name}" }
}

output "lock_keys" {
  description = "Consul KV keys written for project locks, by project (empty when manage_locks is false)."
  value       = var.manage_locks ? { for name in keys(local.locks) : name => "${var.kv_prefix}locks/${name}" } : {}
}
