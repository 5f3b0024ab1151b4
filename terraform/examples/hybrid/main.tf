# Hybrid facefleet: an on-prem scheduler (and on-prem private pools, not managed here), the rule
# set in Consul KV (budgets and locks there are the CLI's), and two burst pools on spot GPUs in AWS
# and Azure.
# The pool names must match the scheduler's [[cloud.pools]] entries.

module "rules" {
  source = "../../modules/consul-rules"

  policy_dir = var.policy_dir
  kv_prefix  = "facefleet/"
  datacenter = var.consul_datacenter
}

module "aws_agents" {
  source = "../../modules/aws-spot-agents"

  name                       = "${var.name}-aws"
  pool                       = "aws-spot"
  vpc_id                     = var.aws_vpc_id
  subnet_ids                 = var.aws_subnet_ids
  ami_id                     = var.aws_ami_id
  instance_type              = var.aws_instance_type
  spot_max_price             = var.aws_spot_max_price
  scheduler_address          = var.scheduler_address
  scheduler_cidr_blocks      = var.scheduler_cidr_blocks
  metrics_source_cidr_blocks = var.prometheus_cidr_blocks
  task_bucket_name           = var.task_bucket_name
  tls_ssm_parameter_prefix   = var.aws_tls_ssm_parameter_prefix
  tags                       = { "facefleet:deployment" = var.name }
}

module "azure_agents" {
  source = "../../modules/azure-spot-agents"

  name                              = "${var.name}-az"
  pool                              = "azure-spot"
  resource_group_name               = var.azure_resource_group_name
  location                          = var.azure_location
  subnet_id                         = var.azure_subnet_id
  vm_size                           = var.azure_vm_size
  max_bid_price                     = var.azure_max_bid_price
  eviction_policy                   = "Delete"
  admin_ssh_public_key              = var.azure_admin_ssh_public_key
  scheduler_address                 = var.scheduler_address
  scheduler_source_address_prefixes = var.scheduler_cidr_blocks
  metrics_source_address_prefixes   = var.prometheus_cidr_blocks
  task_storage_container_id         = var.azure_task_storage_container_id
  models_blob_url                   = var.azure_models_blob_url
  tls_key_vault_id                  = var.azure_tls_key_vault_id
  tls_key_vault_uri                 = var.azure_tls_key_vault_uri
  tags                              = { "facefleet-deployment" = var.name }
}
