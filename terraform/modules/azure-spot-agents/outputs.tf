output "scale_set_id" {
  description = "ARM id of the spot scale set the scheduler's provisioner scales."
  value       = azurerm_linux_virtual_machine_scale_set.agents.id
}

output "scale_set_name" {
  description = "Name of the spot scale set."
  value       = azurerm_linux_virtual_machine_scale_set.agents.name
}

output "network_security_group_id" {
  description = "NSG of the agents (gRPC from the scheduler only, everything else inbound denied)."
  value       = azurerm_network_security_group.agents.id
}

output "identity_principal_id" {
  description = "Principal id of the agents' managed identity (task container and TLS secrets only)."
  value       = azurerm_user_assigned_identity.agent.principal_id
}

output "identity_client_id" {
  description = "Client id of the agents' managed identity."
  value       = azurerm_user_assigned_identity.agent.client_id
}
