locals {
  common_tags = merge(var.tags, {
    "facefleet-pool"       = var.pool
    "facefleet-trust-zone" = "cloud"
  })

  tls_secret_names = ["facefleet-agent-ca", "facefleet-agent-cert", "facefleet-agent-key"]
}

# --- identity: the task container and the agent's own TLS secrets, nothing else ---------------

resource "azurerm_user_assigned_identity" "agent" {
  name                = "${var.name}-agent"
  resource_group_name = var.resource_group_name
  location            = var.location
  tags                = local.common_tags
}

resource "azurerm_role_assignment" "task_container" {
  scope                = var.task_storage_container_id
  role_definition_name = "Storage Blob Data Contributor"
  principal_id         = azurerm_user_assigned_identity.agent.principal_id
  description          = "facefleet agents (pool ${var.pool}): read inputs and models, write outputs"
}

resource "azurerm_role_assignment" "tls_secrets" {
  for_each = toset(local.tls_secret_names)

  scope                = "${var.tls_key_vault_id}/secrets/${each.value}"
  role_definition_name = "Key Vault Secrets User"
  principal_id         = azurerm_user_assigned_identity.agent.principal_id
  description          = "facefleet agents (pool ${var.pool}): read their mTLS material"
}

# --- network: only the scheduler reaches the agent's gRPC port --------------------------------

resource "azurerm_network_security_group" "agents" {
  name                = "${var.name}-agents"
  resource_group_name = var.resource_group_name
  location            = var.location
  tags                = local.common_tags

  security_rule {
    name                       = "agent-grpc-from-scheduler"
    description                = "agent gRPC from the scheduler only"
    priority                   = 100
    direction                  = "Inbound"
    access                     = "Allow"
    protocol                   = "Tcp"
    source_port_range          = "*"
    destination_port_range     = tostring(var.agent_grpc_port)
    source_address_prefixes    = var.scheduler_source_address_prefixes
    destination_address_prefix = "*"
  }

  dynamic "security_rule" {
    for_each = length(var.metrics_source_address_prefixes) > 0 ? [1] : []
    content {
      name                       = "agent-metrics-from-prometheus"
      description                = "agent /metrics from Prometheus"
      priority                   = 110
      direction                  = "Inbound"
      access                     = "Allow"
      protocol                   = "Tcp"
      source_port_range          = "*"
      destination_port_range     = tostring(var.agent_metrics_port)
      source_address_prefixes    = var.metrics_source_address_prefixes
      destination_address_prefix = "*"
    }
  }

  # Azure's default rules allow all inbound traffic from the virtual network; override them.
  security_rule {
    name                       = "deny-all-other-inbound"
    description                = "nothing else reaches the agents, not even the rest of the VNet"
    priority                   = 4096
    direction                  = "Inbound"
    access                     = "Deny"
    protocol                   = "*"
    source_port_range          = "*"
    destination_port_range     = "*"
    source_address_prefix      = "*"
    destination_address_prefix = "*"
  }
}

# --- the scale set: Spot priority, max price, eviction policy, boot script ----------------------

resource "azurerm_linux_virtual_machine_scale_set" "agents" {
  name                = "${var.name}-agents"
  resource_group_name = var.resource_group_name
  location            = var.location
  sku                 = var.vm_size
  instances           = var.instances
  admin_username      = var.admin_username
  upgrade_mode        = "Manual"
  overprovision       = false

  priority        = "Spot"
  max_bid_price   = var.max_bid_price
  eviction_policy = var.eviction_policy

  disable_password_authentication = true

  # Temp disk and disk caches encrypted on the host too (task media passes through them). Needs the
  # subscription feature Microsoft.Compute/EncryptionAtHost registered (docs/deploy.md).
  encryption_at_host_enabled = true

  admin_ssh_key {
    username   = var.admin_username
    public_key = var.admin_ssh_public_key
  }

  source_image_reference {
    publisher = var.source_image.publisher
    offer     = var.source_image.offer
    sku       = var.source_image.sku
    version   = var.source_image.version
  }

  os_disk {
    caching              = "ReadWrite"
    storage_account_type = "Premium_LRS"
    disk_size_gb         = 128
  }

  identity {
    type         = "UserAssigned"
    identity_ids = [azurerm_user_assigned_identity.agent.id]
  }

  network_interface {
    name                      = "${var.name}-agent-nic"
    primary                   = true
    network_security_group_id = azurerm_network_security_group.agents.id

    ip_configuration {
      name      = "internal"
      primary   = true
      subnet_id = var.subnet_id
    }
  }

  custom_data = base64encode(templatefile("${path.module}/templates/agent-boot.sh.tftpl", {
    pool              = var.pool
    region            = var.location
    scheduler_address = var.scheduler_address
    grpc_port         = var.agent_grpc_port
    metrics_port      = var.agent_metrics_port
    slots             = var.slots
    identity_client   = azurerm_user_assigned_identity.agent.client_id
    key_vault_uri     = trimsuffix(var.tls_key_vault_uri, "/")
    models_blob_url   = trimsuffix(var.models_blob_url, "/")
    agent_package     = var.agent_package
  }))

  tags = local.common_tags

  lifecycle {
    ignore_changes = [instances] # the scheduler's provisioner scales the set
  }

  depends_on = [azurerm_role_assignment.task_container, azurerm_role_assignment.tls_secrets]
}
