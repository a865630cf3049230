"""AWS: deployments of the Intermediate, Connectors and NAT instances with boto3 (see docs/cloud.md)."""
