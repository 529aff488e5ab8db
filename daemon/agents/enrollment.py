"""Agent enrolment: which stream may speak for which host, and the administrator's say in it.

At hello (``Enrollment.admit``, called by ``daemon.agents.admission.SessionManager``):
- the **enrolment token** (``--agent-token``) only ever enrols. An unknown host becomes
  ``pending`` (``approved`` with ``--auto-approve``); an approved host without a credential is
  issued one: 32 random bytes, urlsafe, sent once in ``Welcome.credential``, stored as its sha256
  only, in the same transaction as its audit record. A host that has a credential is refused
  ``enrolled``: the shared token never again speaks for it (Salt's CVE-2024-38822 lesson);
  ``pending``, ``rejected`` and ``revoked`` hosts are refused with their state.
  One exception keeps a lost Welcome from locking a host out for good: when the stream that
  carried a new credential ended without a word from the agent after its Welcome (the Welcome
  was lost, or the agent gave up waiting for it), and the credential was never presented, the
  token may come back for the host within ``REISSUE_WINDOW_S`` of the issue and get a new one,
  which replaces it. While that stream is open, once the agent was heard on it or presented its
  credential, after the window, or after a daemon restart (this is kept in memory: it fails
  closed), the token is refused ``enrolled``. A replacement is audited (``agent.enrol`` with
  ``reissued``).
- any other credential must be the per-host credential of the hello's host (sha256 compared in
  constant time) while that host is ``approved``; otherwise ``unauthenticated`` (``revoked``
  when the host is revoked).
- with mutual TLS the client certificate must name the hello's host first
  (``identity.check_certificate``).
With ``--insecure`` and no enrolment token, any stream that does not present a valid per-host
credential is taken as an enrolment: enrolled hosts are still protected by their credentials.

``--auto-approve`` admits hosts never seen before; hosts an administrator kept pending, rejected
or revoked stay so.

An administrator's say (approve, reject, revoke): ``daemon.engine.hosts``.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import secrets
import time
from dataclasses import dataclass
from typing import Any

import trio

from daemon.agents.identity import HostIdentity, Refused, check_certificate, identity_from_hello
from daemon.ops.audit import OK, AuditRecord, insert_event
from daemon.states import EnrollmentState, HostStatus
from daemon.store.database import Database
from daemon.store.host_records import HostState, host_state
from daemon.store.models import Host
from proto.dispatch import v1 as pb

logger = logging.getLogger(__name__)

_NO_HASH = "0" * 64  # compared against when there is nothing to compare: same work either way
REISSUE_WINDOW_S = 600.0  # an issued, never presented credential may be replaced this long
_UNCONFIRMED_MAX = 100_000


def credential_hash(credential: str) -> str:
    return hashlib.sha256(credential.encode("utf-8", "surrogateescape")).hexdigest()


def new_credential() -> str:
    return secrets.token_urlsafe(32)


@dataclass(frozen=True)
class Admitted:
    identity: HostIdentity
    credential: str | None = None  # issued now: goes out in the Welcome, once
    auto_approved: bool = False


# --- synchronous: run through Database ------------------------------------------------------


def register_host(
    identity: HostIdentity,
    *,
    address: str,
    enrollment: EnrollmentState,
    at: float,
    hashed: str | None = None,
    record: AuditRecord | None = None,
) -> tuple[bool, HostState]:
    """Create the host in ``enrollment`` unless it exists (a racing stream may have created it),
    holding the credential ``hashed`` when given, with its audit ``record``, in one transaction.
    Whether it was created, and its state either way."""
    with Host._meta.database.atomic():
        created = (
            Host.insert(
                {
                    Host.id: identity.host_id,
                    Host.hostname: identity.hostname,
                    Host.labels: json.dumps(identity.labels, sort_keys=True),
                    Host.status: HostStatus.OFFLINE.value,
                    Host.enrollment: enrollment.value,
                    Host.credential_hash: hashed,
                    Host.credential_issued_at: at if hashed is not None else None,
                    Host.agent_version: identity.agent_version,
                    Host.address: address,
                    Host.first_seen_at: at,
                }
            )
            .on_conflict_ignore()
            .as_rowcount()
            .execute()
        )
        if created and record is not None:
            insert_event(record, at)
    state = host_state(identity.host_id)
    assert state is not None
    return bool(created), state


def issue_credential(
    host_id: str, hashed: str, record: AuditRecord, at: float, replacing: str | None = None
) -> bool:
    """Store the credential's hash if the host is approved and has none (or has ``replacing``);
    with its audit record, in one transaction. False if another stream or an administrator got
    there first."""
    current = (
        Host.credential_hash.is_null() if replacing is None else (Host.credential_hash == replacing)
    )
    with Host._meta.database.atomic():
        issued = (
            Host.update(credential_hash=hashed, credential_issued_at=at)
            .where(
                (Host.id == host_id) & (Host.enrollment == EnrollmentState.APPROVED.value) & current
            )
            .execute()
        )
        if issued:
            insert_event(record, at)
    return bool(issued)


# --- at hello -------------------------------------------------------------------------------


_REFUSALS = {
    EnrollmentState.PENDING: (
        "pending_approval",
        "host {host} is enrolled and waits for an administrator's approval",
    ),
    EnrollmentState.REJECTED: ("rejected", "host {host} was rejected by an administrator"),
    EnrollmentState.REVOKED: ("revoked", "host {host} was revoked by an administrator"),
}


def _refusal(state: EnrollmentState, host_id: str) -> Refused:
    code, message = _REFUSALS[state]
    return Refused(code, message.format(host=host_id))


class Enrollment:
    """Decides, at hello, whether a stream speaks for the host its hello names."""

    def __init__(
        self,
        database: Database,
        *,
        enrolment_token: str | None,
        auto_approve: bool = False,
        require_certificate: bool = False,
    ) -> None:
        self._database = database
        self._token = enrolment_token.encode() if enrolment_token is not None else None
        self._auto_approve = auto_approve
        self._require_certificate = require_certificate
        # credentials issued and never presented: host id -> [hash, trio time, stream ended]
        self._unconfirmed: dict[str, list[Any]] = {}

    async def admit(
        self,
        credential: str | None,
        hello: pb.Hello,
        *,
        peer_names: frozenset[str] | None = None,
        address: str = "",
    ) -> Admitted:
        """The identity to serve, or ``Refused``."""
        identity = identity_from_hello(hello)
        check_certificate(identity.host_id, peer_names, required=self._require_certificate)
        host_id = identity.host_id
        state = await self._database.read(host_state, host_id)
        if self._token is not None:
            if credential and hmac.compare_digest(credential.encode(), self._token):
                return await self._enrol(identity, state, address)
            return self._check_credential(identity, state, credential)
        # --insecure without an enrolment token: a valid credential is checked, anything else
        # enrols (and is refused 'enrolled' for a host that has a credential)
        if credential and state is not None and state.credential_hash is not None:
            if hmac.compare_digest(credential_hash(credential), state.credential_hash):
                return self._check_credential(identity, state, credential)
        return await self._enrol(identity, state, address)

    def _check_credential(
        self, identity: HostIdentity, state: HostState | None, credential: str | None
    ) -> Admitted:
        host_id = identity.host_id
        stored = state.credential_hash if state is not None else None
        presented = credential_hash(credential) if credential else ""
        matches = hmac.compare_digest(presented or _NO_HASH, stored or _NO_HASH)
        if state is None or stored is None or not credential or not matches:
            if state is not None and state.enrollment == EnrollmentState.REVOKED:
                raise _refusal(EnrollmentState.REVOKED, host_id)
            raise Refused(
                "unauthenticated",
                f"the credential is missing or not the one issued to host {host_id!r}",
            )
        if state.enrollment != EnrollmentState.APPROVED:
            raise _refusal(state.enrollment, host_id)
        self._unconfirmed.pop(host_id, None)  # the agent has it: the token is done for this host
        return Admitted(identity)

    def stream_ended(self, host_id: str, credential: str, *, heard: bool) -> None:
        """The stream that carried ``credential`` to the host ended; ``heard``: the agent spoke
        on it after its Welcome, so it has its credential."""
        issued = self._unconfirmed.get(host_id)
        if issued is None or issued[0] != credential_hash(credential):
            return
        if heard:
            del self._unconfirmed[host_id]
        else:
            issued[2] = True

    def _replaceable(self, host_id: str, stored: str) -> bool:
        """Whether the host's credential may never have reached its agent (see the module)."""
        issued = self._unconfirmed.get(host_id)
        if issued is None or not issued[2] or not hmac.compare_digest(issued[0], stored):
            return False
        return trio.current_time() - issued[1] < REISSUE_WINDOW_S

    def _issued(self, host_id: str, hashed: str) -> None:
        if len(self._unconfirmed) >= _UNCONFIRMED_MAX:
            now = trio.current_time()
            self._unconfirmed = {
                h: v for h, v in self._unconfirmed.items() if now - v[1] < REISSUE_WINDOW_S
            }
            if len(self._unconfirmed) >= _UNCONFIRMED_MAX:  # fail closed: forget them all
                self._unconfirmed.clear()
        self._unconfirmed[host_id] = [hashed, trio.current_time(), False]

    async def _enrol(
        self, identity: HostIdentity, state: HostState | None, address: str
    ) -> Admitted:
        host_id = identity.host_id
        if state is None:  # a new host: pending, or approved with its credential at once
            auto = self._auto_approve
            credential = new_credential() if auto else None
            hashed = credential_hash(credential) if credential is not None else None
            created, state = await self._database.write(
                register_host, identity, address=address, at=time.time(),
                enrollment=EnrollmentState.APPROVED if auto else EnrollmentState.PENDING,
                hashed=hashed,
                record=self._record(host_id, address, auto_approved=True) if auto else None,
            )  # fmt: skip
            if created:
                logger.info("host %s enrolled from %s: %s", host_id, address, state.enrollment)
                if credential is not None and hashed is not None:
                    return self._admitted(identity, credential, hashed, address, auto=True)
        if state.enrollment != EnrollmentState.APPROVED:
            raise _refusal(state.enrollment, host_id)
        replacing = state.credential_hash
        if replacing is not None and not self._replaceable(host_id, replacing):
            raise _enrolled(host_id)
        credential = new_credential()
        hashed = credential_hash(credential)
        record = self._record(host_id, address, reissued=replacing is not None)
        issued = await self._database.write(
            issue_credential, host_id, hashed, record, time.time(), replacing
        )
        if not issued:  # another stream with the token won, or an administrator acted meanwhile
            now = await self._database.read(host_state, host_id)
            if now is not None and now.enrollment != EnrollmentState.APPROVED:
                raise _refusal(now.enrollment, host_id)
            raise _enrolled(host_id)
        return self._admitted(identity, credential, hashed, address, replaced=replacing is not None)

    def _record(
        self, host_id: str, address: str, *, auto_approved: bool = False, reissued: bool = False
    ) -> AuditRecord:
        details: dict[str, Any] = {"auto_approved": auto_approved}
        if reissued:
            details["reissued"] = True  # the last one was never presented
        return AuditRecord(
            actor=f"agent:{host_id}", action="agent.enrol", outcome=OK, target=host_id,
            address=address, details=details,
        )  # fmt: skip

    def _admitted(
        self,
        identity: HostIdentity,
        credential: str,
        hashed: str,
        address: str,
        *,
        auto: bool = False,
        replaced: bool = False,
    ) -> Admitted:
        self._issued(identity.host_id, hashed)
        logger.info(
            "host %s: credential issued (enrolment from %s)%s",
            identity.host_id,
            address,
            "; it replaces one never presented" if replaced else "",
        )
        return Admitted(identity, credential, auto_approved=auto)


def _enrolled(host_id: str) -> Refused:
    return Refused(
        "enrolled",
        f"host {host_id!r} is enrolled and must present its own credential; the enrolment token "
        "no longer speaks for it (an administrator can re-admit it: revoke, then approve)",
    )
