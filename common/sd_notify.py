"""systemd's readiness protocol (``sd_notify``), without a dependency.

Under ``Type=notify`` systemd passes ``NOTIFY_SOCKET`` (a unix datagram socket path, or an
abstract one starting with ``@``) and waits for ``READY=1`` before it counts the service as
started; ``STOPPING=1`` says a stop has begun. Outside systemd (no ``NOTIFY_SOCKET``) every call
does nothing. A message that cannot be sent is logged and dropped: readiness is a courtesy to the
service manager, never a reason to stop.

The address is read once, in the program's ``__main__`` (``from_environ``), and removed from the
environment there so that processes the program starts do not inherit it.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import MutableMapping

logger = logging.getLogger(__name__)


class Notifier:
    """Sends state lines to the service manager; ``Notifier(None)`` is a silent one."""

    def __init__(self, address: str | None) -> None:
        self.address = address or None

    def notify(self, *lines: str) -> bool:
        """Send ``lines`` (``"READY=1"``, ``"STATUS=..."``) as one datagram; True if sent."""
        if self.address is None:
            return False
        target = "\0" + self.address[1:] if self.address.startswith("@") else self.address
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.sendto("\n".join(lines).encode(), target)
        except OSError as exc:
            logger.warning("cannot notify systemd at %s: %s", self.address, exc.strerror or exc)
            return False
        return True

    def ready(self, status: str) -> bool:
        return self.notify("READY=1", f"STATUS={status}")

    def stopping(self, status: str) -> bool:
        return self.notify("STOPPING=1", f"STATUS={status}")


def from_environ(environ: MutableMapping[str, str], *, unset: bool = True) -> Notifier:
    """The notifier for ``NOTIFY_SOCKET`` (removed from ``environ`` unless ``unset=False``)."""
    address = environ.pop("NOTIFY_SOCKET", None) if unset else environ.get("NOTIFY_SOCKET")
    return Notifier(address)
