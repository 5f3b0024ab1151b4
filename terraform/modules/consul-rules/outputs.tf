output "rules_key" {
  description = "Consul KV key holding the rule set (the only key this module owns)."
  value       = "${var.kv_prefix}rules"
}

output "scheduler_environment" {
  description = "Environment for the scheduler so it watches what this module writes: source, prefix and datacenter ([policy] consul_* settings)."
  value = merge(
    {
      FACEFLEET_POLICY__SOURCE        = "consul"
      FACEFLEET_POLICY__CONSUL_PREFIX = var.kv_prefix
    },
    var.datacenter == null ? {} : { FACEFLEET_POLICY__CONSUL_DC = var.datacenter },
  )
}
