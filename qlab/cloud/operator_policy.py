"""The IAM policy an operator needs to run `qlab cloud plan/up/status/run/down/ls/logs`, and no more
where AWS can scope it: IAM only on the deployment's roles and instance profiles, PassRole only of
those roles and only to EC2, S3 only on the deployment buckets, SSM parameters only under /qlab/, and
EC2 changes only to resources carrying the `qlab:deployment` tag (or created with it).

Deployment ids must start with `qlab-` for this policy to cover them (the ids `up` draws do); roles,
instance profiles and buckets are named after the id. What AWS does not let a policy scope (the
Describe calls, Service Quotas, Run Command's results, the network interfaces RunInstances creates
untagged) is allowed on "*" and said so below.

Tested against moto's IAM enforcement (tests/test_cloud_operator_policy.py), which checks the actions
of every call but not, for most services, the resources or conditions: those are checked by the
project's own evaluator (tests/aws_strict.py), not by AWS. No real account has run it.
"""

from __future__ import annotations

ID_PREFIX = "qlab-"
TAG = "qlab:deployment"

# EC2 calls that create a resource tagged in the same request (TagSpecifications), and the resource
# types they create; tagging on creation also needs ec2:CreateTags for that create action (EC2 User
# Guide, "Grant permission to tag Amazon EC2 resources during creation")
EC2_CREATES = {
    "ec2:CreateVpc": ["vpc"], "ec2:CreateSubnet": ["subnet"], "ec2:CreateSecurityGroup": ["security-group"],
    "ec2:CreateRouteTable": ["route-table"], "ec2:CreateInternetGateway": ["internet-gateway"],
    "ec2:CreateNetworkAcl": ["network-acl"], "ec2:CreateNatGateway": ["natgateway"],
    "ec2:AllocateAddress": ["elastic-ip"], "ec2:RunInstances": ["instance", "volume"],
}
# what those creates also act on, already existing: the deployment's own VPC, subnet or group (tagged)
EC2_CREATE_PARENTS = {
    "ec2:CreateSubnet": ["vpc"], "ec2:CreateSecurityGroup": ["vpc"], "ec2:CreateRouteTable": ["vpc"],
    "ec2:CreateNetworkAcl": ["vpc"], "ec2:CreateNatGateway": ["subnet", "elastic-ip"],
    "ec2:RunInstances": ["subnet", "security-group"],
}
# EC2 calls on existing resources, allowed only when every resource they name carries the tag
# (EC2 Service Authorization Reference, "Actions, resources, and condition keys for Amazon EC2":
# these accept aws:ResourceTag)
EC2_ON_TAGGED = [
    "ec2:TerminateInstances", "ec2:GetConsoleOutput", "ec2:ModifyVpcAttribute", "ec2:DeleteVpc",
    "ec2:AttachInternetGateway", "ec2:DetachInternetGateway", "ec2:DeleteInternetGateway", "ec2:CreateRoute",
    "ec2:AssociateRouteTable", "ec2:DisassociateRouteTable", "ec2:DeleteRouteTable",
    "ec2:AuthorizeSecurityGroupIngress", "ec2:DeleteSecurityGroup", "ec2:DeleteSubnet", "ec2:CreateNetworkAclEntry",
    "ec2:ReplaceNetworkAclAssociation", "ec2:DeleteNetworkAcl", "ec2:AssociateAddress", "ec2:DisassociateAddress",
    "ec2:ReleaseAddress", "ec2:DeleteNatGateway",
]
# network interfaces: RunInstances creates them without qlab's tag, so these are scoped to interfaces,
# not to the deployment
EC2_ON_INTERFACES = ["ec2:AssignPrivateIpAddresses", "ec2:ModifyNetworkInterfaceAttribute",
                     "ec2:DeleteNetworkInterface", "ec2:AssociateAddress", "ec2:RunInstances"]
# reads AWS does not scope to resources (the EC2 Describe calls take no resource ARN)
READS = [
    "ec2:DescribeInstances", "ec2:DescribeAddresses", "ec2:DescribeVpcs", "ec2:DescribeSubnets",
    "ec2:DescribeSecurityGroups", "ec2:DescribeRouteTables", "ec2:DescribeInternetGateways",
    "ec2:DescribeNatGateways", "ec2:DescribeNetworkAcls", "ec2:DescribeNetworkInterfaces",
    "ec2:DescribeAvailabilityZones", "ec2:DescribeRegions", "ec2:DescribeInstanceTypeOfferings",
    "ec2:DescribeInstanceTypes", "sts:GetCallerIdentity", "servicequotas:GetServiceQuota",
    "servicequotas:GetAWSDefaultServiceQuota", "s3:ListAllMyBuckets", "ssm:GetCommandInvocation",
    "ssm:ListCommands", "ssm:ListCommandInvocations",
]
IAM_ACTIONS = [
    "iam:CreateRole", "iam:GetRole", "iam:TagRole", "iam:PutRolePolicy", "iam:GetRolePolicy", "iam:DeleteRolePolicy",
    "iam:ListRolePolicies", "iam:ListAttachedRolePolicies", "iam:DetachRolePolicy", "iam:DeleteRole",
    "iam:CreateInstanceProfile", "iam:GetInstanceProfile", "iam:TagInstanceProfile", "iam:AddRoleToInstanceProfile",
    "iam:RemoveRoleFromInstanceProfile", "iam:DeleteInstanceProfile",
]
SSM_CORE = "arn:aws:iam::aws:policy/AmazonSSMManagedInstanceCore"
S3_BUCKET_ACTIONS = ["s3:CreateBucket", "s3:PutBucketTagging", "s3:GetBucketTagging", "s3:GetBucketLocation",
                     "s3:ListBucket", "s3:DeleteBucket"]
