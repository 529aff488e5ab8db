"""TLS for the agent port, both ends: ``ssl.SSLContext`` objects built from PEM files.

gRPC runs over HTTP/2, which over TLS is negotiated with ALPN ``h2``; both contexts offer only
that. TLS 1.2 is the floor (RFC 7540 §9.2), with forward-secret AEAD ciphers for TLS 1.2 (TLS 1.3
suites are not affected by ``set_ciphers``).

- The daemon's context (``server_context``) presents ``--tls-cert``/``--tls-key``; with
  ``--tls-client-ca`` it *requires* a client certificate signed by that CA (mutual TLS): a client
  without one fails the handshake before any gRPC is spoken.
- The agent's context (``client_context``) verifies the daemon's certificate and its name (the
  host of ``--server``) against ``--tls-ca`` or the system's CAs, and presents ``--tls-cert``/
  ``--tls-key`` when given.

``peer_names`` reads the names a verified peer certificate speaks for: its subject common names
and DNS subject alternative names, compared later by exact equality (a wildcard certificate does
not speak for every host it would match).

A file that cannot be read or does not hold what it should raises ``TlsConfigError`` naming the
option, so both programs refuse to start with a sentence instead of a traceback.
"""

from __future__ import annotations

import ssl
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from common.settings import SettingsError

ALPN = ["h2"]
_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20:DHE+AESGCM:DHE+CHACHA20"


class TlsConfigError(SettingsError):
    """A TLS file is missing, unreadable or not what its option says."""


def _harden(context: ssl.SSLContext) -> ssl.SSLContext:
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_ciphers(_CIPHERS)
    context.set_alpn_protocols(ALPN)
    context.options |= ssl.OP_NO_COMPRESSION
    return context


def _readable(path: Path, option: str) -> None:
    try:
        with open(path, "rb"):
            pass
    except OSError as exc:
        raise TlsConfigError(option, f"cannot read {path}: {exc.strerror or exc}") from None


def _load_chain(context: ssl.SSLContext, cert: Path, key: Path) -> None:
    _readable(cert, "--tls-cert")
    _readable(key, "--tls-key")
    try:
        context.load_cert_chain(certfile=str(cert), keyfile=str(key))
    except ssl.SSLError as exc:  # before OSError, of which it is one
        raise TlsConfigError(
            "--tls-cert",
            f"{cert} and {key} are not a PEM certificate and its key ({exc.reason or exc})",
        ) from None
    except OSError as exc:
        raise TlsConfigError("--tls-cert", f"cannot read {cert} or {key}: {exc}") from None


def _load_cas(context: ssl.SSLContext, cafile: Path, option: str) -> None:
    _readable(cafile, option)
    try:
        context.load_verify_locations(cafile=str(cafile))
    except ssl.SSLError as exc:  # before OSError, of which it is one
        raise TlsConfigError(
            option, f"{cafile} holds no PEM CA certificate ({exc.reason or exc})"
        ) from None
    except OSError as exc:
        raise TlsConfigError(option, f"cannot read {cafile}: {exc.strerror or exc}") from None


def server_context(cert: Path, key: Path, client_ca: Path | None = None) -> ssl.SSLContext:
    """The agent port's context; ``client_ca`` makes client certificates mandatory."""
    context = _harden(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER))
    _load_chain(context, cert, key)
    if client_ca is not None:
        _load_cas(context, client_ca, "--tls-client-ca")
        context.verify_mode = ssl.CERT_REQUIRED
    else:
        context.verify_mode = ssl.CERT_NONE
    return context


def client_context(
    ca: Path | None = None, cert: Path | None = None, key: Path | None = None
) -> ssl.SSLContext:
    """The agent's context: verifies the daemon (``ca`` or the system's CAs) and its name."""
    context = _harden(ssl.create_default_context(ssl.Purpose.SERVER_AUTH))
    if ca is not None:
        _load_cas(context, ca, "--tls-ca")
    if cert is not None and key is not None:
        _load_chain(context, cert, key)
    return context


def peer_names(cert: Mapping[str, Any] | None) -> frozenset[str] | None:
    """The names a verified peer certificate (``SSLSocket.getpeercert()``) speaks for: subject
    common names and DNS subject alternative names. None without a certificate."""
    if not cert:
        return None
    names: set[str] = set()
    for rdn in cert.get("subject", ()):
        for key, value in rdn:
            if key == "commonName" and isinstance(value, str):
                names.add(value)
    for kind, value in cert.get("subjectAltName", ()):
        if kind == "DNS" and isinstance(value, str):
            names.add(value)
    return frozenset(names)
