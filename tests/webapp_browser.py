"""Driving the web authenticator in headless Chromium: what the browser end-to-end tests
(tests/integration/test_webapp_e2e.py) do on the page, as a person would.

`AppPage` wraps a Selenium driver (from `browser.start_browser`): enroll from a
link, wait for a sign-in, press its buttons by their accessible names, read
what the page says. `run_js` runs an ``async`` function body in the page, where
the app's own modules can be imported (``await import('/app/protocol.js')``).
"""

from __future__ import annotations

import re
import time

from selenium.common.exceptions import StaleElementReferenceException, WebDriverException
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

import browser

WAIT = 20


def enrollment_url(daemon, user: str) -> str:
    """The link `mfaserver device enroll USER` prints."""
    out = daemon.cli("device", "enroll", user, "--no-qr").stdout
    return re.search(r"http://\S+/v1/enroll/\S+", out).group(0)


def run_js(driver, body: str, *args):
    """The value of ``async (...args) => { body }`` run in the page; AssertionError if
    it throws (the error is in the message)."""
    driver.set_script_timeout(60)
    outcome = driver.execute_async_script(
        "const done = arguments[arguments.length - 1];"
        "const args = Array.from(arguments).slice(0, -1);"
        f"(async (...args) => {{ {body} }})(...args).then("
        "  (value) => done({value: value === undefined ? null : value}),"
        "  (error) => done({error: `${error.name}: ${error.message}`}));", *args)
    if "error" in outcome:
        raise AssertionError(outcome["error"])
    return outcome["value"]


# Text smaller than 4.5:1 against what is behind it (WCAG 2 AA), for the visible
# elements with text of their own; disabled controls are exempt.
_CONTRAST = """
const parse = (text) => {
  const parts = text.match(/[\\d.]+/g).map(Number);
  return { rgb: parts.slice(0, 3), alpha: parts.length > 3 ? parts[3] : 1 };
};
const luminance = (rgb) => {
  const [r, g, b] = rgb.map((v) => {
    const c = v / 255;
    return c <= 0.03928 ? c / 12.92 : ((c + 0.055) / 1.055) ** 2.4;
  });
  return 0.2126 * r + 0.7152 * g + 0.0722 * b;
};
const behind = (node) => {
  for (let e = node; e; e = e.parentElement) {
    const colour = parse(getComputedStyle(e).backgroundColor);
    if (colour.alpha > 0) return colour.rgb;
  }
  return [255, 255, 255];
};
const low = [];
for (const node of document.body.querySelectorAll('*')) {
  const own = Array.from(node.childNodes).some((n) => n.nodeType === 3 && n.textContent.trim());
  if (!own || node.closest('.visually-hidden') || node.closest(':disabled')
      || node.getClientRects().length === 0) continue;
  const [a, b] = [luminance(parse(getComputedStyle(node).color).rgb), luminance(behind(node))];
  const ratio = (Math.max(a, b) + 0.05) / (Math.min(a, b) + 0.05);
  const text = node.textContent.trim().slice(0, 40);
  if (ratio < 4.5) low.push(`${node.tagName} "${text}" ${ratio.toFixed(2)}`);
}
return low;
"""


class AppPage:
    """The web authenticator in one browser."""

    def __init__(self, driver):
        self.driver = driver

    def wait(self, condition, seconds: float = WAIT, message: str = ""):
        # Chromium may report an element the page just re-rendered as an
        # "inspector error" rather than as stale: both mean "look again".
        return WebDriverWait(self.driver, seconds, ignored_exceptions=(
            StaleElementReferenceException, WebDriverException)).until(condition, message)

    def text(self, element_id: str) -> str:
        return self.driver.find_element(By.ID, element_id).text

    def shot(self, name: str) -> None:
        browser.screenshot(self.driver, name)

    # --- enrolling ---

    def open_link(self, url: str) -> None:
        self.driver.get(url)

    def start_enrollment(self, url: str, shot: str | None = None) -> str:
        """Open the enrollment link and press "Enroll this phone"; what the page says
        once it is enrolled (it opens the app a few seconds later)."""
        self.open_link(url)
        button = self.driver.find_element(By.ID, "enroll")
        self.wait(lambda d: button.is_enabled(), message="the Enroll button stays disabled")
        if shot:
            self.shot(shot)
        button.click()
        self.wait(lambda d: "enrolled for" in self.text("progress")
                  or "error" in d.find_element(By.ID, "progress").get_attribute("class"))
        said = self.text("progress")
        assert "enrolled for" in said, said
        return said

    def enroll(self, url: str, shots: tuple[str, str] | None = None) -> str:
        """Enroll from the link (`start_enrollment`) and wait for the app."""
        said = self.start_enrollment(url, shots and shots[0])
        if shots:
            self.shot(shots[1])
        self.wait(lambda d: d.current_url.endswith("/app/"), message="the app did not open")
        self.wait_for_accounts()
        return said

    def wait_for_accounts(self) -> list[str]:
        """The users of the accounts the page lists, once it lists any."""
        self.wait(lambda d: d.find_elements(By.CSS_SELECTOR, "#accounts li"))
        return [e.find_element(By.TAG_NAME, "strong").text
                for e in self.driver.find_elements(By.CSS_SELECTOR, "#accounts li")]

    # --- sign-ins ---

    def signins(self):
        return self.driver.find_elements(By.CSS_SELECTOR, "#signins li.signin")

    def wait_for_signin(self, user: str = "alice", seconds: float = WAIT):
        """The card of the first sign-in of ``user`` the page shows."""
        def found(driver):
            cards = [c for c in self.signins() if c.find_element(By.TAG_NAME, "h3").text
                     .startswith(f"{user} ")]
            return cards[0] if cards else False
        return self.wait(found, seconds, f"no sign-in of {user} appeared")

    def wait_until_no_signins(self, seconds: float = WAIT) -> None:
        self.wait(lambda d: not self.signins(), seconds, "a sign-in stayed on the page")

    @staticmethod
    def button(card, name: str):
        """The button of ``card`` whose accessible name is exactly ``name``."""
        buttons = [b for b in card.find_elements(By.TAG_NAME, "button")
                   if b.is_displayed() and b.accessible_name == name]
        assert len(buttons) == 1, [b.accessible_name for b in card.find_elements(
            By.TAG_NAME, "button")]
        return buttons[0]

    def press(self, card, name: str) -> None:
        self.button(card, name).click()

    def result(self, seconds: float = WAIT) -> str:
        """What the page says about the last answer, once it says something."""
        self.wait(lambda d: self.text("result"), seconds, "no result was shown")
        return self.text("result")

    def wait_for_result(self, words: str, seconds: float = WAIT) -> str:
        self.wait(lambda d: words in self.text("result"), seconds,
                  f"the result never said {words!r}")
        return self.text("result")

    # --- the browser's network, as the tests need it ---

    def block_polls(self) -> None:
        """Keep the page's long polls from reaching the server (answers still do)."""
        self.driver.execute_cdp_cmd("Network.enable", {})
        self.driver.execute_cdp_cmd("Network.setBlockedURLs",
                                    {"urls": ["*/v1/devices/*"]})

    def unblock_polls(self) -> None:
        self.driver.execute_cdp_cmd("Network.setBlockedURLs", {"urls": []})

    def low_contrast(self) -> list[str]:
        return self.driver.execute_script(_CONTRAST)


def wait_until(predicate, seconds: float = WAIT, message: str = "") -> None:
    deadline = time.monotonic() + seconds
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(message or "timed out")
        time.sleep(0.1)
