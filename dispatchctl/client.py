"""The HTTP API as dispatchctl uses it: JSON calls, raw output, pages, and a task's event stream.

Every failure becomes one of two exceptions that say what happened in words: ``ApiError`` (the
daemon answered with an error: its code, message and the field at fault) and ``Unreachable``
(no answer: connection refused, TLS, timeout; or an event stream that broke or is not one).

The event stream is read with httpx-sse, which splits ``text/event-stream`` into events the way
the specification says (lines split across reads, CR/LF endings, comments, the last event id
carried from one event to the next); ``events_from`` turns those into ``Event``s.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import httpx
from httpx_sse import ServerSentEvent, SSEError, connect_sse

from dispatchctl import __version__
from dispatchctl.config import CtlConfig

API = "/api/v1"
Params = list[tuple[str, str]]


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.field = status, code, message, field

    def __str__(self) -> str:
        where = f" (field {self.field})" if self.field else ""
        text = f"{self.message}{where} [{self.code}, HTTP {self.status}]"
        if self.status == 401:
            text += "; give a token with --token, --token-file or DISPATCH_TOKEN"
        return text


class Unreachable(Exception):
    pass


@dataclass(frozen=True)
class Event:
    """One event of a task's stream: its kind, the stream's last event id so far (what a
    reconnection resumes from; None until the stream has given one) and its JSON object."""

    kind: str
    id: int | None
    data: dict[str, Any]


class Client:
    def __init__(
        self,
        config: CtlConfig,
        token: str | None,
        *,
        transport: httpx.BaseTransport | None = None,  # tests answer with httpx.MockTransport
    ) -> None:
        headers = {"User-Agent": f"dispatchctl/{__version__}", "Accept": "application/json"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        self.url = config.url.rstrip("/")
        self._config = config
        self._http = httpx.Client(
            base_url=self.url,
            headers=headers,
            timeout=config.request_timeout_s,
            verify=str(config.ca_file) if config.ca_file else True,
            transport=transport,
        )

    def close(self) -> None:
        self._http.close()

    # ------------------------------------------------------------------ calls

    def request(
        self,
        method: str,
        path: str,
        *,
        params: Params | None = None,
        body: Any = None,
        headers: dict[str, str] | None = None,
    ) -> httpx.Response:
        try:
            response = self._http.request(
                method,
                API + path,
                # a tuple: httpx's annotation takes a list only of its own wider pair type
                params=tuple(params) if params is not None else None,
                json=body,
                headers=headers,
            )
        except httpx.TimeoutException:
            raise Unreachable(
                f"{self.url} did not answer within {self._config.request_timeout_s:g} s"
            ) from None
        except httpx.HTTPError as exc:
            raise Unreachable(f"cannot reach {self.url}: {_reason(exc)}") from None
        if response.status_code >= 400:
            raise api_error(response)
        return response

    def get(self, path: str, params: Params | None = None) -> Any:
        return self.request("GET", path, params=params).json()

    def post(
        self,
        path: str,
        body: Any = None,
        *,
        params: Params | None = None,
        headers: dict[str, str] | None = None,
    ) -> Any:
        return self.request("POST", path, params=params, body=body, headers=headers).json()

    def delete(self, path: str) -> Any:
        return self.request("DELETE", path).json()

    def pages(self, path: str, params: Params, *, follow: bool) -> dict[str, Any]:
        """One page (``{"items", "next_cursor"}``), or every page when ``follow``."""
        page = self.get(path, params)
        items = list(page["items"])
        while follow and page.get("next_cursor"):
            page = self.get(path, [*params, ("cursor", page["next_cursor"])])
            items.extend(page["items"])
        return {"items": items, "next_cursor": None if follow else page.get("next_cursor")}

    # ------------------------------------------------------------------ the event stream

    def events(
        self, task_id: str, *, last_event_id: int, output: bool, read_timeout_s: float
    ) -> Iterator[Event]:
        """The task's events after ``last_event_id`` until the server ends the stream; raises
        ``Unreachable`` when the connection breaks (the caller reconnects from the last id)."""
        timeout = httpx.Timeout(self._config.request_timeout_s, read=read_timeout_s)
        params = {"output": "true" if output else "false"}
        headers = {"Last-Event-ID": str(last_event_id)}
        try:
            with connect_sse(
                self._http,
                "GET",
                f"{API}/tasks/{task_id}/events",
                params=params,
                headers=headers,
                timeout=timeout,
            ) as source:
                if source.response.status_code >= 400:
                    source.response.read()
                    raise api_error(source.response)
                yield from events_from(source.iter_sse())
        except SSEError as exc:  # answered, but with something else than an event stream
            raise Unreachable(f"the event stream broke: not an event stream ({exc})") from None
        except httpx.HTTPError as exc:
            raise Unreachable(f"the event stream broke: {_reason(exc)}") from None


def events_from(stream: Iterable[ServerSentEvent]) -> Iterator[Event]:
    """The stream's events with their JSON data; events without data (a lone ``id:`` or
    ``retry:``) carry nothing to show and are skipped. Data that is not a JSON object means the
    stream was mangled on the way: ``Unreachable``, so the caller resumes from the last good id."""
    for sse in stream:
        if not sse.data:
            continue
        try:
            data = json.loads(sse.data)
        except ValueError as exc:
            raise Unreachable(
                f"the event stream broke: a {sse.event!r} event is not JSON ({exc})"
            ) from None
        if not isinstance(data, dict):
            raise Unreachable(f"the event stream broke: a {sse.event!r} event is not a JSON object")
        # ids are the daemon's change numbers; anything else cannot be resumed from
        event_id = int(sse.id) if sse.id.isascii() and sse.id.isdigit() else None
        yield Event(sse.event, event_id, data)


def api_error(response: httpx.Response) -> ApiError:
    try:
        error = response.json()["error"]
        return ApiError(response.status_code, error["code"], error["message"], error.get("field"))
    except (ValueError, KeyError, TypeError):
        reason = response.reason_phrase or "error"
        return ApiError(
            response.status_code,
            "http_error",
            f"HTTP {response.status_code} {reason} from "
            f"{response.request.url} (not an answer of dispatchd's API)",
        )


def _reason(exc: httpx.HTTPError) -> str:
    cause: BaseException = exc
    while (deeper := cause.__cause__ or cause.__context__) is not None:
        cause = deeper
    text = str(exc) or type(exc).__name__
    inner = str(cause)
    return text if inner in text or cause is exc else f"{text} ({inner})"
