output "launch_template_id" {
  description = "Launch template id; put it in the scheduler's [cloud.aws] launch_template when the provisioner launches instances."
  value       = aws_launch_template.agent.id
}

output "launch_template_name" {
  description = "Launch template name (accepted by [cloud.aws] launch_template too)."
  value       = aws_launch_template.agent.name
}

output "launch_template_latest_version" {
  description = "Latest launch template version."
  value       = aws_launch_template.agent.latest_version
}

output "security_group_id" {
  description = "Security group of the agents; allow it as a source on the scheduler's gRPC port."
  value       = aws_security_group.agents.id
}

output "iam_role_arn" {
  description = "IAM role the agents run as (task bucket and agent TLS parameters only)."
  value       = aws_iam_role.agent.arn
}

output "instance_profile_name" {
  description = "Instance profile name for the scheduler's [cloud.aws] instance_profile."
  value       = aws_iam_instance_profile.agent.name
}

output "autoscaling_group_name" {
  description = "Autoscaling group name, or null when create_autoscaling_group is false."
  value       = try(aws_autoscaling_group.agents[0].name, null)
}
