data "aws_region" "current" {}

data "aws_caller_identity" "current" {}

data "aws_partition" "current" {}

locals {
  common_tags = merge(var.tags, {
    "facefleet:pool"       = var.pool
    "facefleet:trust-zone" = "cloud"
  })

  tls_parameter_names = ["ca.pem", "agent.pem", "agent-key.pem"]
  tls_parameter_arns = [
    for name in local.tls_parameter_names :
    "arn:${data.aws_partition.current.partition}:ssm:${data.aws_region.current.name}:${data.aws_caller_identity.current.account_id}:parameter${var.tls_ssm_parameter_prefix}/${name}"
  ]

  bucket_arn = "arn:${data.aws_partition.current.partition}:s3:::${var.task_bucket_name}"
}

# --- network: only the scheduler reaches the agent's gRPC port --------------------------------

resource "aws_security_group" "agents" {
  name_prefix = "${var.name}-agents-"
  description = "facefleet agents (pool ${var.pool}): gRPC from the scheduler only"
  vpc_id      = var.vpc_id
  tags        = merge(local.common_tags, { Name = "${var.name}-agents" })

  lifecycle {
    create_before_destroy = true

    precondition {
      condition     = length(var.scheduler_cidr_blocks) > 0 || var.scheduler_security_group_id != null
      error_message = "Set scheduler_cidr_blocks or scheduler_security_group_id: without one the scheduler cannot reach the agents."
    }
  }
}

resource "aws_vpc_security_group_ingress_rule" "grpc_from_scheduler_cidr" {
  for_each = toset(var.scheduler_cidr_blocks)

  security_group_id = aws_security_group.agents.id
  description       = "agent gRPC from the scheduler"
  ip_protocol       = "tcp"
  from_port         = var.agent_grpc_port
  to_port           = var.agent_grpc_port
  cidr_ipv4         = each.value
}

resource "aws_vpc_security_group_ingress_rule" "grpc_from_scheduler_sg" {
  count = var.scheduler_security_group_id == null ? 0 : 1

  security_group_id            = aws_security_group.agents.id
  description                  = "agent gRPC from the scheduler security group"
  ip_protocol                  = "tcp"
  from_port                    = var.agent_grpc_port
  to_port                      = var.agent_grpc_port
  referenced_security_group_id = var.scheduler_security_group_id
}

resource "aws_vpc_security_group_ingress_rule" "metrics_from_prometheus" {
  for_each = toset(var.metrics_source_cidr_blocks)

  security_group_id = aws_security_group.agents.id
  description       = "agent /metrics from Prometheus"
  ip_protocol       = "tcp"
  from_port         = var.agent_metrics_port
  to_port           = var.agent_metrics_port
  cidr_ipv4         = each.value
}

resource "aws_vpc_security_group_egress_rule" "scheduler_grpc_cidr" {
  for_each = toset(var.scheduler_cidr_blocks)

  security_group_id = aws_security_group.agents.id
  description       = "heartbeats and results to the scheduler"
  ip_protocol       = "tcp"
  from_port         = var.scheduler_grpc_port
  to_port           = var.scheduler_grpc_port
  cidr_ipv4         = each.value
}

resource "aws_vpc_security_group_egress_rule" "scheduler_grpc_sg" {
  count = var.scheduler_security_group_id == null ? 0 : 1

  security_group_id            = aws_security_group.agents.id
  description                  = "heartbeats and results to the scheduler security group"
  ip_protocol                  = "tcp"
  from_port                    = var.scheduler_grpc_port
  to_port                      = var.scheduler_grpc_port
  referenced_security_group_id = var.scheduler_security_group_id
}

resource "aws_vpc_security_group_egress_rule" "https" {
  for_each = toset(var.https_egress_cidr_blocks)

  security_group_id = aws_security_group.agents.id
  description       = "S3, SSM and the package index over HTTPS"
  ip_protocol       = "tcp"
  from_port         = 443
  to_port           = 443
  cidr_ipv4         = each.value
}

# --- identity: the task bucket and the agent's own TLS parameters, nothing else ---------------

data "aws_iam_policy_document" "assume_ec2" {
  statement {
    sid     = "EC2AssumeRole"
    effect  = "Allow"
    actions = ["sts:AssumeRole"]

    principals {
      type        = "Service"
      identifiers = ["ec2.amazonaws.com"]
    }
  }
}

