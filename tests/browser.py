"""Headless Chromium for the browser tests: Debian's ``chromium`` and ``chromium-driver``,
driven by Selenium (``scripts/test`` installs all three).

`start_browser` opens a browser with its own profile folder (the same folder
again is the same browser after a restart: its IndexedDB survives) and a
360 x 640 window, the size the pages must work at. `screenshot` writes PNGs
to ``test-artifacts/screenshots`` at the top of the checkout (ignored by
git), for people to look at. Only loopback traffic: Chromium's own
background connections are switched off.
"""

from __future__ import annotations

import shutil
from pathlib import Path

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
SCREENSHOTS = Path(__file__).resolve().parent.parent / "test-artifacts" / "screenshots"
WIDTH, HEIGHT = 360, 640


def available() -> bool:
    return shutil.which(CHROMIUM) is not None and shutil.which(CHROMEDRIVER) is not None


def start_browser(profile: Path, *, width: int = WIDTH, height: int = HEIGHT):
    """A headless Chromium using the profile folder ``profile`` (made if missing)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile.mkdir(parents=True, exist_ok=True)
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in (
            "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic",
            "--no-first-run", "--no-default-browser-check", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--disable-extensions",
            "--disable-dev-shm-usage", "--password-store=basic",
            f"--user-data-dir={profile}", f"--window-size={width},{height}"):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    # The viewport itself is width x height, as on a phone (the window has chrome).
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", {
        "width": width, "height": height, "deviceScaleFactor": 1, "mobile": True})
    return driver


def screenshot(driver, name: str) -> Path:
    """Save what the browser shows as ``<name>.png`` among the test artefacts."""
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    path = SCREENSHOTS / f"{name}.png"
    driver.save_screenshot(str(path))
    return path
