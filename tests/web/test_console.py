"""The web console in headless Chromium against the real dispatchd and real dispatch-agents:
sign in, hosts and their enrolment, a task created and started from the form whose progress and
output move live without a reload, cancel, retry of the hosts that did not succeed, hostile names
and output shown as text, the task history's filters and pages, errors in words, and the live
stream surviving a daemon restart."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest
import trio

from agent import __version__ as agent_version
from tests.e2e.cluster import Cluster
from tests.web.console import Console, in_browser, needs_chromium

pytestmark = [pytest.mark.web, pytest.mark.e2e, needs_chromium]

ROW = "tr[data-host='{}']"


async def start_agents(cluster: Cluster, hosts: dict[str, list[str]], wait: bool = True) -> None:
    for host, labels in hosts.items():
        extra = [arg for label in labels for arg in ("--label", label)]
        await cluster.start_agent(host, *extra, wait=False)
    if wait:
        await cluster.wait_online(list(hosts))


async def make_token(cluster: Cluster, name: str, role: str) -> dict:
    return await cluster.post("/api/v1/tokens", {"name": name, "role": role})


async def test_sign_in_approve_hosts_and_filter_them(cluster: Cluster, tmp_path: Path) -> None:
    cluster.daemon_security_args = ["--plaintext"]  # no --auto-approve: hosts wait for an admin
    await cluster.start_daemon()
    await start_agents(cluster, {"web-1": ["role=web", "dc=fra1"], "web-2": ["role=web", "dc=ams"],
                                 "db-1": ["role=db", "dc=fra1"]}, wait=False)  # fmt: skip
    with trio.fail_after(30):
        while len((await cluster.get("/api/v1/hosts?enrollment=pending"))["items"]) < 3:  # noqa: ASYNC110
            await trio.sleep(0.1)
    viewer = await make_token(cluster, "night-shift", "viewer")

    def scenario(c: Console) -> None:
        page = c.page
        c.open()
        page.fill("#token", "dsp_not-a-token-at-all")
        page.click("form.signin button[type=submit]")
        c.wait_text("form.signin .message.error", "not accepted")
        page.fill("#token", "")
        c.shot("sign-in")
        c.sign_in(route="/hosts")
        assert page.inner_text("#who").startswith("bootstrap")
        for host, action in (("web-1", "Approve"), ("web-2", "Approve"), ("db-1", "Reject")):
            page.click(f"section.pending li[data-host='{host}'] button:has-text('{action}')")
            page.wait_for_selector(f"section.pending li[data-host='{host}']", state="detached")
        c.call(c.cluster.wait_online, ["web-1", "web-2"])
        online = ".vtable .badge.s-online"
        for _ in range(40):  # a host just enrolled may reconnect once with its new credential
            page.click("button:has-text('Refresh')")
            page.wait_for_timeout(250)
            if page.locator(online).count() == 2:
                break
        assert page.locator(online).count() == 2
        web1 = page.inner_text(ROW.format("web-1"))
        assert "online" in web1 and "role=web" in web1 and "dc=fra1" in web1
        assert agent_version in web1 and "now" in web1
        assert "rejected" in page.inner_text(ROW.format("db-1"))
        assert "3 hosts (2 online)" in page.inner_text(".filters .summary")
        c.shot("hosts", full_page=False)
        page.fill("input[name=label]", "role=web")
        c.wait_rows(2)
        page.fill("input[name=label]", "role=web dc=ams")
        c.wait_rows(1)
        assert c.body_rows() == 1 and page.locator(ROW.format("web-2")).count() == 1
        page.fill("input[name=label]", "")
        page.select_option("select[name=status]", "offline")
        page.wait_for_selector(ROW.format("db-1"))
        c.wait_rows(1)
        page.select_option("select[name=status]", "")
        page.fill("input[name=q]", "web-")
        c.wait_rows(2)

        # a viewer sees what its role allows, and why the rest is closed
        page.click("#who button:has-text('Sign out')")
        c.sign_in(viewer["token"], route="/tasks/new")
        assert page.inner_text("#who .role") == "viewer"
        create = page.locator("button:has-text('Create and start')")
        assert create.is_disabled()
        assert "Needs an operator token" in create.get_attribute("title")
        assert "Needs an operator token" in page.inner_text("form.new-task .message.info")

    await in_browser(cluster, tmp_path, scenario)


async def test_a_task_from_the_form_runs_live_to_the_end(cluster: Cluster, tmp_path: Path) -> None:
    await cluster.start_daemon()
    await start_agents(cluster, {"web-1": ["role=web"], "web-2": ["role=web"], "db-1": ["role=db"]})

    def scenario(c: Console) -> str:
        page = c.page
        c.sign_in(route="/tasks/new")
        page.fill("[data-field=name]", "rolling restart")
        page.fill("[data-field='commands.0.script']",
                  'for i in 1 2 3 4 5; do echo "step $i of $1"; sleep 0.7; done')  # fmt: skip
        page.fill("[data-field='commands.0.args']", "web")
        page.click("button:has-text('Add a command')")
        page.fill("[data-field='commands.1.script']", "echo done")
        page.fill("[data-field='commands.1.timeout_s']", "30")
        page.locator(".label-row input").nth(0).fill("role")
        page.locator(".label-row input").nth(1).fill("web")
        page.wait_for_selector(".target-count[data-count='2']")
        page.fill("input[aria-label='Find hosts']", "db-")
        page.check("ul.picker li[data-host='db-1'] input")
        page.wait_for_selector(".target-count[data-count='3']")
        assert "3 hosts matched: 1 picked, 2 by labels" in page.inner_text(".target-count")
        c.shot("new-task")
        c.mark_no_reload()
        page.click("button:has-text('Create and start')")
        page.wait_for_selector(".task-name:has-text('rolling restart')")
        task_id = page.evaluate("location.hash").split("/")[2]

        # live: the rows move, and a running host's output arrives while it runs
        page.wait_for_selector(ROW.format("web-1") + "[data-status='running']", timeout=30_000)
        page.locator(ROW.format("web-1") + " button[data-open]").first.click()
        c.wait_text("pre.out.stdout", "step 1 of web")
        early = page.inner_text("pre.out.stdout")
        assert "step 5" not in early, early  # seen before the command finished
        assert page.locator(".stream-state[data-state='live']").count() == 1
        c.shot("task-detail-live")
        page.wait_for_selector(".bar[aria-valuenow='100']", timeout=60_000)
        page.wait_for_selector(".task-state .badge.s-completed")
        c.assert_no_reload()
        assert page.inner_text(".progress-text") == "6 of 6 executions finished (100%)"
        assert page.inner_text(".counts [data-status='succeeded'] strong") == "6"
        c.wait_text("pre.out.stdout", "step 5 of web")
        stdout = page.inner_text("pre.out.stdout")
        assert [f"step {i} of web" for i in range(1, 6)] == stdout.split("\n")[:5]
        rows = page.locator(".vtable tbody tr[data-host]")
        assert rows.count() == 6
        assert page.locator(".vtable tbody tr[data-status='succeeded']").count() == 6
        page.click("button[role=tab]:has-text('Hosts')")  # already there: a no-op
        page.locator(".output").scroll_into_view_if_needed()
        c.shot("task-detail")

        page.click("button[role=tab]:has-text('Groups')")
        page.wait_for_selector("li.group")
        groups = page.locator("li.group")
        assert groups.count() == 2
        texts = sorted(groups.nth(i).inner_text() for i in range(2))
        assert all(text.startswith("3 hosts") for text in texts), texts
        assert any("step 1 of web" in text for text in texts)
        c.shot("groups")
        # a host of a group opens its output
        groups.first.locator("button.chip").first.click()
        page.wait_for_selector(".output:not([hidden]) pre.out.stdout")
        return task_id

    task_id = await in_browser(cluster, tmp_path, scenario)
    task = await cluster.get(f"/api/v1/tasks/{task_id}")
    assert task["status"] == "completed" and task["targets"]["resolved"] == 3


FAIL_ON_MARK = (
    'host=$(tr "\\0" "\\n" </proc/$PPID/cmdline | grep -A1 -x -e --host-id | tail -n 1); '
    'if [ -e "$1/$host" ]; then echo "no space left on $host" >&2; exit 3; fi; echo "ok on $host"'
)


async def test_cancel_a_long_task_then_retry_only_the_failed_hosts(
    cluster: Cluster, tmp_path: Path
) -> None:
    await cluster.start_daemon()
    await start_agents(cluster, {"a-1": ["role=app"], "a-2": ["role=app"], "a-3": ["role=app"]})
    marks = tmp_path / "marks"
    marks.mkdir()
    (marks / "a-3").touch()
    long_id = await cluster.run_task(["a-1", "a-2"], "sleep 60", name="long sleep")
    failing = await cluster.post("/api/v1/tasks", {
        "name": "check disks", "commands": [{"script": FAIL_ON_MARK, "args": [str(marks)]}],
        "targets": {"labels": {"role": "app"}}, "start": True,
    })  # fmt: skip
    await cluster.wait_task(failing["id"])

    def scenario(c: Console) -> str:
        page = c.page
        c.sign_in(route=f"/tasks/{long_id}")
        page.wait_for_selector(ROW.format("a-2") + "[data-status='running']", timeout=30_000)
        page.click(".actions button:has-text('Cancel')")
        page.click(".actions button:has-text('Really cancel?')")
        page.wait_for_selector(".task-state .badge.s-cancelled", timeout=30_000)
        page.wait_for_selector(ROW.format("a-1") + "[data-status='cancelled']")
        page.wait_for_selector(ROW.format("a-2") + "[data-status='cancelled']")
        assert "user_cancel" in page.inner_text(ROW.format("a-1"))
        assert page.locator(".actions button:has-text('Cancel')").count() == 0

        c.go(f"/tasks/{failing['id']}")
        page.wait_for_selector(".task-state .badge.s-failed")
        page.wait_for_selector(ROW.format("a-3") + "[data-status='failed']")
        assert "exit_nonzero" in page.inner_text(ROW.format("a-3"))
        page.select_option("select[name=status]", "!succeeded")
        c.wait_rows(1)
        page.click(ROW.format("a-3") + " button[data-open]")
        c.wait_text("pre.out.stderr", "no space left on a-3")
        exit_shown = page.evaluate(
            "[...document.querySelectorAll('.output dl.meta div')]"
            ".find(d => d.firstChild.textContent === 'Exit').lastChild.textContent"
        )
        assert exit_shown == "3"
        (marks / "a-3").unlink()  # the disk is fixed: the retry succeeds
        page.click(".actions button:has-text('Retry the 1 host that did not succeed')")
        page.wait_for_function(
            "old => !location.hash.startsWith(old)", arg=f"#/tasks/{failing['id']}"
        )
        page.wait_for_selector(".task-state .badge.s-completed", timeout=30_000)
        assert page.locator(".vtable tbody tr[data-host]").count() == 1
        assert page.locator(ROW.format("a-3") + "[data-status='succeeded']").count() == 1
        assert f"task {failing['id']}" in page.inner_text("dl.meta")  # "Retry of"
        retry_id = page.evaluate("location.hash").split("/")[2]
        c.go("/tasks")
        c.wait_rows(3, "table.tasks tbody tr[data-task]")
        c.shot("tasks", full_page=False)
        return retry_id

    retry_id = await in_browser(cluster, tmp_path, scenario)
    retry = await cluster.get(f"/api/v1/tasks/{retry_id}")
    assert retry["retry_of"] == failing["id"] and retry["targets"]["hosts"] == ["a-3"]
    assert (await cluster.get(f"/api/v1/tasks/{long_id}"))["status"] == "cancelled"


HOSTILE_NAME = '<img src=x onerror="window.__pwned=1">\x1b[31mred-name\x1b[0m \u202eevil'
HOSTILE_OUTPUT = (
    "printf '<script>window.__pwned=2</script>\\n\\033[2J\\033]0;pwned-title\\007"
    "\\033[1;31mred\\033[0m <b>bold</b> <img src=x onerror=window.__pwned=3>\\n\\001bell\\n'"
)


async def test_hostile_names_and_output_are_shown_as_text(cluster: Cluster, tmp_path: Path) -> None:
    await cluster.start_daemon("--max-output-bytes", "4096")  # keeps 2 KiB head + 2 KiB tail
    await start_agents(cluster, {"h-1": []})
    task_id = await cluster.run_task(["h-1"], HOSTILE_OUTPUT, name=HOSTILE_NAME)
    await cluster.wait_task(task_id)
    big_id = await cluster.run_task(["h-1"], "seq 1 5000", name="big output")  # 23,893 bytes
    await cluster.wait_task(big_id)

    def scenario(c: Console) -> None:
        page = c.page
        c.sign_in(route=f"/tasks/{task_id}")
        page.wait_for_selector(".task-state .badge.s-completed")
        title = page.inner_text(".task-name")
        assert '<img src=x onerror="window.__pwned=1">' in title and "red-name" in title
        assert "\x1b" not in title and "[31m" not in title and "\u202e" not in title
        page.click(ROW.format("h-1") + " button[data-open]")
        c.wait_text("pre.out.stdout", "bell")
        out = page.inner_text("pre.out.stdout")
        assert "<script>window.__pwned=2</script>" in out and "<b>bold</b>" in out
        assert "red" in out and "\u2401bell" in out  # \x01 shown as ␁
        assert "\x1b" not in out and "pwned-title" not in out and "[1;31m" not in out
        c.go("/tasks")
        page.wait_for_selector(f"tr[data-task='{task_id}']")
        assert "<img src=x" in page.inner_text(f"tr[data-task='{task_id}'] .c-name")
        c.go(f"/tasks/{task_id}?view=groups")
        page.wait_for_selector("li.group pre")
        assert "<script>window.__pwned=2</script>" in page.inner_text("li.group pre")
        # nothing of it became markup, nothing ran
        assert page.locator("main img, main script, main b, pre.out *:not(.omitted)").count() == 0
        assert page.evaluate("() => window.__pwned") is None

        # a capped output says so, and marks where the middle was dropped
        c.go(f"/tasks/{big_id}")
        page.click(ROW.format("h-1") + " button[data-open]")
        c.wait_text("pre.out.stdout", "5000")
        assert "19,797 bytes not kept" in page.inner_text("pre.out.stdout .omitted")
        banner = page.inner_text(".output .truncated")
        assert "Output was capped" in banner and "19 KiB of stdout" in banner
        assert "✂" in page.inner_text(ROW.format("h-1") + " .cut")
        text = page.inner_text("pre.out.stdout")
        assert text.startswith("1\n2\n3\n") and text.rstrip().endswith("4999\n5000")

    await in_browser(cluster, tmp_path, scenario)


async def test_task_history_filters_and_pages(cluster: Cluster, tmp_path: Path) -> None:
    await cluster.start_daemon()
    await start_agents(cluster, {"w-1": [], "w-2": []})
    for n in range(2):
        await cluster.wait_task(await cluster.run_task(["w-2"], "true", name=f"on w-2 #{n}"))
    for n in range(26):
        body = {"name": f"queued #{n}", "commands": [{"script": "true"}],
                "targets": {"hosts": ["w-1"]}}  # fmt: skip
        await cluster.post("/api/v1/tasks", body)
    newest = (await cluster.get("/api/v1/tasks?limit=1"))["items"][0]["id"]

    def scenario(c: Console) -> None:
        page = c.page
        rows = "table.tasks tbody tr[data-task]"
        c.sign_in(route="/tasks")
        page.wait_for_selector(rows)
        assert page.locator(rows).count() == 28
        assert page.locator(rows).first.get_attribute("data-task") == newest  # newest first
        page.select_option("select[name=limit]", "25")
        c.wait_rows(25, rows)
        page.click("button:has-text('Older →')")
        c.wait_rows(3, rows)
        oldest = page.locator(f"{rows} .c-name").all_inner_texts()
        assert oldest == ["queued #0", "on w-2 #1", "on w-2 #0"]
        assert page.locator("button:has-text('Older →')").is_disabled()
        page.click("button:has-text('← Newer')")
        c.wait_rows(25, rows)
        page.select_option("select[name=status]", "completed")
        c.wait_rows(2, rows)
        page.select_option("select[name=status]", "")
        c.wait_rows(25, rows)
        page.fill("input[name=host]", "w-2")
        c.wait_rows(2, rows)
        assert all("on w-2" in t for t in page.locator(f"{rows} .c-name").all_inner_texts())
        page.fill("input[name=host]", "")
        page.fill("input[name=since]", "2999-01-01T00:00")
        page.dispatch_event("input[name=since]", "change")
        page.wait_for_selector("table.tasks td.empty:has-text('No tasks match')")
        page.click("button:has-text('24 h')")
        c.wait_rows(25, rows)

    await in_browser(cluster, tmp_path, scenario)


async def test_errors_from_the_api_are_shown_in_words(cluster: Cluster, tmp_path: Path) -> None:
    await cluster.start_daemon()
    await start_agents(cluster, {"e-1": []})
    viewer = await make_token(cluster, "viewer-1", "viewer")

    def scenario(c: Console) -> None:
        page = c.page
        c.allow(r"status of 400|ERR_CONNECTION_(REFUSED|RESET)")  # what this test provokes
        c.sign_in()
        c.go("/tasks/987654")
        page.wait_for_selector("main .message.error")
        assert page.inner_text("main .message.error") == "Not found: there is no task 987654."
        c.go("/tasks/new?hosts=ghost-1")
        page.wait_for_selector(".picked .chip[data-host='ghost-1']")
        page.fill("[data-field=name]", "to nowhere")
        page.fill("[data-field='commands.0.script']", "true")
        page.click("button:has-text('Create and start')")
        page.wait_for_selector("form.new-task .message.error:not([hidden])")
        said = page.inner_text("form.new-task .message.error")
        assert "ghost-1" in said and "{" not in said and "error" not in said.lower(), said

        page.click("#who button:has-text('Sign out')")
        c.sign_in(viewer["token"])
        said = page.evaluate("""async () => {
            const { post } = await import('/static/api.js');
            try { await post('/api/v1/tasks/1/cancel'); return 'allowed'; }
            catch (error) { return error.message; }
        }""")
        assert said == (
            "Your token's role does not allow this: "
            "this needs the operator role; token:viewer-1 has viewer."
        )
        # the token is revoked while the page is open: the next call says so and asks again
        c.api("DELETE", f"/api/v1/tokens/{viewer['id']}")
        c.go("/hosts")
        page.wait_for_selector("form.signin")
        assert "Your token was not accepted" in page.inner_text("#notices")
        # the daemon is gone: said in words, not a blank page
        c.sign_in(route="/tasks")
        c.call(c.cluster.daemon.kill, signal.SIGKILL)
        c.go("/hosts")
        page.wait_for_selector("main .message.error:not([hidden])")
        assert "Cannot reach dispatchd" in page.inner_text("main .message.error:not([hidden])")

    await in_browser(cluster, tmp_path, scenario)


async def test_the_live_stream_resumes_after_a_daemon_restart(
    cluster: Cluster, tmp_path: Path
) -> None:
    await cluster.start_daemon()
    await start_agents(cluster, {"r-1": [], "r-2": []})
    task_id = await cluster.run_task(
        ["r-1", "r-2"], "for i in 1 2 3 4 5 6 7 8; do echo tick $i; sleep 0.6; done", name="ticks"
    )

    def scenario(c: Console) -> None:
        page = c.page
        c.allow(r"ERR_CONNECTION_(REFUSED|RESET)|ERR_INCOMPLETE_CHUNKED|ERR_EMPTY_RESPONSE")
        resumed_from: list[str] = []
        page.on("request", lambda r: resumed_from.append(r.headers.get("last-event-id", ""))
                if "/events" in r.url else None)  # fmt: skip
        c.sign_in(route=f"/tasks/{task_id}")
        page.wait_for_selector(".stream-state[data-state='live']")
        page.wait_for_selector(ROW.format("r-1") + "[data-status='running']")
        c.mark_no_reload()
        c.call(c.cluster.daemon.kill, signal.SIGTERM)
        page.wait_for_selector(".stream-state[data-state='reconnecting']")
        c.call(c.cluster.start_daemon)
        page.wait_for_selector(".task-state .badge.s-completed", timeout=60_000)
        c.assert_no_reload()
        assert page.inner_text(".progress-text") == "2 of 2 executions finished (100%)"
        assert page.locator(".vtable tbody tr[data-status='succeeded']").count() == 2
        assert any(resumed_from[1:]), resumed_from  # reconnected with Last-Event-ID

    await in_browser(cluster, tmp_path, scenario)