S3_OBJECT_ACTIONS = ["s3:PutObject", "s3:GetObject", "s3:DeleteObject"]
SSM_PARAMETER_ACTIONS = ["ssm:PutParameter", "ssm:AddTagsToResource", "ssm:GetParameter", "ssm:GetParameters",
                         "ssm:GetParametersByPath", "ssm:DeleteParameter", "ssm:DeleteParameters"]
AMI_PARAMETERS = "arn:aws:ssm:*::parameter/aws/service/ami-amazon-linux-latest/*"


def operator_policy(account: str = "*") -> dict:
    """The operator's identity policy (attach it to the user or role that runs `qlab cloud`);
    `account` narrows every ARN to that account id."""
    ec2 = f"arn:aws:ec2:*:{account}"
    tagged = {"StringLike": {f"aws:ResourceTag/{TAG}": "*"}}  # any value: the tag must be present
    statements = [
        {"Sid": "ReadsAwsDoesNotScope", "Effect": "Allow", "Action": READS, "Resource": "*"},
        {"Sid": "CreateOnlyTagged", "Effect": "Allow", "Action": sorted(EC2_CREATES),
         "Resource": sorted({f"{ec2}:{t}/*" for types in EC2_CREATES.values() for t in types}),
         "Condition": {"StringLike": {f"aws:RequestTag/{TAG}": "*"}}},
        {"Sid": "TagOnCreateOnly", "Effect": "Allow", "Action": "ec2:CreateTags", "Resource": f"{ec2}:*/*",
         "Condition": {"StringEquals": {"ec2:CreateAction": [a.split(":")[1] for a in sorted(EC2_CREATES)]}}},
        {"Sid": "CreateInOwnNetwork", "Effect": "Allow", "Action": sorted(EC2_CREATE_PARENTS),
         "Resource": sorted({f"{ec2}:{t}/*" for types in EC2_CREATE_PARENTS.values() for t in types}),
         "Condition": tagged},
        {"Sid": "LaunchFromAmazonImages", "Effect": "Allow", "Action": "ec2:RunInstances",
         "Resource": "arn:aws:ec2:*::image/*", "Condition": {"StringEquals": {"ec2:Owner": "amazon"}}},
        {"Sid": "ChangeOnlyTagged", "Effect": "Allow", "Action": EC2_ON_TAGGED, "Resource": "*", "Condition": tagged},
        {"Sid": "InterfacesRunInstancesCreatesUntagged", "Effect": "Allow", "Action": EC2_ON_INTERFACES,
         "Resource": f"{ec2}:network-interface/*"},
        {"Sid": "RunCommandOnTaggedInstances", "Effect": "Allow", "Action": "ssm:SendCommand",
         "Resource": f"{ec2}:instance/*", "Condition": tagged},
        {"Sid": "RunCommandShellDocument", "Effect": "Allow", "Action": "ssm:SendCommand",
         "Resource": "arn:aws:ssm:*::document/AWS-RunShellScript"},
        {"Sid": "OwnRolesAndProfiles", "Effect": "Allow", "Action": IAM_ACTIONS,
         "Resource": [f"arn:aws:iam::{account}:role/{ID_PREFIX}*",
                      f"arn:aws:iam::{account}:instance-profile/{ID_PREFIX}*"]},
        {"Sid": "OwnRolesGetOnlySsmCore", "Effect": "Allow", "Action": "iam:AttachRolePolicy",
         "Resource": f"arn:aws:iam::{account}:role/{ID_PREFIX}*",
         "Condition": {"ArnEquals": {"iam:PolicyARN": SSM_CORE}}},
        {"Sid": "PassOwnRolesToEc2Only", "Effect": "Allow", "Action": "iam:PassRole",
         "Resource": f"arn:aws:iam::{account}:role/{ID_PREFIX}*",
         "Condition": {"StringEquals": {"iam:PassedToService": "ec2.amazonaws.com"}}},
        {"Sid": "OwnBuckets", "Effect": "Allow", "Action": S3_BUCKET_ACTIONS, "Resource": f"arn:aws:s3:::{ID_PREFIX}*"},
        {"Sid": "OwnBucketObjects", "Effect": "Allow", "Action": S3_OBJECT_ACTIONS,
         "Resource": f"arn:aws:s3:::{ID_PREFIX}*/*"},
        {"Sid": "OwnParameters", "Effect": "Allow", "Action": SSM_PARAMETER_ACTIONS,
         "Resource": f"arn:aws:ssm:*:{account}:parameter/qlab/*"},
        {"Sid": "AmazonLinuxImageId", "Effect": "Allow", "Action": "ssm:GetParameter", "Resource": AMI_PARAMETERS},
    ]
    return {"Version": "2012-10-17", "Statement": statements}
