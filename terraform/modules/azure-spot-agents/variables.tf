variable "name" {
  type        = string
  description = "Name prefix for the scale set, network security group and identity."
}

variable "pool" {
  type        = string
  description = "facefleet pool these agents serve (the agent's --pool); must match the scheduler's cloud pool name."
}

variable "resource_group_name" {
  type        = string
  description = "Existing resource group for every resource of this module."
}

variable "location" {
  type        = string
  description = "Azure region, e.g. westeurope; also passed to the agent as --region."
}

variable "subnet_id" {
  type        = string
  description = "Full ARM id of the subnet the agents join; the module associates its NSG with it."
}

variable "vm_size" {
  type        = string
  description = "GPU VM size, e.g. Standard_NC4as_T4_v3."
  default     = "Standard_NC4as_T4_v3"
}

variable "instances" {
  type        = number
  description = "Initial instance count (the scheduler's provisioner scales the set at run time)."
  default     = 0
}

variable "max_bid_price" {
  type        = number
  description = "Highest spot price in USD/hour; -1 = up to the on-demand price, never evicted for price."
  default     = -1

  validation {
    condition     = var.max_bid_price == -1 || var.max_bid_price > 0
    error_message = "max_bid_price must be -1 or a positive price in USD/hour."
  }
}

variable "eviction_policy" {
  type        = string
  description = "What Azure does to an evicted spot VM: Delete (nothing billed after eviction) or Deallocate (disk kept)."
  default     = "Delete"

  validation {
    condition     = contains(["Delete", "Deallocate"], var.eviction_policy)
    error_message = "eviction_policy must be Delete or Deallocate."
  }
}

variable "source_image" {
  type = object({
    publisher = string
    offer     = string
    sku       = string
    version   = string
  })
  description = "Marketplace image with NVIDIA drivers and python3 (facefleet is installed at boot when missing)."
  default = {
    publisher = "microsoft-dsvm"
    offer     = "ubuntu-hpc"
    sku       = "2404"
    version   = "latest"
  }
}

variable "admin_username" {
  type        = string
  description = "Admin user created on the VMs (SSH key login only)."
  default     = "facefleet"
}

variable "admin_ssh_public_key" {
  type        = string
  description = "OpenSSH public key for admin_username; password login is disabled."
}

variable "scheduler_address" {
  type        = string
  description = "host:port agents dial for the scheduler's gRPC API (the agent's --scheduler)."
}

variable "scheduler_source_address_prefixes" {
  type        = list(string)
  description = "CIDR prefixes of the scheduler; the only sources allowed to reach the agent gRPC port."

  validation {
    condition     = length(var.scheduler_source_address_prefixes) > 0
    error_message = "Give at least one scheduler CIDR prefix; without one the scheduler cannot reach the agents."
  }
}

variable "metrics_source_address_prefixes" {
  type        = list(string)
  description = "CIDR prefixes of Prometheus allowed to scrape the agent metrics port; empty = no metrics ingress."
  default     = []
}

variable "agent_grpc_port" {
  type        = number
  description = "Agent gRPC port (the agent's --listen port)."
  default     = 50061
}

variable "agent_metrics_port" {
  type        = number
  description = "Agent Prometheus /metrics port (the agent's --metrics-port)."
  default     = 9465
}

variable "slots" {
  type        = number
  description = "Tasks one agent runs at the same time (the agent's --slots)."
  default     = 1

  validation {
    condition     = var.slots >= 1
    error_message = "slots must be at least 1."
  }
}

variable "task_storage_container_id" {
  type        = string
  description = "ARM id of the blob container with task inputs/outputs and models; the VMs' identity gets data access to it only."
}

variable "models_blob_url" {
  type        = string
  description = "https URL of the models folder in the task container, synced to the models directory at boot."
}

variable "tls_key_vault_id" {
  type        = string
  description = "ARM id of the Key Vault holding secrets facefleet-agent-ca, facefleet-agent-cert and facefleet-agent-key."
}

variable "tls_key_vault_uri" {
  type        = string
  description = "Key Vault URI, e.g. https://my-vault.vault.azure.net/ (trailing slash optional)."
}

variable "agent_package" {
  type        = string
  description = "pip requirement installed at first boot when the image has no facefleet, e.g. \"facefleet[gpu]==0.1.0\"."
  default     = "facefleet[gpu]==0.1.0"
}

variable "tags" {
  type        = map(string)
  description = "Tags added to every resource."
  default     = {}
}
