"""What an app sees through redirect: its role, credentials and region, from the EC2 metadata
service as boto3 finds it (IMDSv2 tokens included). Prints one JSON line."""
import json

import boto3
import botocore.utils

session = boto3.Session(region_name="us-east-1")
credentials = session.get_credentials()
fetcher = botocore.utils.InstanceMetadataFetcher()
print(json.dumps({
    "method": credentials.method,
    "access_key": credentials.get_frozen_credentials().access_key,
    "role": fetcher._get_iam_role(),
    "region": botocore.utils.InstanceMetadataRegionFetcher().retrieve_region(),
}), flush=True)
