"""What can go wrong in dispatchd, as the HTTP layer reports it.

    DispatchError              expected: a request the daemon refuses; carries code, status, field
    ├── InvalidRequest         400  a value is malformed or out of range (``field`` names it)
    ├── Unauthorized           401  no or wrong API token
    ├── NotFound               404  no such task, execution or host
    ├── Conflict               409  the request does not fit the current state (start twice, ...)
    └── Unavailable            503  the daemon is shutting down or the database is failing

Anything else that escapes a request handler is a bug: it is logged with its traceback and the
client gets a 500 ``internal`` error without details.
"""

from __future__ import annotations


class DispatchError(Exception):
    status = 400
    code = "bad_request"

    def __init__(self, message: str, *, field: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field
        if code is not None:
            self.code = code


class InvalidRequest(DispatchError):
    status = 400
    code = "invalid_request"


class Unauthorized(DispatchError):
    status = 401
    code = "unauthorized"


class NotFound(DispatchError):
    status = 404
    code = "not_found"


class Conflict(DispatchError):
    status = 409
    code = "conflict"


class Unavailable(DispatchError):
    status = 503
    code = "unavailable"


class StartupError(Exception):
    """dispatchd cannot start (a port is taken, the database cannot be opened, ...): the
    message says what to fix; ``__main__`` prints it and exits non-zero."""
