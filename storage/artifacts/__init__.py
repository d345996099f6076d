"""The ``/v1`` artifact storages: VFS directories and S3 buckets (no HTTP here)."""
