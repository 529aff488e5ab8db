"""Who is on the other end of an agent stream, decided once, when the stream opens.

The host's identity comes from the credential presented with the stream and the hello that
opens it; no later message can change it (Salt's CVE-2024-38822 lesson). Here the credential is
the shared agent token; per-host credentials issued at enrolment replace this seam later.
"""

from __future__ import annotations

import hmac
import re
from dataclasses import dataclass

from proto.dispatch import v1 as pb

HOST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,253}$")
LABEL_KEY = re.compile(r"^[A-Za-z0-9._/-]{1,63}$")
MAX_LABELS = 64
MAX_LABEL_VALUE = 255


@dataclass(frozen=True)
class HostIdentity:
    host_id: str
    labels: dict[str, str]
    hostname: str
    agent_version: str


class Refused(Exception):
    def __init__(self, status: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class SharedTokenAuthenticator:
    """Accepts agents presenting the configured token; ``None`` accepts any (``--insecure``)."""

    def __init__(self, token: str | None) -> None:
        self._token = token.encode() if token is not None else None

    def authenticate(self, credential: str | None, hello: pb.Hello) -> HostIdentity:
        if self._token is not None and (
            credential is None or not hmac.compare_digest(credential.encode(), self._token)
        ):
            raise Refused("unauthenticated", "the agent token is missing or wrong")
        return identity_from_hello(hello)


def identity_from_hello(hello: pb.Hello) -> HostIdentity:
    if not HOST_ID.match(hello.host_id):
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
