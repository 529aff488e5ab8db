"""The catalogue of hostile inputs: every case has a name, the input, and the answer it must get.

Each test module of this suite registers its cases when it is imported (``register`` or the
``case`` decorator); ``test_catalogue`` imports them all and counts. A case whose assertion fails
because of a known bug in a file this suite does not own is registered with ``bug`` (the reason,
and the proposed fix in the report of the issue) and its test is ``xfail(strict=True)``, so the
suite stays green and turns red the day the bug is fixed without the marker being removed.

What "nothing changed" means everywhere here: the row count of every table is the same before and
after (``AuditEvent`` aside: an audit record of a refusal is the refusal's trace, not a change),
execution rows keep their state, and no task use case was called.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import pytest

from daemon.store import models

F = TypeVar("F", bound=Callable[..., Any])


@dataclass(frozen=True)
class Case:
    name: str
    surface: str  # "http" or "stream"
    given: str  # the hostile input, for a person
    answer: str  # what it must get, for a person
    bug: str | None = None  # a known bug: the test is xfail(strict=True) for this reason


CATALOGUE: dict[str, Case] = {}


def register(name: str, surface: str, given: str, answer: str, bug: str | None = None) -> Case:
    assert surface in ("http", "stream"), surface
    if name in CATALOGUE:
        raise ValueError(f"hostile case {name!r} is registered twice")
    CATALOGUE[name] = found = Case(name, surface, given, answer, bug)
    return found


def case(name: str, *, given: str, answer: str, surface: str = "stream",
         bug: str | None = None, bug_marks_itself: bool = False) -> Callable[[F], F]:  # fmt: skip
    """Register a case for one test function: xfail strict when ``bug`` is given, unless the
    test marks itself where the bug bites (``bug_marks_itself``: one database kind only)."""
    register(name, surface, given, answer, bug)

    def decorate(test: F) -> F:
        if bug is not None and not bug_marks_itself:
            test = pytest.mark.xfail(strict=True, reason=bug)(test)
        return test

    return decorate


def changeable_tables() -> list[type]:
    """Every table but the audit log (whose name may not exist in every version of the schema)."""
    return [model for model in models.MODELS if model.__name__ != "AuditEvent"]


def table_counts() -> dict[str, int]:
    """Row counts of every table (the peewee models must be bound)."""
    with models.database_proxy.connection_context():
        return {model.__name__: model.select().count() for model in changeable_tables()}


INTERNAL_WORDS = (
    "Traceback", "pydantic", "errors.pydantic.dev", "Input should", "Field required",
    "TaskCreate", "CommandIn", "TargetsIn", "_Strict", "model_", "daemon.", ".py", "peewee",
    "sqlite", "psycopg", "quart", "werkzeug", "hypercorn", "Exception", "Error:",
)  # fmt: skip


def short(value: Any, size: int = 300) -> str:
    text = repr(value)
    return text if len(text) <= size else text[:size] + f"... ({len(text)} characters)"


def assert_json_error(
    status: int, body: Any, want_status: int, code: str, field: str | None = None,
    *, message_has: str | None = None,
) -> None:  # fmt: skip
    """The JSON error of API.md, exactly: status, code, field; a short message for a person."""
    assert status == want_status, short((status, body))
    assert isinstance(body, dict) and set(body) == {"error"}, short(body)
    error = body["error"]
    assert set(error) <= {"code", "message", "field"}, short(error)
    assert error["code"] == code, short(error)
    assert error.get("field") == field, short(error)
    message = error["message"]
    assert isinstance(message, str) and 0 < len(message) <= 400, short(error)
    for word in INTERNAL_WORDS:
        assert word not in message, (word, short(message))
    if message_has is not None:
        assert message_has in message, (message_has, short(message))
