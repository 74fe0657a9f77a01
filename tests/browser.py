"""Headless Chromium for the report pages (Selenium with Debian's chromium and chromium-driver; no downloads).

``start_chromium()`` raises ``BrowserMissing`` with a one-line reason where there is no browser; tests skip on it,
or fail where ``AMAX_REQUIRE_BROWSER=1`` (``.ci/run`` sets it, and ``scripts/setup.sh`` installs the browser)."""

from __future__ import annotations

import json
import shutil

BROWSERS = ("chromium", "chromium-browser", "google-chrome")
LOCAL_SCHEMES = ("file:", "data:", "about:", "chrome-error:", "devtools:")


class BrowserMissing(RuntimeError):
    """No headless Chromium with its driver on this machine."""


def start_chromium(width: int = 1300, height: int = 1000):
    """A headless Chromium driven by Selenium, its console and network events logged (``page_problems``)."""
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError as exc:
        raise BrowserMissing("selenium is not installed (pip install -e '.[test]')") from exc
    binary = next((path for path in map(shutil.which, BROWSERS) if path), None)
    driver_path = shutil.which("chromedriver")
    if binary is None or driver_path is None:
        raise BrowserMissing("no chromium and chromedriver on PATH (Debian: apt-get install chromium chromium-driver)")
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--hide-scrollbars",
                 f"--window-size={width},{height}", "--disable-background-networking", "--no-first-run"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
    return webdriver.Chrome(service=Service(executable_path=driver_path), options=options)


def page_problems(driver) -> list[str]:
    """Console errors and warnings, and every request for anything but a local file or data: URI, since the
    last call (the logs are drained)."""
    problems = [f"console {entry['level']}: {entry['message']}" for entry in driver.get_log("browser")
                if entry["level"] in ("SEVERE", "WARNING")]
    for entry in driver.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        if message["method"] == "Network.requestWillBeSent":
            url = message["params"]["request"]["url"]
            if not url.startswith(LOCAL_SCHEMES):
                problems.append(f"network request: {url}")
    return problems
