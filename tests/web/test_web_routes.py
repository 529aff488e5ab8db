"""dispatchd serves the console: the page and its files with strict headers, nothing outside
``web/static``, every file the page loads present, no script that parses data as HTML, and the
one API route the console adds (``/api/v1/whoami``)."""

from __future__ import annotations

import re
import socket
from pathlib import Path

import pytest
import trio

from daemon.api import web_routes
from tests.e2e.cluster import API_TOKEN, Cluster

pytestmark = pytest.mark.web

WEB = Path(__file__).resolve().parents[2] / "web"
STATIC = WEB / "static"


def raw_get(port: int, target: bytes) -> tuple[int, bytes]:
    """A request with the target exactly as given (clients normalise '..' away)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"GET " + target + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


async def test_the_page_and_its_files_come_with_strict_headers(cluster: Cluster) -> None:
    await cluster.start_daemon()
    page = await cluster.http.get("/", headers={"Authorization": ""})
    assert page.status_code == 200
    assert page.headers["content-type"] == "text/html; charset=utf-8"
    csp = page.headers["content-security-policy"]
    directives = ["default-src 'self'", "script-src 'self'", "style-src 'self'",
                  "object-src 'none'", "frame-ancestors 'none'", "base-uri 'none'"]  # fmt: skip
    for directive in directives:
        assert directive in csp
    assert "unsafe" not in csp and "*" not in csp
    assert page.headers["x-content-type-options"] == "nosniff"
    assert page.headers["referrer-policy"] == "no-referrer"
    assert page.headers["cache-control"] == "no-cache"
    again = await cluster.http.get("/", headers={"If-None-Match": page.headers["etag"]})
    assert again.status_code == 304 and again.content == b""

    # every file the page and its modules load is served, with its type, without a token
    wanted = {"/static/app.js": "text/javascript; charset=utf-8"}
    for ref in re.findall(r'(?:src|href)="(/static/[^"]+)"', page.text):
        wanted[ref] = web_routes.CONTENT_TYPES[Path(ref).suffix]
    for module in STATIC.rglob("*.js"):
        for imported in re.findall(r'from "(\.{1,2}/[^"]+)"', module.read_text()):
            target = (module.parent / imported).resolve().relative_to(STATIC)
            wanted[f"/static/{target}"] = "text/javascript; charset=utf-8"
    assert len(wanted) >= 15
    for path, content_type in wanted.items():
        response = await cluster.http.get(path, headers={"Authorization": ""})
        assert response.status_code == 200, path
        assert response.headers["content-type"] == content_type, path
        assert "default-src 'self'" in response.headers["content-security-policy"]


async def test_static_paths_cannot_leave_web_static(cluster: Cluster) -> None:
    await cluster.start_daemon()
    port = cluster.http_port
    attempts = [
        b"/static/../index.html", b"/static/..%2findex.html", b"/static/%2e%2e/index.html",
        b"/static/%2e%2e/%2e%2e/pyproject.toml", b"/static/pages/../../../pyproject.toml",
        b"/static/..%2f..%2fpyproject.toml", b"/static//etc/passwd", b"/static/%2fetc%2fpasswd",
        b"/static/.hidden.js", b"/static/app.js%00.css", b"/static/..%5c..%5cpyproject.toml",
        b"/static/web_routes.py", b"/static/", b"/static/pages",
    ]  # fmt: skip
    for target in attempts:
        status, body = await trio.to_thread.run_sync(raw_get, port, target)
        # 401: no route matched (unknown routes ask for a token rather than reveal themselves)
        assert status in (400, 401, 404), (target, status)
        assert b"[build-system]" not in body and b"root:" not in body, target
        assert b'"error"' in body, (target, body[:200])  # a JSON error, as everywhere
    status, body = await trio.to_thread.run_sync(raw_get, port, b"/static/pages/task.js")
    assert status == 200 and b"export" in body


def test_resolve_static_keeps_to_its_root(tmp_path: Path) -> None:
    root = tmp_path / "static"
    (root / "pages").mkdir(parents=True)
    (root / "app.js").write_text("x")
    (root / "pages" / "a.js").write_text("x")
    (tmp_path / "secret.js").write_text("no")
    (root / "link.js").symlink_to(tmp_path / "secret.js")  # a symlink out of the root
    (root / "notes.md").write_text("x")
    resolved = root.resolve()
    assert web_routes.resolve_static(resolved, "app.js") == resolved / "app.js"
    assert web_routes.resolve_static(resolved, "pages/a.js") == resolved / "pages" / "a.js"
    refused = ["../secret.js", "link.js", "pages/../../secret.js", "/etc/passwd", "notes.md",
               "", ".", "pages", "pages/", ".x.js", "a\\..\\secret.js", "app.js\x00"]  # fmt: skip
    for path in refused:
        assert web_routes.resolve_static(resolved, path) is None, path


def test_the_web_root_is_found_beside_the_daemon_package() -> None:
    assert web_routes.find_web_root() == WEB
    assert (WEB / "index.html").is_file()


def test_no_script_turns_data_into_markup_and_nothing_comes_from_elsewhere() -> None:
    files = [WEB / "index.html", *STATIC.rglob("*.js"), *STATIC.rglob("*.css")]
    for path in files:
        text = path.read_text()
        for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(",
                     "new Function", "setAttribute(\"on", "javascript:"):  # fmt: skip
            assert sink not in text, (path.name, sink)
        assert not re.search(r"https?://", text), (path.name, "a URL of another origin")
    index = (WEB / "index.html").read_text()
    assert "style=" not in index and not re.search(r"<script(?![^>]*\bsrc=)", index)


async def test_whoami_says_who_the_token_is_and_what_its_role_may_do(cluster: Cluster) -> None:
    await cluster.start_daemon()
    me = await cluster.get("/api/v1/whoami")
    assert me["actor"] == "bootstrap" and me["role"] == "admin"
    assert {"create_task", "approve_host", "whoami"} <= set(me["may"])
    viewer = await cluster.post("/api/v1/tokens", {"name": "look", "role": "viewer"})
    response = await cluster.http.get(
        "/api/v1/whoami", headers={"Authorization": f"Bearer {viewer['token']}"}
    )
    assert response.json()["role"] == "viewer" and response.json()["actor"] == "token:look"
    assert "create_task" not in response.json()["may"] and "list_tasks" in response.json()["may"]
    anonymous = await cluster.http.get("/api/v1/whoami", headers={"Authorization": ""})
    assert anonymous.status_code == 401 and anonymous.json()["error"]["code"] == "unauthorized"
    paths = (await cluster.get("/openapi.json"))["paths"]
    assert "/api/v1/whoami" in paths
    assert "/" not in paths and not any(p.startswith("/static") for p in paths)
    assert API_TOKEN not in str(me)
