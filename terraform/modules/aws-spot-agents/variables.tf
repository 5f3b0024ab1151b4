variable "name" {
  type        = string
  description = "Name prefix for every resource (launch template, security group, IAM role)."
}

variable "pool" {
  type        = string
  description = "facefleet pool these agents serve (the agent's --pool); must match the scheduler's cloud pool name."
}

variable "vpc_id" {
  type        = string
  description = "VPC the agents run in."
}

variable "subnet_ids" {
  type        = list(string)
  description = "Private subnets for the autoscaling group (used only when create_autoscaling_group is true)."
  default     = []
}

variable "ami_id" {
  type        = string
  description = "GPU AMI with NVIDIA drivers and python3 (e.g. a Deep Learning Base AMI). facefleet is installed at boot when missing."
}

variable "instance_type" {
  type        = string
  description = "EC2 GPU instance type, e.g. g5.xlarge."
  default     = "g5.xlarge"
}

variable "spot_max_price" {
  type        = string
  description = "Highest spot price in USD/hour as a decimal string; empty string = capped at the on-demand price."
  default     = ""

  validation {
    condition     = var.spot_max_price == "" || can(tonumber(var.spot_max_price))
    error_message = "spot_max_price must be empty or a decimal number such as \"0.45\"."
  }
}

variable "scheduler_address" {
  type        = string
  description = "host:port agents dial for the scheduler's gRPC API (the agent's --scheduler)."
}

variable "scheduler_cidr_blocks" {
  type        = list(string)
  description = "CIDR blocks of the scheduler; the only sources allowed to reach the agent gRPC port."
  default     = []
}

variable "scheduler_security_group_id" {
  type        = string
  description = "Security group of the scheduler; allowed to reach the agent gRPC port. null = use scheduler_cidr_blocks only."
  default     = null
}

variable "metrics_source_cidr_blocks" {
  type        = list(string)
  description = "CIDR blocks of Prometheus allowed to scrape the agent metrics port; empty = no metrics ingress."
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

variable "scheduler_grpc_port" {
  type        = number
  description = "Scheduler gRPC port agents connect out to (egress rule)."
  default     = 50051
}

variable "https_egress_cidr_blocks" {
  type        = list(string)
  description = "Destinations agents may reach on 443 (S3, SSM, package index at first boot). Narrow to VPC endpoints when you have them."
  default     = ["0.0.0.0/0"]
}

variable "task_bucket_name" {
  type        = string
  description = "S3 bucket holding task inputs/outputs and the models prefix; the instance role may use only this bucket."
}

variable "models_s3_prefix" {
  type        = string
  description = "Key prefix in the task bucket synced to the agent's models directory at boot (manifest.toml + weights)."
  default     = "models/"
}

variable "tls_ssm_parameter_prefix" {
  type        = string
  description = "SSM Parameter Store path holding SecureString parameters ca.pem, agent.pem and agent-key.pem, e.g. /facefleet/agent-tls."

  validation {
    condition     = startswith(var.tls_ssm_parameter_prefix, "/") && !endswith(var.tls_ssm_parameter_prefix, "/")
    error_message = "tls_ssm_parameter_prefix must start with / and not end with /, e.g. /facefleet/agent-tls."
  }
}

variable "tls_kms_key_arn" {
  type        = string
  description = "Customer-managed KMS key encrypting the TLS parameters; null when they use the AWS-managed aws/ssm key."
  default     = null
}

variable "agent_package" {
  type        = string
  description = "pip requirement installed at first boot when the AMI has no facefleet, e.g. \"facefleet[gpu]==0.1.0\" or a wheel URL."
  default     = "facefleet[gpu]==0.1.0"
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

variable "root_volume_size_gb" {
  type        = number
  description = "Root EBS volume size in GiB (models, work files, checkpoints)."
  default     = 100
}

variable "create_autoscaling_group" {
  type        = bool
  description = "Create an autoscaling group from the launch template. false = the scheduler's provisioner launches instances from the template itself."
  default     = false
}

variable "min_size" {
  type        = number
  description = "Autoscaling group minimum size."
  default     = 0
}

variable "max_size" {
  type        = number
  description = "Autoscaling group maximum size."
  default     = 4
}

variable "desired_capacity" {
  type        = number
  description = "Autoscaling group desired capacity (the scheduler may change it at run time)."
  default     = 0
}

variable "tags" {
  type        = map(string)
  description = "Tags added to every resource and to launched instances."
  default     = {}
}
