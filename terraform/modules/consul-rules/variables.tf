variable "policy_dir" {
  type        = string
  description = "Policy directory to publish (layout of policies/default): rules.yaml, optional budgets.yaml and locks.yaml."
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
  description = "Consul datacenter to write to; null = the agent's own."
  default     = null
}

variable "manage_locks" {
  type        = bool
  description = "Publish locks.yaml from policy_dir and delete locks not in it. false = leave locks to `facefleet lock`/`unlock` at run time."
  default     = true
}
