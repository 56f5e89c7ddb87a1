"""End to end: the self-service portal in a real headless Chromium, against the real daemon
on 127.0.0.1, with radclient as the NAS and the fake Twilio API on a real port for texts.

The fake Twilio runs on this process's reactor, so every browser step runs on a thread
(`deferToThread`) while the test awaits it. Each screen is saved at 360 x 640 under
test-artifacts/screenshots/ (tests/browser.py).
"""

from __future__ import annotations

import base64
import re
import time
import urllib.error
import urllib.request
from urllib.parse import urlencode

import pytest
import pytest_twisted
from twisted.internet.threads import deferToThread

import browser
import fake_twilio
from ldap_server import free_tcp_port
from mfaserver.factors import oath

from .conftest import start_daemon, stop_daemon
from .test_sms_e2e import fake  # noqa: F401  (the fake Twilio on a port, a fixture)

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not browser.available(), reason="chromium and chromium-driver needed"),
]

PASSWORD = "pw-alice"
PHONE = "+16502530000"
NEW_PHONE = "+16502530099"
SEED = bytes(range(20))
SEED_B32 = base64.b32encode(SEED).decode("ascii")
COOKIE = "__Host-mfaportal"


def portal_config(web_port: int, api_base: str | None = None) -> str:
    text = f"""lockout_threshold = 3

[web]
listen = "127.0.0.1"
port = {web_port}
public_url = "http://127.0.0.1:{web_port}"

[portal]
invite_hours = 2
"""
    if api_base is not None:
        text += '\n[sms]\ngateway = "twilio"\n' + fake_twilio.gateway_config(api_base)
    return text


def code_at(seed: bytes, steps: int = 0) -> str:
    return oath.hotp(seed, oath.totp_step(time.time()) + steps)


class Portal:
    """A headless Chromium at the portal of ``base``: blocking calls, run on a thread."""

    def __init__(self, driver, base: str):
        self.driver = driver
        self.base = base

    def open(self, path: str) -> None:
        self.driver.get(path if path.startswith("http") else self.base + path)

    def title(self) -> str:
        return self.driver.title

    def text(self) -> str:
        from selenium.webdriver.common.by import By
        return self.driver.find_element(By.TAG_NAME, "main").text

    def fill(self, **fields: str) -> None:
        from selenium.webdriver.common.by import By
        for name, value in fields.items():
            element = self.driver.find_element(By.ID, name)
            element.clear()
            element.send_keys(value)

    def press(self, text: str, *, until: str | None = None) -> None:
        """Click the (first) button saying ``text``; wait for the page titled ``until``."""
        from selenium.webdriver.common.by import By
        from selenium.webdriver.support.ui import WebDriverWait
        from selenium.common.exceptions import WebDriverException
        # A mark on the old page's window: gone once the next page has loaded.
        # (Waiting for the old <html> to go stale races with Chromium, which
        # may report a half-replaced node as an "inspector error".)
        self.driver.execute_script("window.__beforePress = true")
        self.driver.find_element(By.XPATH, f'//button[normalize-space()="{text}"]').click()
        wait = WebDriverWait(self.driver, 30, poll_frequency=0.05,
                             ignored_exceptions=(WebDriverException,))
        wait.until(lambda d: d.execute_script(
            "return window.__beforePress === undefined"
            " && document.readyState === 'complete'"))
        if until is not None:
            wait.until(lambda d: d.title == until,
                       message=f"expected the page {until!r}, not {self.driver.title!r}")

    def shot(self, name: str) -> None:
        browser.screenshot(self.driver, name)

    def sign_in(self, user: str, password: str, *, code: str = "",
                button: str = "Sign in", until: str = "Your sign-in methods") -> None:
        self.open("/portal/signin")
        self.fill(username=user, password=password, code=code)
        self.press(button, until=until)

    def csrf(self) -> str:
        from selenium.webdriver.common.by import By
        return self.driver.find_element(By.NAME, "csrf").get_attribute("value")

    def cookie(self) -> dict:
        [cookie] = [c for c in self.driver.get_cookies() if c["name"] == COOKIE]
        return cookie


def post_form(url: str, fields: dict, cookie: str | None) -> tuple[int, str]:
    """POST a form outside the browser, with the browser's cookie: status and page."""
    request = urllib.request.Request(url, data=urlencode(fields).encode(), method="POST")
    request.add_header("Content-Type", "application/x-www-form-urlencoded")
    if cookie is not None:
        request.add_header("Cookie", f"{COOKIE}={cookie}")
    try:
        with urllib.request.urlopen(request, timeout=10) as answer:
            return answer.status, answer.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


