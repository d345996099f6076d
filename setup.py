"""Build script: the package, the twistd plugin and the optional Cython hot path.

``storage._fastio`` is compiled when Cython and a C compiler are present.  A
failed build leaves the pure-Python fallback in charge unless
``STORAGE_PROXY_REQUIRE_FASTIO=1`` asks for the build to be mandatory (tox
does, so the compiled module is what the test envs exercise).
"""

import os

from setuptools import find_packages, setup
from setuptools.command.build_ext import build_ext


class OptionalBuildExt(build_ext):
    def run(self):
        try:
            super().run()
        except Exception as exc:  # pragma: no cover - depends on the toolchain
            if os.environ.get("STORAGE_PROXY_REQUIRE_FASTIO") == "1":
                raise
            print(f"warning: storage._fastio not built ({exc}); using the Python fallback")

    def build_extension(self, ext):
        try:
            super().build_extension(ext)
        except Exception as exc:  # pragma: no cover
            if os.environ.get("STORAGE_PROXY_REQUIRE_FASTIO") == "1":
                raise
            print(f"warning: {ext.name} not built ({exc}); using the Python fallback")


def extensions():
    if not os.path.exists("storage/_fastio.pyx"):
        return []
    try:
        from Cython.Build import cythonize
    except ImportError:
        return []
    from setuptools import Extension

    return cythonize(
        [Extension("storage._fastio", ["storage/_fastio.pyx"])],
        compiler_directives={"language_level": "3"},
        quiet=True,
    )


setup(
    name="storage-proxy",
    version="0.1.0",
    description="A Backend.AI storage proxy on Twisted",
    packages=find_packages(include=["storage", "storage.*", "backends", "backends.*"])
    + ["twisted.plugins"],
    package_data={"twisted.plugins": ["storage_proxy.py"]},
    python_requires=">=3.10",
    install_requires=[
        "twisted[tls]>=24.7",
        "klein>=24.8",
        "treq>=24.9",
        # TOML 1.0: tomllib from 3.11, its tomli backport before; tomli-w writes the secrets file.
        "tomli>=2.0; python_version < '3.11'",
        "tomli-w>=1.0",
        "pyjwt>=2.8",
        "prometheus-client>=0.20",
        "werkzeug>=3.0",
        # S3 for the /v1 object storages (storage/artifacts/s3.py says why botocore).
        "botocore>=1.34",
        # The /v1 HuggingFace registries: the hub's own client (model info, refs,
        # tree listings, resolve URLs, its error classes), as upstream uses it.
        "huggingface-hub>=2.0,<3",  # httpx2-based; tested with 2.4
        "pyxattr>=0.8; sys_platform == 'linux'",
        # The manager's event bus (storage/events): txredisapi is a Redis client
        # on the Twisted reactor (reconnects with backoff, TLS, Sentinel); msgpack
        # encodes the argument tuples of the 26.4/26.8 event format.
        "txredisapi>=1.4.7",
        "msgpack>=1.0",
    ],
    extras_require={
        # tuspy, aiotusclient and requests are third-party clients the interop
        # tests drive against the daemon.
        "test": [
            "pytest>=8",
            "pytest-twisted>=1.14",
            "hypothesis>=6.100",
            "requests>=2.31",
            "tuspy>=1.0",
            "aiotusclient>=0.1.4",
            # the converters' JSON Schemas (tests/api/test_openapi.py), Draft 2020-12 as OpenAPI 3.1
            "jsonschema>=4.18",
        ],
    },
    entry_points={
        "console_scripts": [
            "storage-proxy-upload = storage.cli.upload:main",
            "storage-proxy-download = storage.cli.download:main",
        ],
    },
    cmdclass={"build_ext": OptionalBuildExt},
    ext_modules=extensions(),
    zip_safe=False,
)
