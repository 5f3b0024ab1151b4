terraform {
  required_version = ">= 1.5.0"

  required_providers {
    consul = {
      source  = "hashicorp/consul"
      version = ">= 2.20, < 3.0"
    }
  }
}
