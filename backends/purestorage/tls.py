"""TLS policies for the FlashBlade management endpoint.

``purity_ssl_verify`` is ``true`` (the system's trust store, hostname
checked), ``false`` (no verification at all: what upstream always does; arrays
often carry self-signed certificates) or the path of a PEM file holding the
CA certificate(s) to trust instead of the system store.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from twisted.internet import ssl
from twisted.web.client import BrowserLikePolicyForHTTPS
from twisted.web.iweb import IPolicyForHTTPS
from zope.interface import implementer


@implementer(IPolicyForHTTPS)
class NoVerifyPolicy:
    """Encrypt, but trust any certificate (upstream's behaviour)."""

    def creatorForNetloc(self, hostname: bytes, port: int) -> Any:
        # An old-style context factory: twisted adapts it and checks nothing.
        return ssl.CertificateOptions(verify=False)


@implementer(IPolicyForHTTPS)
class CustomCAPolicy:
    """Verify against the given CA certificates (and the hostname)."""

    def __init__(self, pem: bytes) -> None:
        certs = [ssl.Certificate.loadPEM(block) for block in _split_pem(pem)]
        if not certs:
            raise ValueError("no certificate found in the CA file")
        self.trust_root = ssl.trustRootFromCertificates(certs)

    def creatorForNetloc(self, hostname: bytes, port: int) -> Any:
        return ssl.optionsForClientTLS(hostname.decode("idna"), trustRoot=self.trust_root)


def _split_pem(pem: bytes) -> list[bytes]:
    end = b"-----END CERTIFICATE-----"
    blocks = []
    for chunk in pem.split(end):
        start = chunk.find(b"-----BEGIN CERTIFICATE-----")
        if start >= 0:
            blocks.append(chunk[start:] + end + b"\n")
    return blocks


def policy_for(ssl_verify: bool | str) -> Any:
    """The IPolicyForHTTPS for a ``purity_ssl_verify`` value (reads a CA file)."""
    if ssl_verify is True:
        return BrowserLikePolicyForHTTPS()
    if ssl_verify is False:
        return NoVerifyPolicy()
    return CustomCAPolicy(Path(ssl_verify).read_bytes())
