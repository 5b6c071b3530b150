"""Headless Chromium for the playground tests: Debian's chromium and chromium-driver, driven by Selenium.

    from fixtures_browser import browser_fixture, by_id, wait    # the `browser` fixture, one per test module

Without the binaries the tests skip naming the packages (and fail under CI, which installs them).
"""

from __future__ import annotations

import os
import shutil

import pytest


@pytest.fixture(scope="module", name="browser")
def browser_fixture(tmp_path_factory):
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not chromium or not driver:
        why = "needs Debian's chromium and chromium-driver: apt-get install chromium chromium-driver"
        if os.environ.get("CI"):
            pytest.fail(why + " (.ci/run installs them)")
        pytest.skip(why)
    webdriver = pytest.importorskip("selenium.webdriver", reason="pip install selenium (the dev extra)")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1280,960",
                f"--user-data-dir={tmp_path_factory.mktemp('chromium')}"):
        options.add_argument(arg)
    if os.geteuid() == 0:
        options.add_argument("--no-sandbox")  # Chromium refuses to run as root with its sandbox on
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    # the Service path skips Selenium Manager, which would try to download a driver
    chrome = webdriver.Chrome(service=Service(executable_path=driver), options=options)
    chrome.set_page_load_timeout(30)
    yield chrome
    chrome.quit()


def wait(browser, condition, timeout: float = 60):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(browser, timeout, poll_frequency=0.05).until(condition)


def by_id(browser, name: str):
    from selenium.webdriver.common.by import By

    return browser.find_element(By.ID, name)


def result_table(browser) -> tuple[list[str], list[list[str]]]:
    table = by_id(browser, "result")
    header = [th.text for th in table.find_elements("css selector", "thead th")]
    rows = [[td.text for td in tr.find_elements("css selector", "td")]
            for tr in table.find_elements("css selector", "tbody tr")]
    return header, rows


def shown(rows: list[list]) -> list[list[str]]:
    return [["NULL" if v is None else str(v) for v in row] for row in rows]
