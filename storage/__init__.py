"""storage-proxy: a Backend.AI storage proxy on Twisted."""

__version__ = "0.1.0"

# The manager checks the proxy's API level by this string; we speak the API of
# upstream 26.9.6 (see ../shared/UPSTREAM-API.md).
API_VERSION = "26.9.6"
