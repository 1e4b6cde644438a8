"""Debian's headless Chromium through its chromedriver, for the tests of the page and of the docs site."""
from __future__ import annotations

import os
import shutil

import pytest

CI = os.environ.get("CI", "").lower() == "true"


def chrome(window: str = "1280,900", performance_log: bool = False):
    """A headless Chromium (selenium); fails under CI=true when it is missing, skips elsewhere.
    ``performance_log``: also record the network events (which requests the page made)."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not (chromium and driver):
        if CI:
            pytest.fail("CI=true but Debian's chromium/chromium-driver are missing (make browser)")
        pytest.skip("headless Chromium not installed (apt-get install chromium chromium-driver)")
    if CI:
        import selenium  # noqa: F401  (under CI a missing selenium is a failure, not a skip)
    else:
        pytest.importorskip("selenium")
    from selenium import webdriver

    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    for a in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", f"--window-size={window}",
              "--disable-gpu"):
        opts.add_argument(a)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL", **({"performance": "ALL"} if performance_log else {})})
    return webdriver.Chrome(options=opts, service=webdriver.ChromeService(executable_path=driver))