@pytest.fixture
def web_port():
    return free_tcp_port()


@pytest.fixture
def chromium(tmp_path):
    driver = browser.start_browser(tmp_path / "profile")
    yield driver
    driver.quit()


@pytest.fixture
def daemon(tmp_path, web_port):
    d = start_daemon(tmp_path, portal_config(web_port))
    d.cli("user", "add", "alice", "--password-stdin", input=f"{PASSWORD}\n")
    yield d
    stop_daemon(d)


@pytest.fixture
def portal(chromium, web_port):
    return Portal(chromium, f"http://127.0.0.1:{web_port}")


def add_token(daemon) -> None:
    daemon.cli("token", "add", "alice", "--type", "totp", "--secret", "-", "--no-qr",
               input=SEED_B32 + "\n")


def test_invite_then_an_authenticator_app_then_a_radius_login_with_it(daemon, portal):
    url = daemon.cli("user", "invite", "alice", "--no-qr").stdout.splitlines()[0]
    assert "/portal/invite/" in url
    portal.open(url)
    assert portal.title() == "Set up your sign-in"
    portal.shot("portal-invite")
    portal.fill(password="wrong")
    portal.press("Continue", until="Set up your sign-in")
    assert "Authentication failed." in portal.text()
    portal.fill(password=PASSWORD)
    portal.press("Continue", until="Your sign-in methods")
    assert "no second factor yet" in portal.text()
    portal.shot("portal-account-first")
    portal.press("Add an authenticator app", until="Add an authenticator app")
    portal.shot("portal-totp")
    from selenium.webdriver.common.by import By
    secret = oath.parse_base32_secret(portal.driver.find_element(By.ID, "secret").text)
    assert portal.driver.find_element(By.CSS_SELECTOR, "img.qr").get_attribute(
        "naturalWidth") not in ("0", None)          # the data: SVG passed the CSP
    portal.fill(code="000000")
    portal.press("Confirm", until="Add an authenticator app")
    assert "That code is not right." in portal.text()
    portal.shot("portal-totp-wrong-code")
    portal.fill(code=code_at(secret))
    portal.press("Confirm", until="Your sign-in methods")
    assert "Your authenticator app is set up." in portal.text()
    portal.shot("portal-account")
    portal.driver.execute_script("window.scrollTo(0, document.body.scrollHeight)")
    portal.shot("portal-account-end")
    # The invite is used up.
    portal.open(url)
    assert "expired or was used already" in portal.text()
    # The NAS: the app's next code signs in over RADIUS.
    reply = daemon.login("alice", f"{PASSWORD},{code_at(secret, 1)}")
    assert reply.code == "Access-Accept", reply.output


def texted_code(fake, to: str) -> str:
    [message] = [m for m in fake.messages if m["to"] == to][-1:]
    return re.search(r"code is (\d+)", message["body"]).group(1)


@pytest_twisted.ensureDeferred
async def test_sign_in_by_text_then_a_new_phone_number_checked_by_a_texted_code(
        tmp_path, web_port, fake, chromium):
    d = start_daemon(tmp_path, portal_config(web_port, fake.api_base))
    try:
        d.cli("user", "add", "alice", "--password-stdin", "--phone", PHONE,
              input=f"{PASSWORD}\n")
        portal = Portal(chromium, f"http://127.0.0.1:{web_port}")

        def ask_for_a_text():
            portal.open("/portal/signin")
            portal.shot("portal-signin")
            portal.fill(username="alice", password=PASSWORD)
            portal.press("Text me a code", until="Sign in")
            portal.shot("portal-challenge")
            return portal.text()
        assert "Enter the code sent to +*******0000." in await deferToThread(ask_for_a_text)

        def answer_and_change_the_phone(code):
            portal.fill(answer=code)
            portal.press("Continue", until="Your sign-in methods")
            portal.open("/portal/phone")
            portal.shot("portal-phone")
            portal.fill(phone="+1 650 253 0099")
            portal.press("Send a code", until="Your phone number")
            portal.shot("portal-phone-code")
            return portal.text()
        page = await deferToThread(answer_and_change_the_phone, texted_code(fake, PHONE))
        assert f"Code we texted to {NEW_PHONE}" in page

        def confirm(code):
            portal.fill(code=code)
            portal.press("Confirm", until="Your sign-in methods")
            return portal.text()
        page = await deferToThread(confirm, texted_code(fake, NEW_PHONE))
        assert f"Your phone number is now {NEW_PHONE}." in page
        shown = await deferToThread(d.cli, "user", "show", "alice")
        assert NEW_PHONE in shown.stdout
    finally:
        stop_daemon(d)