data "aws_iam_policy_document" "agent" {
  statement {
    sid       = "TaskObjects"
    effect    = "Allow"
    actions   = ["s3:GetObject", "s3:PutObject"]
    resources = ["${local.bucket_arn}/*"]
  }

  statement {
    sid       = "TaskBucketList"
    effect    = "Allow"
    actions   = ["s3:ListBucket"]
    resources = [local.bucket_arn]
  }

  statement {
    sid       = "AgentTLSParameters"
    effect    = "Allow"
    actions   = ["ssm:GetParameter"]
    resources = local.tls_parameter_arns
  }

  dynamic "statement" {
    for_each = var.tls_kms_key_arn == null ? [] : [var.tls_kms_key_arn]
    content {
      sid       = "DecryptTLSParametersViaSSM"
      effect    = "Allow"
      actions   = ["kms:Decrypt"]
      resources = [statement.value]

      condition {
        test     = "StringEquals"
        variable = "kms:ViaService"
        values   = ["ssm.${data.aws_region.current.name}.amazonaws.com"]
      }
    }
  }
}

resource "aws_iam_role" "agent" {
  name_prefix        = "${var.name}-agent-"
  description        = "facefleet agents (pool ${var.pool}): task bucket ${var.task_bucket_name} and agent TLS parameters"
  assume_role_policy = data.aws_iam_policy_document.assume_ec2.json
  tags               = local.common_tags
}

resource "aws_iam_role_policy" "agent" {
  name   = "facefleet-agent"
  role   = aws_iam_role.agent.id
  policy = data.aws_iam_policy_document.agent.json
}

resource "aws_iam_instance_profile" "agent" {
  name_prefix = "${var.name}-agent-"
  role        = aws_iam_role.agent.name
  tags        = local.common_tags
}

# --- the instance: spot, IMDSv2, boot script that starts the agent ------------------------------

resource "aws_launch_template" "agent" {
  name_prefix            = "${var.name}-agent-"
  description            = "facefleet agent, pool ${var.pool}, spot"
  image_id               = var.ami_id
  instance_type          = var.instance_type
  update_default_version = true
  vpc_security_group_ids = [aws_security_group.agents.id]

  iam_instance_profile {
    arn = aws_iam_instance_profile.agent.arn
  }

  instance_market_options {
    market_type = "spot"

    spot_options {
      max_price                      = var.spot_max_price == "" ? null : var.spot_max_price
      spot_instance_type             = "one-time"
      instance_interruption_behavior = "terminate"
    }
  }

  metadata_options {
    http_endpoint               = "enabled"
    http_tokens                 = "required"
    http_put_response_hop_limit = 1
    instance_metadata_tags      = "enabled"
  }

  block_device_mappings {
    device_name = "/dev/sda1"

    ebs {
      volume_size           = var.root_volume_size_gb
      volume_type           = "gp3"
      encrypted             = true
      delete_on_termination = true
    }
  }

  user_data = base64encode(templatefile("${path.module}/templates/agent-boot.sh.tftpl", {
    pool                 = var.pool
    scheduler_address    = var.scheduler_address
    grpc_port            = var.agent_grpc_port
    metrics_port         = var.agent_metrics_port
    slots                = var.slots
    task_bucket          = var.task_bucket_name
    models_prefix        = var.models_s3_prefix
    tls_parameter_prefix = var.tls_ssm_parameter_prefix
    agent_package        = var.agent_package
  }))

  tag_specifications {
    resource_type = "instance"
    tags          = merge(local.common_tags, { Name = "${var.name}-agent" })
  }

  tag_specifications {
    resource_type = "volume"
    tags          = local.common_tags
  }

  tags = local.common_tags
}

resource "aws_autoscaling_group" "agents" {
  count = var.create_autoscaling_group ? 1 : 0

  name_prefix         = "${var.name}-agents-"
  vpc_zone_identifier = var.subnet_ids
  min_size            = var.min_size
  max_size            = var.max_size
  desired_capacity    = var.desired_capacity
  capacity_rebalance  = true

  launch_template {
    id      = aws_launch_template.agent.id
    version = aws_launch_template.agent.latest_version
  }

  lifecycle {
    ignore_changes = [desired_capacity] # the scheduler's provisioner scales it

    precondition {
      condition     = length(var.subnet_ids) > 0
      error_message = "create_autoscaling_group = true needs at least one entry in subnet_ids."
    }
  }

  dynamic "tag" {
    for_each = local.common_tags
    content {
      key                 = tag.key
      value               = tag.value
      propagate_at_launch = true
    }
  }
}
