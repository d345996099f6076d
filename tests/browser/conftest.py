"""The real-browser suite (tox -e browser): it runs the real daemon too."""


from support.fixtures import storage_proxy, storage_proxy_factory  # noqa: F401
