output "aws_launch_template_id" {
  description = "For the scheduler's [cloud.aws] launch_template."
  value       = module.aws_agents.launch_template_id
}

output "aws_instance_profile_name" {
  description = "For the scheduler's [cloud.aws] instance_profile."
  value       = module.aws_agents.instance_profile_name
}

output "aws_agent_security_group_id" {
  description = "Agent security group; allow it on the scheduler side if the scheduler also runs in AWS."
  value       = module.aws_agents.security_group_id
}

output "azure_scale_set_id" {
  description = "Azure spot scale set the scheduler's provisioner scales."
  value       = module.azure_agents.scale_set_id
}

output "consul_rules_key" {
  description = "Consul KV key with the active rule set."
  value       = module.rules.rules_key
}

output "scheduler_policy_environment" {
  description = "FACEFLEET_POLICY__* variables for the scheduler: watch the prefix and datacenter the rules were written to."
  value       = module.rules.scheduler_environment
}
