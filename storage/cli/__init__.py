"""Command-line tools: ``storage-proxy-upload`` and ``storage-proxy-download``."""
