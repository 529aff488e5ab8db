"""The web console in a real browser against the real programs.

The daemon and agents run as processes through ``tests/e2e/cluster.py`` (trio). Playwright's
async API needs asyncio, which trio cannot host, so a test's browser part runs with Playwright's
*sync* API in one worker thread (``trio.to_thread.run_sync``): every Playwright object stays on
the thread that made it, the trio loop stays free, and the browser part can still call the
cluster's async helpers through ``trio.from_thread.run`` (``Console.call``). Every Playwright wait
has a timeout, and each test runs under ``trio.fail_after``.

Chromium is the system's (``apt-get install chromium``); Playwright's own browser download is
never used. Screenshots go to ``$DISPATCH_WEB_SCREENSHOTS`` when set (``docs/screenshots`` to
refresh the README's), else to the test's temporary directory.
"""

from __future__ import annotations

import asyncio
import functools
import os
import re
import sys
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import trio

from tests.e2e.cluster import API_TOKEN, Cluster

CHROMIUM = Path("/usr/bin/chromium")
LAUNCH_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip
ACTION_TIMEOUT_MS = 20_000
VIEWPORT = {"width": 1360, "height": 900}

needs_chromium = pytest.mark.skipif(
    not CHROMIUM.exists(), reason="needs /usr/bin/chromium (apt-get install chromium; .ci/run does)"
)

# Console messages that are not faults: a refused token is meant to be refused, and a request the
# page aborted (it navigated away, or a stream it closed) is not an error.
EXPECTED_CONSOLE = re.compile(r"status of 40[134]|net::ERR_ABORTED|password forms", re.I)


@dataclass
class Console:
    """One browser page on the daemon's console, used from the browser thread."""

    page: Any
    cluster: Cluster
    shots: Path
    problems: list[str] = field(default_factory=list)
    expected: list[re.Pattern[str]] = field(default_factory=lambda: [EXPECTED_CONSOLE])

    def allow(self, pattern: str) -> None:
        """Console errors matching ``pattern`` are part of this test (a daemon it stops)."""
        self.expected.append(re.compile(pattern, re.I))

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.cluster.http_port}/"

    def call(self, fn: Callable[..., Awaitable[Any]], *args: Any, **kwargs: Any) -> Any:
        """Run one of the cluster's async helpers from the browser thread."""
        return trio.from_thread.run(functools.partial(fn, *args, **kwargs))

    def api(self, method: str, path: str, body: Any = None, token: str = API_TOKEN) -> Any:
        async def send() -> Any:
            response = await self.cluster.http.request(
                method, path, json=body, headers={"Authorization": f"Bearer {token}"}
            )
            assert response.status_code < 300, (path, response.status_code, response.text)
            return response.json()

        return trio.from_thread.run(send)

    def open(self, route: str = "") -> None:
        self.page.goto(self.url + (f"#{route}" if route else ""))

    def sign_in(self, token: str = API_TOKEN, route: str = "/tasks") -> None:
        self.open(route)
        self.page.fill("#token", token)
        self.page.click("form.signin button[type=submit]")
        self.page.wait_for_selector("#who .role")

    def go(self, route: str) -> None:
        """Follow an in-page link (no reload)."""
        self.page.evaluate("route => { location.hash = route; }", route)

    def shot(self, name: str, full_page: bool = True) -> None:
        self.page.screenshot(path=str(self.shots / f"{name}.png"), full_page=full_page)

    def body_rows(self, table: str = ".vtable") -> int:
        return self.page.locator(f"{table} tbody tr:not(.spacer)").count()

    def wait_rows(self, count: int, rows: str = ".vtable tbody tr[data-host]") -> None:
        self.page.wait_for_function(
            "([rows, count]) => document.querySelectorAll(rows).length === count", arg=[rows, count]
        )

    def wait_text(self, selector: str, text: str, timeout_ms: float = ACTION_TIMEOUT_MS) -> None:
        """Until the element's text contains ``text`` (e.g. output arriving)."""
        self.page.wait_for_function(
            "([sel, text]) => (document.querySelector(sel)?.textContent || '').includes(text)",
            arg=[selector, text],
            timeout=timeout_ms,
        )

    def mark_no_reload(self) -> None:
        self.page.evaluate("() => { window.__sameDocument = 'yes'; }")

    def assert_no_reload(self) -> None:
        assert self.page.evaluate("() => window.__sameDocument") == "yes", "the page reloaded"


def _screenshot_dir(tmp: Path) -> Path:
    wanted = os.environ.get("DISPATCH_WEB_SCREENSHOTS")
    path = Path(wanted) if wanted else tmp / "screenshots"
    path.mkdir(parents=True, exist_ok=True)
    return path


@contextmanager
def _plain_asyncio() -> Iterator[None]:
    """Playwright's sync API runs an asyncio loop of its own in this thread. Once trio-asyncio
    is imported (the programs' gRPC bridges, other tests), ``asyncio.new_event_loop()`` makes a
    trio-asyncio loop instead, which Playwright cannot drive; under trio-asyncio a policy set here
    is this thread's only, so this thread gets plain asyncio back and no other thread notices."""
    if "trio_asyncio" not in sys.modules:
        yield
        return
    asyncio.set_event_loop_policy(asyncio.DefaultEventLoopPolicy())
    try:
        yield
    finally:
        asyncio.set_event_loop_policy(None)


def _run(cluster: Cluster, tmp: Path, scenario: Callable[[Console], Any]) -> Any:
    from playwright.sync_api import sync_playwright

    with _plain_asyncio(), sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=str(CHROMIUM), args=LAUNCH_ARGS, timeout=60_000
        )
        try:
            context = browser.new_context(viewport=VIEWPORT, device_scale_factor=1)
            context.set_default_timeout(ACTION_TIMEOUT_MS)
            page = context.new_page()
            console = Console(page, cluster, _screenshot_dir(tmp))
            page.on("pageerror", lambda error: console.problems.append(f"page error: {error}"))
            page.on("dialog", lambda dialog: (console.problems.append(f"dialog: {dialog.message}"),
                                              dialog.dismiss()))  # fmt: skip

            def on_console(message: Any) -> None:
                expected = any(p.search(message.text) for p in console.expected)
                if message.type == "error" and not expected:
                    console.problems.append(f"console: {message.text}")

            page.on("console", on_console)
            result = scenario(console)
            # nothing went wrong on the page: no script error, no CSP refusal, no dialog
            assert console.problems == [], console.problems
            return result
        finally:
            browser.close()


async def in_browser(cluster: Cluster, tmp: Path, scenario: Callable[[Console], Any]) -> Any:
    """Run ``scenario(console)`` in a fresh headless Chromium, in a worker thread."""
    return await trio.to_thread.run_sync(_run, cluster, tmp, scenario)