def test_this_wasnt_me_on_a_past_sign_in_blocks_the_user(daemon, portal):
    add_token(daemon)
    reply = daemon.login("alice", f"{PASSWORD},{code_at(SEED)}", 'Calling-Station-Id = "203.0.113.50"')
    assert reply.code == "Access-Accept", reply.output
    portal.sign_in("alice", PASSWORD, code=code_at(SEED, 1))
    portal.open("/portal/history")
    assert "203.0.113.50" in portal.text()
    portal.shot("portal-history")
    from selenium.webdriver.common.by import By
    rows = portal.driver.find_elements(By.CSS_SELECTOR, "ol.history li")
    [nas_row] = [row for row in rows if "203.0.113.50" in row.text]
    nas_row.find_element(By.TAG_NAME, "button").click()
    from selenium.webdriver.support.ui import WebDriverWait
    WebDriverWait(portal.driver, 20).until(lambda d: d.title == "Report a sign-in")
    portal.shot("portal-fraud-confirm")
    portal.press("Yes, report it and block my account",
                 until="Reported: your account is now blocked")
    portal.shot("portal-blocked")
    assert "blocked" in daemon.cli("user", "show", "alice").stdout
    reply = daemon.login("alice", f"{PASSWORD},{code_at(SEED, 2)}")
    assert reply.code == "Access-Reject"
    assert "Your account is blocked" in reply.get("Reply-Message")
    # The session ended with the report.
    portal.open("/portal/")
    assert portal.title() == "Sign in"


def test_cookie_flags_and_csrf_as_the_browser_sees_them(daemon, portal):
    add_token(daemon)
    portal.sign_in("alice", PASSWORD, code=code_at(SEED))
    cookie = portal.cookie()
    assert (cookie["httpOnly"], cookie["secure"], cookie["sameSite"], cookie["path"]) == \
        (True, True, "Strict", "/")
    assert cookie["domain"] == "127.0.0.1" and "expiry" not in cookie      # a session cookie
    portal.open("/portal/pin")
    portal.shot("portal-pin")
    csrf = portal.csrf()
    url = portal.base + "/portal/pin"
    for fields in ({"pin": "1234", "pin2": "1234"},
                   {"pin": "1234", "pin2": "1234", "csrf": "forged"},
                   {"pin": "1234", "pin2": "1234", "csrf": csrf[:-2]}):
        status, page = post_form(url, fields, cookie["value"])
        assert status == 403 and "Nothing was changed." in page
    # The right token but no cookie (another site's form cannot send it: SameSite=Strict).
    status, _ = post_form(url, {"pin": "1234", "pin2": "1234", "csrf": csrf}, None)
    assert status == 403
    assert "voice PIN:    -" in daemon.cli("user", "show", "alice").stdout
    # The browser's own form works.
    portal.fill(pin="2468", pin2="2468")
    portal.press("Save the PIN", until="Your sign-in methods")
    assert "Your PIN is set." in portal.text()
    assert "voice PIN:    set" in daemon.cli("user", "show", "alice").stdout
    # A forged token from the browser: the refusal page.
    portal.open("/portal/pin")
    portal.driver.execute_script(
        "document.querySelectorAll('input[name=csrf]').forEach(e => { e.value = 'forged'; })")
    portal.fill(pin="1357", pin2="1357")
    portal.press("Save the PIN", until="This form has expired")
    portal.shot("portal-csrf-refused")
    portal.open("/portal/confirm")
    portal.shot("portal-confirm")
    portal.open("/portal/")
    portal.press("Sign out", until="You are signed out")
    portal.shot("portal-signed-out")
    portal.open("/portal/")
    assert portal.title() == "Sign in"


def test_wrong_codes_in_the_portal_lock_the_user_as_at_a_nas(daemon, portal):
    add_token(daemon)
    for _ in range(2):
        portal.sign_in("alice", PASSWORD, code="000000", until="Sign in")
        assert "Wrong or already used code." in portal.text()
    portal.sign_in("alice", PASSWORD, code="000000", until="Sign in")
    assert "Too many wrong codes." in portal.text()
    portal.shot("portal-locked")
    assert "locked until" in daemon.cli("user", "show", "alice").stdout
    reply = daemon.login("alice", f"{PASSWORD},{code_at(SEED)}")
    assert reply.code == "Access-Reject"
    log = daemon.cli("log", "--user", "alice").stdout
    assert log.count(" portal ") >= 3
