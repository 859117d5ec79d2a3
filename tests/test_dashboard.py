"""The live dashboard in a real headless Chromium (Debian's chromium and chromium-driver).

The page is served by this process (store.dashboard.serve), so it shows this
program's task graph too. The test loads it, checks both backends are shown,
makes objects and runs tasks, and waits for the page's numbers to change
without reloading. A screenshot is saved under test-artifacts/ (or
$CLAYPOT_ARTIFACT_DIR). Without Chromium the tests skip, except under CI=true
where .ci/run installs it: there they fail.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
import urllib.request

import pytest

from runtime import task, wait_on
from store import LocalCluster, StorageObject, dashboard
from store.errors import ConfigurationError

pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")


class Shard(StorageObject):
    def __init__(self, n):
        self.data = bytes(n)

    def grow(self, n):
        self.data += bytes(n)
        return len(self.data)


@task(returns=1)
def shard_size(s, pause):
    time.sleep(pause)
    return len(s.data)


@pytest.fixture(scope="module")
def browser():
    if not (CHROMIUM and DRIVER):
        why = "chromium and chromium-driver are not installed (apt-get install chromium chromium-driver)"
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI must run the dashboard test: {why}")
        pytest.skip(why)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="chromium-profile-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--window-size=1280,1000",
        f"--user-data-dir={profile}",
    ):
        options.add_argument(flag)
    # An explicit driver path: Selenium Manager never looks for one on the network.
    driver = webdriver.Chrome(service=Service(executable_path=DRIVER), options=options)
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def wait_for(fn, what: str, timeout: float = 30.0):
    """fn()'s first truthy value, polled; AssertionError naming ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = fn()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


def texts(driver, selector: str) -> list[str]:
    """Text of every element matching ``selector``, read in one step: the page redraws
    its tables every second, so elements found in one call may be gone by the next."""
    return driver.execute_script(
        "return [...document.querySelectorAll(arguments[0])].map(e => e.textContent)", selector
    )


def column(driver, cls: str) -> list[float]:
    """The numbers in one column of the backends table, as the page shows them now."""
    return [float(t or 0) for t in texts(driver, f"#backends tbody td.{cls}")]


def test_page_shows_both_backends_and_updates_live(browser, tmp_path):
    with LocalCluster(backends=2, data_dir=str(tmp_path / "c")) as c:
        server = dashboard.serve(c.client, port=0)
        try:
            browser.get(server.url)
            shown = wait_for(
                lambda: (
                    [
                        x
                        for x in browser.execute_script(
                            "return [...document.querySelectorAll('#backends tbody tr')].map(r => r.dataset.backend)"
                        )
                    ]
                    or None
                ),
                "backend rows",
            )
            assert sorted(shown) == sorted(c.backends)
            assert texts(browser, "#backends td.up") == ["up", "up"]
            objects_before = sum(column(browser, "objects"))
            calls_before = sum(column(browser, "calls"))
            page_id = browser.execute_script("return window.performance.timeOrigin")

            shards = []
            for i, backend in enumerate(c.backends):
                s = Shard(200_000 * (i + 1))
                s.make_persistent(backend=backend)
                s.grow(1000)
                shards.append(s)
            futures = [shard_size(s, 0.05) for s in shards for _ in range(3)]
            assert wait_on(futures) == [201_000] * 3 + [401_000] * 3

            wait_for(lambda: sum(column(browser, "objects")) >= objects_before + 2, "the object count to grow")
            wait_for(lambda: sum(column(browser, "calls")) > calls_before, "the call count to grow")
            wait_for(lambda: sum(column(browser, "tasks-done")) >= 6, "tasks done to show")
            wait_for(
                lambda: texts(browser, "#task-counts")[:1] == ["6/6 finished: 6 done, 0 failed, 0 pending"],
                "6 of 6 tasks finished",
            )
            assert len(texts(browser, "svg rect.task.done")) == 6
            # The largest object of the cluster is the 401 kB shard, on the second backend.
            first_row = wait_for(lambda: texts(browser, "#largest tbody tr")[:1], "the largest objects")[0]
            assert shards[1].getID()[:12] in first_row
            assert c.backends[1][:12] in first_row
            # All of it without a reload.
            assert browser.execute_script("return window.performance.timeOrigin") == page_id

            artifacts = os.environ.get("CLAYPOT_ARTIFACT_DIR", os.path.join(ROOT, "test-artifacts"))
            os.makedirs(artifacts, exist_ok=True)
            path = os.path.join(artifacts, "dashboard.png")
            assert browser.save_screenshot(path)
            assert os.path.getsize(path) > 10_000
        finally:
            server.stop()


def test_state_reports_a_down_backend_and_the_server_refuses_a_network_host(tmp_path):
    with LocalCluster(backends=2, data_dir=str(tmp_path / "c")) as c:
        server = dashboard.serve(c.client, port=0)
        try:
            c.processes[1].kill()
            deadline = time.monotonic() + 30
            while True:
                with urllib.request.urlopen(server.url + "api/state", timeout=10) as r:
                    state = json.loads(r.read())
                ups = {b["backend_id"]: b["up"] for b in state["backends"]}
                if ups.get(c.backends[1]) is False or time.monotonic() > deadline:
                    break
                time.sleep(0.3)
            assert ups == {c.backends[0]: True, c.backends[1]: False}
        finally:
            server.stop()
        with pytest.raises(ConfigurationError, match="no login"):
            dashboard.serve(c.client, host="0.0.0.0", port=0)
