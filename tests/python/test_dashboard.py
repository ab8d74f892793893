"""The dashboard in a real browser: Debian's headless Chromium driven by selenium through the
system chromedriver (nothing downloaded). The page signs in with the token, lists the services
healthy, shows a task submitted from Python turn COMPLETED without a reload, and cancels one."""

from __future__ import annotations

import asyncio
import os
import shutil
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from selenium import webdriver
from selenium.common.exceptions import WebDriverException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By

from dspy_agent_infra import AgentInfra, Task
from helpers import http_service

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
        # An action needs the page's own header too, even with the token.
        bearer = {"Authorization": f"Bearer {infra.token}"}
        assert status(f"{base}/api/services/web/restart", bearer, b"") == 403

        def page_text() -> str:
            return str(browser.find_element(By.TAG_NAME, "body").text)

        def sign_in(token: str) -> None:
            browser.find_element(By.ID, "token").send_keys(token)
            browser.find_element(By.CSS_SELECTOR, "#login button").click()

        await asyncio.to_thread(browser.get, f"{base}/")
        await until(lambda: browser.find_elements(By.ID, "token"), "the sign-in form")
        assert "web" not in page_text()
        await asyncio.to_thread(sign_in, "not-the-token-0123456789")
        await until(
            lambda: "not this stack's" in browser.find_element(By.ID, "login-error").text,
            "a wrong token refused",
        )
        await asyncio.to_thread(sign_in, infra.token)

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

        # Signed out, the page asks for the token again.
        await asyncio.to_thread(
            lambda: browser.find_element(By.CSS_SELECTOR, "header form button").click()
        )
        await until(lambda: browser.find_elements(By.ID, "token"), "the sign-in form again")
