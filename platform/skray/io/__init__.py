"""Bytes in and out: local paths and ``s3://`` (storage), YAML configs, and input sources."""
