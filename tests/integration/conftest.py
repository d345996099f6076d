"""Integration tests run the real daemon (``support.daemon``).

``support`` is importable as a top-level package: ``tests/`` is on ``sys.path``
(pytest's ``pythonpath`` setting in pyproject.toml).
"""


from support.fixtures import storage_proxy, storage_proxy_factory  # noqa: F401
