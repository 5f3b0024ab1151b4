variable "name" {
  type        = string
  description = "Name prefix for all resources of this deployment."
  default     = "facefleet"
}

variable "policy_dir" {
  type        = string
  description = "Policy directory whose rules.yaml is published to Consul KV (budgets and locks are the CLI's)."
  default     = "../../../policies/default"
}

variable "consul_address" {
  type        = string
  description = "Consul HTTP address (host:port) the consul provider writes to; token via CONSUL_HTTP_TOKEN."
}

variable "consul_datacenter" {
  type        = string
  description = "Consul datacenter of the scheduler (its [policy] consul_dc, in the scheduler_policy_environment output)."
  default     = "dc1"
}

variable "scheduler_address" {
  type        = string
  description = "host:port of the on-prem scheduler's gRPC API as cloud agents reach it (VPN / Direct Connect / ExpressRoute)."
}

variable "scheduler_cidr_blocks" {
  type        = list(string)
  description = "On-prem CIDR blocks the scheduler connects to agents from."
}

variable "prometheus_cidr_blocks" {
  type        = list(string)
  description = "CIDR blocks of Prometheus scraping the agents' metrics ports."
  default     = []
}

variable "aws_region" {
  type        = string
  description = "AWS region of the spot pool, e.g. eu-west-1."
}

variable "aws_vpc_id" {
  type        = string
  description = "VPC for the AWS agents."
}

variable "aws_subnet_ids" {
  type        = list(string)
  description = "Private subnets for the AWS agents."
}

variable "aws_ami_id" {
  type        = string
  description = "Ubuntu 24.04 GPU AMI with NVIDIA drivers, python3 and the AWS CLI."
}

variable "aws_instance_type" {
  type        = string
  description = "EC2 GPU instance type for the AWS pool."
  default     = "g5.xlarge"
}

variable "aws_spot_max_price" {
  type        = string
  description = "AWS spot price cap in USD/hour; empty = on-demand price."
  default     = "0.60"
}

variable "task_bucket_name" {
  type        = string
  description = "S3 bucket for cloud task inputs/outputs and the models prefix."
}

variable "aws_tls_ssm_parameter_prefix" {
  type        = string
  description = "SSM path with the agent's ca.pem, agent.pem, agent-key.pem SecureStrings."
  default     = "/facefleet/agent-tls"
}

variable "azure_subscription_id" {
  type        = string
  description = "Azure subscription of the Azure spot pool."
}

variable "azure_resource_group_name" {
  type        = string
  description = "Existing resource group for the Azure agents."
}

variable "azure_location" {
  type        = string
  description = "Azure region of the spot pool, e.g. westeurope."
}

variable "azure_subnet_id" {
  type        = string
  description = "ARM id of the subnet for the Azure agents."
}

variable "azure_vm_size" {
  type        = string
  description = "Azure GPU VM size."
  default     = "Standard_NC4as_T4_v3"
}

variable "azure_max_bid_price" {
  type        = number
  description = "Azure spot price cap in USD/hour; -1 = on-demand price."
  default     = 0.6
}

variable "azure_admin_ssh_public_key" {
  type        = string
  description = "OpenSSH public key for the Azure VMs' admin user."
}

variable "azure_task_storage_container_id" {
  type        = string
  description = "ARM id of the blob container for Azure task inputs/outputs and models."
}

variable "azure_models_blob_url" {
  type        = string
  description = "https URL of the models folder in that container."
}

variable "azure_tls_key_vault_id" {
  type        = string
  description = "ARM id of the Key Vault with the agent TLS secrets."
}

variable "azure_tls_key_vault_uri" {
  type        = string
  description = "URI of that Key Vault."
}
