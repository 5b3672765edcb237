"""The S3 bucket behind the local tier: keys, uploads, reads, the bucket index."""
