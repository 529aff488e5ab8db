"""Who is on the other end of an agent stream, decided once, when the stream opens.

The host's identity comes from the credential presented with the stream (and, with mutual TLS,
the client certificate) and the hello that opens it; no later message can change it (Salt's
CVE-2024-38822 lesson). ``daemon.agents.enrollment`` decides whether the credential speaks for the
hello's host; this module reads the hello, binds it to the certificate, and names the refusals.
"""

from __future__ import annotations

from dataclasses import dataclass

from daemon.identifiers import HOST_ID, LABEL_KEY, MAX_LABEL_VALUE, MAX_LABELS
from proto.dispatch import v1 as pb


@dataclass(frozen=True)
class HostIdentity:
    host_id: str
    labels: dict[str, str]
    hostname: str
    agent_version: str


# Refusal codes (proto ``Refusal.code``) and the gRPC status the stream then ends with.
REFUSAL_STATUS = {
    "unauthenticated": "unauthenticated",
    "enrolled": "unauthenticated",
    "pending_approval": "permission_denied",
    "rejected": "permission_denied",
    "revoked": "permission_denied",
    "invalid_argument": "invalid_argument",
    "resource_exhausted": "resource_exhausted",
}


class Refused(Exception):
    """The daemon will not serve this stream: ``code`` is the ``Refusal`` code the agent gets,
    ``status`` the gRPC status the stream ends with."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.status = REFUSAL_STATUS.get(code, "permission_denied")
        self.message = message


def check_certificate(host_id: str, peer_names: frozenset[str] | None, *, required: bool) -> None:
    """With mutual TLS, the client certificate must name the host (subject CN or a DNS SAN,
    exactly): a certificate of the fleet's CA does not speak for every host (Nomad's
    CVE-2020-7956, Choria's caller-id check)."""
    if peer_names is None:
        if required:
            raise Refused("unauthenticated", "a client certificate is required")
        return
    if host_id not in peer_names:
        raise Refused(
            "unauthenticated",
            f"the client certificate does not name host {host_id!r} (its subject CN or a DNS "
            "subject alternative name must be the host id)",
        )


def identity_from_hello(hello: pb.Hello) -> HostIdentity:
    if not HOST_ID.match(hello.host_id) or hello.host_id in (".", ".."):
        raise Refused(
            "invalid_argument",
            "host_id must be 1-253 characters of letters, digits and . _ : -",
        )
    if len(hello.labels) > MAX_LABELS:
        raise Refused("invalid_argument", f"at most {MAX_LABELS} labels")
    for key, value in hello.labels.items():
        if not LABEL_KEY.match(key) or len(value) > MAX_LABEL_VALUE or "\x00" in value:
            raise Refused("invalid_argument", f"label {key[:64]!r} is malformed")
    return HostIdentity(
        host_id=hello.host_id,
        labels=dict(hello.labels),
        hostname=hello.hostname[:253],
        agent_version=hello.agent_version[:64],
    )
