variable "policy_dir" {
  type        = string
  description = "Policy directory whose rules.yaml is published (layout of policies/default); its budgets.yaml and locks.yaml are not: the CLI owns those keys."
}

variable "kv_prefix" {
  type        = string
  description = "Consul KV prefix the scheduler watches (its [policy] consul_prefix); must end with /."
  default     = "facefleet/"

  validation {
    condition     = endswith(var.kv_prefix, "/") && !startswith(var.kv_prefix, "/")
    error_message = "kv_prefix must end with / and not start with /, e.g. facefleet/."
  }
}

variable "datacenter" {
  type        = string
  description = "Consul datacenter to write to; null = the agent's own. The scheduler must read the same one ([policy] consul_dc; see the scheduler_environment output)."
  default     = null
}
