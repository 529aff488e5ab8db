"""The HTTP API as dispatchctl uses it: JSON calls, raw output, pages, and a task's event stream.

Every failure becomes one of two exceptions that say what happened in words: ``ApiError`` (the
daemon answered with an error: its code, message and the field at fault) and ``Unreachable``
(no answer: connection refused, TLS, timeout).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx

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
    """One Server-Sent Event: its kind, its id (None when it has none) and its JSON data."""

    kind: str
    id: int | None
    data: Any


class Client:
    def __init__(self, config: CtlConfig, token: str | None) -> None:
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
                method, API + path, params=params, json=body, headers=headers
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
        headers = {"Accept": "text/event-stream", "Last-Event-ID": str(last_event_id)}
        try:
            with self._http.stream(
                "GET",
                f"{API}/tasks/{task_id}/events",
                params=params,
                headers=headers,
                timeout=timeout,
            ) as response:
                if response.status_code >= 400:
                    response.read()
                    raise api_error(response)
                yield from parse_events(response.iter_lines())
        except httpx.HTTPError as exc:
            raise Unreachable(f"the event stream broke: {_reason(exc)}") from None


def parse_events(lines: Iterator[str]) -> Iterator[Event]:
    """``text/event-stream`` lines to events (comments and events without data are skipped)."""
    kind, event_id, data = "message", None, []
    for line in lines:
        if not line:
            if data:
                yield Event(kind, event_id, json.loads("\n".join(data)))
            kind, event_id, data = "message", None, []
            continue
        if line.startswith(":"):
            continue
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "event":
            kind = value
        elif name == "data":
            data.append(value)
        elif name == "id" and value.isdigit():
            event_id = int(value)


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
    cause: BaseException | None = exc
    while cause.__cause__ is not None or cause.__context__ is not None:
        cause = cause.__cause__ or cause.__context__
        assert cause is not None
    text = str(exc) or type(exc).__name__
    inner = str(cause)
    return text if inner in text or cause is exc else f"{text} ({inner})"


def backoff(attempt: int) -> float:
    return min(0.2 * 2**attempt, 5.0)


def sleep(seconds: float) -> None:
    time.sleep(seconds)
