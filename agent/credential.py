"""The agent's own credential: issued by the daemon when it enrols this host
(``Welcome.credential``) and presented instead of the enrolment token on every later connection.

It lives in ``<state-dir>/credential``, mode 0600, written atomically (a temporary file in the
same directory, fsynced, renamed over the old one, the directory fsynced), so a crash leaves the
old credential or the new one, never half of one. It is never logged.

``Credentials`` decides what each connection presents: the host's own credential, and the
enrolment token (``--token``) only while it has none. When the daemon refuses the credential (the
host was revoked, or re-admitted by an administrator, which clears it), the next attempt presents
the enrolment token, so a re-admitted host enrols again by itself; when that is refused too, the
one after presents the credential again. Refusals are logged with what a person must do:
``pending_approval`` as a warning (an administrator has yet to decide), the others as errors.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import trio

from proto.dispatch import v1 as pb

logger = logging.getLogger(__name__)

FILE_NAME = "credential"
_MAX_BYTES = 4096


class CredentialFile:
    def __init__(self, directory: Path) -> None:
        self.path = directory / FILE_NAME

    def load(self) -> str | None:
        """The stored credential; None when there is none (or it cannot be used, said why)."""
        try:
            with open(self.path, "rb") as file:
                raw = file.read(_MAX_BYTES + 1)
                mode = os.fstat(file.fileno()).st_mode
        except FileNotFoundError:
            return None
        except OSError as exc:
            logger.error("cannot read the credential in %s: %s", self.path, exc.strerror)
            return None
        if mode & 0o077:
            logger.warning(
                "%s is readable by other users (mode %o); it should be 0600",
                self.path,
                mode & 0o777,
            )
        try:
            text = raw.decode("ascii").strip()
        except UnicodeDecodeError:
            text = ""
        if not text or len(raw) > _MAX_BYTES or any(c.isspace() for c in text):
            logger.error("%s does not hold a credential; ignoring it", self.path)
            return None
        return text

    async def store(self, credential: str) -> None:
        """Replace the stored credential atomically (raises ``OSError``)."""
        await trio.to_thread.run_sync(self._write, credential)

    def _write(self, credential: str) -> None:
        temporary = self.path.with_name(f".{FILE_NAME}.{os.getpid()}.tmp")
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW
        fd = os.open(temporary, flags, 0o600)
        try:
            os.fchmod(fd, 0o600)  # whatever the umask or a leftover file said
            data = credential.encode("ascii") + b"\n"
            while data:
                data = data[os.write(fd, data) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.replace(temporary, self.path)
        except OSError:
            temporary.unlink(missing_ok=True)
            raise
        directory = os.open(self.path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)


# What a refusal means for this agent: how loud, and what to tell the person reading the log.
_ADVICE = {
    "pending_approval": (
        logging.WARNING,
        "an administrator has to approve this host (POST /api/v1/hosts/{host}/approve)",
    ),
    "rejected": (
        logging.ERROR,
        "an administrator rejected this host; it is refused until one approves it",
    ),
    "revoked": (
        logging.ERROR,
        "an administrator revoked this host; it is refused until one approves it again",
    ),
    "unauthenticated": (
        logging.ERROR,
        "check --token/--token-file (the enrolment token) and the credential in {path}",
    ),
}


class Credentials:
    """What the next connection presents, and keeping what the daemon issues."""

    def __init__(self, file: CredentialFile, token: str | None, host_id: str) -> None:
        self.file = file
        self.token = token
        self.host_id = host_id
        self.credential = file.load()
        self.presenting: str | None = None  # "credential" or "token": the last choice
        self._try_token = False

    def to_present(self) -> str | None:
        """The host's own credential, or the enrolment token while it has none (or after the
        daemon refused the credential)."""
        if self.credential is not None and not (self._try_token and self.token):
            self.presenting = "credential"
            return self.credential
        self.presenting = "token"
        return self.token

    async def welcomed(self, welcome: pb.Welcome) -> None:
        self._try_token = False
        if not welcome.credential:
            return
        self.credential = welcome.credential
        try:
            await self.file.store(welcome.credential)
        except OSError as exc:
            logger.error(
                "host %s: enrolled, but its credential cannot be stored in %s (%s): it lasts until "
                "this agent stops; after that an administrator must re-admit the host",
                self.host_id,
                self.file.path,
                exc.strerror or exc,
            )
            return
        logger.info("host %s: enrolled; its credential is in %s", self.host_id, self.file.path)

    def refused(self, refusal: pb.Refusal) -> None:
        """Log why, with what a person must do; a refused credential makes the next attempt
        present the enrolment token, a refused token the credential again."""
        self._try_token = self.presenting == "credential"
        level, advice = _ADVICE.get(refusal.code, (logging.ERROR, ""))
        if refusal.code == "enrolled":
            advice = (
                "this agent has no credential of its own (was its state directory lost?)"
                if self.credential is None
                else "the daemon does not take this agent's stored credential"
            ) + "; an administrator must re-admit the host: revoke it, then approve it"
        advice = advice.format(host=self.host_id, path=self.file.path)
        logger.log(
            level,
            "host %s: the daemon refused the connection: %s: %s%s",
            self.host_id,
            refusal.code,
            refusal.message,
            f" ({advice})" if advice else "",
        )
