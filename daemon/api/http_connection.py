"""quart-trio's per-request ASGI handler, fixed so connections are closed and reused properly.

quart-trio (0.12) runs each request as two tasks: one sends the response, the other reads the
client's messages and cancels both when ``http.disconnect`` arrives. hypercorn sends that
disconnect as soon as the response is complete, which is while the final body ``send`` is still
in hypercorn's hands: the cancel cut that send short, so hypercorn never finished the response
cycle. A ``Connection: close`` was never honoured, keep-alive connections were never closed, and
a request pipelined on a reused connection could wait for a timeout. Here a disconnect cancels
the request only while the response is still being produced (a client gone mid-stream, e.g. an
SSE watcher): once the final part is handed over, the send is left to finish.

It overrides quart-trio's and quart's internals, so both are pinned below their next minor in
``pyproject.toml``; ``tests/test_pinned_internals.py`` checks the methods it relies on.
"""

from __future__ import annotations

from typing import Any

import trio
from quart.wrappers import Request
from quart_trio import QuartTrio
from quart_trio.asgi import TrioASGIHTTPConnection


class _Connection(TrioASGIHTTPConnection):
    _final_part_sent = False

    async def handle_messages(  # type: ignore[override]
        self, nursery: trio.Nursery, request: Request, receive: Any
    ) -> None:
        await super(TrioASGIHTTPConnection, self).handle_messages(request, receive)
        if not self._final_part_sent:
            nursery.cancel_scope.cancel()

    async def _send_response(self, send: Any, response: Any) -> None:
        async def tracking_send(event: dict[str, Any]) -> None:
            if event["type"] == "http.response.body" and not event.get("more_body", False):
                self._final_part_sent = True
            await send(event)

        await super()._send_response(tracking_send, response)


class DispatchQuart(QuartTrio):
    asgi_http_class = _Connection  # type: ignore[assignment]
