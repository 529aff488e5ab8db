"""Reading HTTP requests: strict JSON bodies, query strings, path ids and headers, validated by
the models of ``daemon.api.schemas``; a pydantic ``ValidationError`` becomes
``errors.InvalidRequest`` with the dotted path of the first field at fault
(``commands.0.timeout_s``) and a sentence for a person ("timeout_s must be greater than 0").
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Callable
from typing import Any

from pydantic import BaseModel, ValidationError
from quart import g, request
from quart_schema import DataSource
from quart_schema.validation import (
    QUART_SCHEMA_QUERYSTRING_ATTRIBUTE,
    QUART_SCHEMA_REQUEST_ATTRIBUTE,
    QUART_SCHEMA_RESPONSE_ATTRIBUTE,
)

from daemon import errors
from daemon.api.responses import ErrorBody
from daemon.api.schemas import (
    MAX_ID,
    EventsQuery,
    ExecutionListQuery,
    HttpLimits,
    TaskCreate,
    TaskListQuery,
)
from daemon.taskspec import CommandSpec, TaskSpec


class UnsupportedMediaType(errors.DispatchError):
    status = 415
    code = "unsupported_media_type"


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise ValueError(f"key {key!r} appears twice")
        result[key] = value
    return result


async def read_json() -> Any:
    """The request body as JSON: strictly (UTF-8, no NaN/Infinity, no repeated keys)."""
    if request.mimetype != "application/json" and not request.mimetype.endswith("+json"):
        raise UnsupportedMediaType("send the body as application/json")
    raw = await request.get_data(cache=True, as_text=False, parse_form_data=False)
    g.body_read = True
    if not raw.strip():
        raise errors.InvalidRequest("the body is empty: send a JSON object", code="invalid_json")
    try:
        return json.loads(
            raw.decode("utf-8"),
            parse_constant=_reject_constant,
            object_pairs_hook=_no_duplicate_keys,
        )
    except UnicodeDecodeError:
        raise errors.InvalidRequest("the body is not UTF-8", code="invalid_json") from None
    except RecursionError:
        raise errors.InvalidRequest("the body nests too deeply", code="invalid_json") from None
    except json.JSONDecodeError as error:
        raise errors.InvalidRequest(
            f"the body is not valid JSON: {error.msg} (line {error.lineno}, column {error.colno})",
            code="invalid_json",
        ) from None
    except ValueError as error:
        raise errors.InvalidRequest(
            f"the body is not valid JSON: {error}", code="invalid_json"
        ) from None


def _limits() -> HttpLimits:
    return g.dispatch_limits


def _document_errors(view: Callable, *statuses: int) -> None:
    """List the error answers a validating decorator can give in ``/openapi.json``."""
    schemas = dict(getattr(view, QUART_SCHEMA_RESPONSE_ATTRIBUTE, {}))
    for status in statuses:
        schemas.setdefault(status, (ErrorBody, None))
    setattr(view, QUART_SCHEMA_RESPONSE_ATTRIBUTE, schemas)


def json_body(model: type[BaseModel]) -> Callable:
    """Validate the JSON body with ``model``; the view gets it as ``body=``."""

    def decorator(view: Callable) -> Callable:
        @functools.wraps(view)
        async def wrapper(*args: Any, **kwargs: Any) -> Any:
            data = await read_json()
            try:
                body = model.model_validate(data, context={"limits": _limits()})
            except ValidationError as error:
                raise invalid_request_from(error) from None
            return await view(*args, body=body, **kwargs)

        setattr(wrapper, QUART_SCHEMA_REQUEST_ATTRIBUTE, (model, DataSource.JSON))
        # 400 a bad value or not JSON, 413 too large, 415 not application/json
        _document_errors(wrapper, 400, 413, 415)
        return wrapper

    return decorator


def query_args(model: type[BaseModel]) -> Callable:
    """Validate the query string with ``model``; the view gets it as ``args=``. A parameter
    given twice is an error unless the model lists it in ``repeatable``."""

    def decorator(view: Callable) -> Callable:
        @functools.wraps(view)
        async def wrapper(*args: Any, **kwargs: Any) -> Any:
            repeatable = getattr(model, "repeatable", frozenset())
            data: dict[str, Any] = {}
            for key in request.args:
                values = request.args.getlist(key)
                if key in repeatable:
                    data[key] = values
                elif len(values) > 1:
                    raise errors.InvalidRequest(
                        f"{shown_name(key)} is given more than once", field=key
                    )
                else:
                    data[key] = values[0]
            try:
                parsed = model.model_validate(data, context={"limits": _limits()})
            except ValidationError as error:
                raise invalid_request_from(error, parameter=True) from None
            return await view(*args, args=parsed, **kwargs)

        setattr(wrapper, QUART_SCHEMA_QUERYSTRING_ATTRIBUTE, model)
        _document_errors(wrapper, 400)
        return wrapper

    return decorator


def path_id(text: str, what: str) -> int:
    """A decimal id from the path; anything else names nothing (404)."""
    if re.fullmatch(r"[0-9]{1,19}", text) is None or not 0 < int(text) <= MAX_ID:
        raise errors.NotFound(f"there is no {what} {text[:40]!r}")
    return int(text)


_IDEMPOTENCY_KEY_RE = re.compile(r"[\x21-\x7e]{1,200}")


def idempotency_key() -> str | None:
    key = request.headers.get("Idempotency-Key")
    if key is None:
        return None
    if _IDEMPOTENCY_KEY_RE.fullmatch(key) is None:
        raise errors.InvalidRequest(
            "Idempotency-Key must be 1 to 200 visible ASCII characters", field="Idempotency-Key"
        )
    return key


def last_event_id(args: EventsQuery) -> int | None:
    header = request.headers.get("Last-Event-ID", "").strip()
    text, field = (header, "Last-Event-ID") if header else (args.last_event_id, "last_event_id")
    if not text:
        return None
    if re.fullmatch(r"[0-9]{1,19}", text) is None or int(text) > MAX_ID:
        raise errors.InvalidRequest(f"{field} must be an event id this stream sent", field=field)
    return int(text)


def task_spec(body: TaskCreate) -> TaskSpec:
    return TaskSpec(
        name=body.name,
        commands=tuple(
            CommandSpec(
                script=command.script,
                timeout_s=float(command.timeout_s),
                args=tuple(command.args),
                env=dict(command.env),
                cwd=command.cwd,
            )
            for command in body.commands
        ),
        target_hosts=tuple(body.targets.hosts),
        target_labels=dict(body.targets.labels),
        max_concurrency=body.max_concurrency,
        max_failures=body.max_failures,
        delivery_timeout_s=float(body.delivery_timeout_s),
        continue_on_error=body.continue_on_error,
    )


def time_range(args: TaskListQuery | ExecutionListQuery) -> tuple[float | None, float | None]:
    since, until = args.time_range()
    if since is not None and until is not None and until <= since:
        raise errors.InvalidRequest("until must be later than since", field="until")
    return since, until


def statuses(text: str | None) -> tuple[str, ...]:
    return tuple(sorted(set(text.split(",")))) if text else ()


# --- validation errors for people -----------------------------------------------------------


_DICT_FIELDS = frozenset({"env", "labels"})  # their entries are named env['KEY']
_PLAIN_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]{0,63}")
_SHOWN_CHARS = 40  # of a name the client made up (an unknown field, a key), in a message
_MAX_MESSAGE_CHARS = 300


def _quoted(text: str) -> str:
    """A name the client chose, for a message: quoted, control characters escaped, bounded."""
    if len(text) > _SHOWN_CHARS:
        return repr(text[:_SHOWN_CHARS])[:-1] + f"…' ({len(text)} characters)"
    return repr(text)


def shown_name(name: object) -> str:
    """A field or parameter name as a message shows it: plain names as they are, anything
    else (empty, control characters, very long) quoted and bounded."""
    text = str(name)
    return text if _PLAIN_NAME.fullmatch(text) else _quoted(text)


def _name_of(loc: tuple[Any, ...]) -> str:
    """``("commands", 0, "timeout_s")`` -> ``timeout_s``; ``("targets", "hosts", 1)`` ->
    ``hosts[1]``; ``(..., "env", "A")`` -> ``env['A']``; a key -> ``key 'X' of env``."""
    if not loc:
        return "the body"
    if loc[-1] == "[key]" and len(loc) >= 3:
        return f"key {_quoted(str(loc[-2]))} of {shown_name(loc[-3])}"
    if len(loc) >= 2 and loc[-2] in _DICT_FIELDS and isinstance(loc[-1], str):
        return f"{loc[-2]}[{_quoted(loc[-1])}]"
    parts: list[str] = []
    for item in reversed(loc):
        parts.append(f"[{item}]" if isinstance(item, int) else shown_name(item))
        if not isinstance(item, int):
            break
    return "".join(reversed(parts))


_PHRASES = {
    "missing": "is required",
    "extra_forbidden": "is not a known field",
    "model_type": "must be a JSON object",
    "model_attributes_type": "must be a JSON object",
    "dict_type": "must be a JSON object",
    "list_type": "must be a list",
}


def _length_phrase(kind: str, ctx: dict[str, Any], value: Any) -> str:
    unit = "characters" if isinstance(value, str) else "items"
    if kind.endswith("too_short"):
        minimum = ctx.get("min_length")
        return "must not be empty" if minimum == 1 else f"must have at least {minimum} {unit}"
    return f"must have at most {ctx.get('max_length')} {unit}"


def describe_error(error: dict[str, Any]) -> tuple[str, str]:
    """(dotted field path, message) for one pydantic error."""
    loc = tuple(error.get("loc", ()))
    path_loc = loc[:-2] if loc and loc[-1] == "[key]" else loc
    path = ".".join(str(part) for part in path_loc)
    kind, message = error.get("type", ""), str(error.get("msg", "is not valid"))
    ctx = error.get("ctx") or {}
    if kind in _PHRASES:
        phrase = _PHRASES[kind]
    elif kind in ("too_short", "too_long", "string_too_short", "string_too_long"):
        phrase = _length_phrase(kind, ctx, error.get("input"))
    elif kind == "string_pattern_mismatch":
        phrase = f"must match the pattern {str(ctx.get('pattern'))[:100]}"
    elif kind == "literal_error":
        phrase = f"must be {ctx.get('expected')}"
    elif message.startswith("Input should be "):
        phrase = "must be " + message.removeprefix("Input should be ")
    elif message.startswith("Value error, "):
        phrase = message.removeprefix("Value error, ")
    else:
        phrase = message
    text = f"{_name_of(loc)} {phrase}"
    if len(text) > _MAX_MESSAGE_CHARS:
        text = text[: _MAX_MESSAGE_CHARS - 1] + "…"
    return path, text


def invalid_request_from(
    error: ValidationError, *, prefix: str = "", parameter: bool = False
) -> errors.InvalidRequest:
    """The first problem as ``InvalidRequest``. ``parameter``: the model is a query string,
    whose ``field`` is the parameter's name (``label``, not ``label.0`` for its first value)."""
    problems = error.errors(include_url=False)
    if not problems:
        return errors.InvalidRequest("the request is not valid")
    first = dict(problems[0])
    path, message = describe_error(first)
    if len(problems) > 1:
        message += f" (and {len(problems) - 1} more problem{'s' if len(problems) > 2 else ''})"
    if parameter:
        loc = tuple(first.get("loc", ()))
        return errors.InvalidRequest(message, field=str(loc[0]) if loc else None)
    if path == "" and tuple(first.get("loc", ())) == ("",):
        return errors.InvalidRequest(message, field="")  # a field named "" (unknown)
    field = ".".join(part for part in (prefix, path) if part) or None
    return errors.InvalidRequest(message, field=field)
