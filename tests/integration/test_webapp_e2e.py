"""End to end: the web authenticator in a real headless Chromium approves real sign-ins.

The daemon, radclient (the NAS) and Chromium are separate processes on
127.0.0.1. The browser enrolls from the link `device enroll` prints, keeps its
key in IndexedDB, long-polls, and answers with the buttons a person presses.
Every screen is saved at 360 x 640 under test-artifacts/screenshots.
"""

from __future__ import annotations

import base64
import importlib.util
import json
import re
import time

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys

import browser
from mfaserver.factors import push_protocol as proto
from webapp_browser import AppPage, enrollment_url, run_js, wait_until

from .conftest import start_daemon, stop_daemon
from .test_push_e2e import PASSWORD, Login, enroll as enroll_reference_phone, push_config

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not browser.available(),
                       reason="chromium and chromium-driver are not installed (scripts/test)"),
]

NAS = ('Calling-Station-Id = "203.0.113.7"', "NAS-IP-Address = 192.0.2.10")


def start(tmp_path, web_port, users=("alice",), **config):
    daemon = start_daemon(tmp_path, push_config(web_port, **config))
    for user in users:
        daemon.cli("user", "add", user, "--password-stdin", input=PASSWORD + "\n")
    return daemon


@pytest.fixture
def web_port():
    from ldap_server import free_tcp_port
    return free_tcp_port()


@pytest.fixture
def daemon(tmp_path, web_port):
    d = start(tmp_path, web_port, users=("alice", "bob"))
    yield d
    stop_daemon(d)


@pytest.fixture
def profile(tmp_path):
    return tmp_path / "chromium-profile"


@pytest.fixture
def page(profile):
    driver = browser.start_browser(profile)
    yield AppPage(driver)
    driver.quit()


def base_url(daemon) -> str:
    return re.search(r'public_url = "([^"]+)"', daemon.config_path.read_text()).group(1)


def test_enroll_from_the_printed_link_and_approve(daemon, page):
    said = page.enroll(enrollment_url(daemon, "alice"), shots=("01-enroll", "02-enrolled"))
    assert "This phone is now enrolled for alice" in said
    assert "Keep the authenticator open to see sign-ins" in said
    listed = daemon.cli("device", "list", "alice").stdout
    assert "ed25519" in listed, listed
    assert page.wait_for_accounts() == ["alice"]
    page.shot("03-waiting")
    assert page.low_contrast() == []

    login = Login(daemon, "alice", PASSWORD, *NAS)
    card = page.wait_for_signin("alice")
    text = card.text
    for shown in ("alice signing in to nas", "203.0.113.7", "nas (192.0.2.10)", "Time left"):
        assert shown in text, text
    left = int(re.search(r"(\d+) s", text).group(1))
    assert 10 <= left <= 20
    assert [b.accessible_name for b in card.find_elements(By.TAG_NAME, "button")
            if b.is_displayed()] == ["Approve", "Deny", "Report fraud"]
    # Counting down.
    wait_until(lambda: int(re.search(r"(\d+) s", card.text).group(1)) < left, 5)
    page.shot("04-sign-in")
    assert page.low_contrast() == []
    page.press(card, "Approve")
    assert login.reply().code == "Access-Accept"
    assert page.result() == "Approved: alice’s sign-in to nas."
    page.wait_until_no_signins()
    page.shot("05-approved")
    assert page.low_contrast() == []

    # The browser can install it: a manifest with icons, a worker for /app/.
    manifest = page.driver.execute_cdp_cmd("Page.getAppManifest", {})
    assert manifest.get("errors") == [], manifest
    errors = page.driver.execute_cdp_cmd("Page.getInstallabilityErrors", {})
    assert errors["installabilityErrors"] == [], errors


def test_deny_rejects_and_report_fraud_blocks_the_user(daemon, page):
    page.enroll(enrollment_url(daemon, "alice"))
    login = Login(daemon, "alice", PASSWORD + ",push", *NAS)
    page.press(page.wait_for_signin(), "Deny")
    assert login.reply().code == "Access-Reject"
    assert page.result() == "Denied: alice’s sign-in to nas is refused."
    page.shot("06-denied")
    page.wait_until_no_signins()

    login = Login(daemon, "alice", PASSWORD, *NAS)
    card = page.wait_for_signin()
    page.press(card, "Report fraud")
    # Asked in the page; nothing is sent yet, and the question has the focus.
    warning = card.find_element(By.CSS_SELECTOR, ".confirm p")
    assert "blocked at once" in warning.text
    assert page.driver.switch_to.active_element == warning
    page.shot("07-fraud-confirm")
    assert page.low_contrast() == []
    page.press(card, "Cancel")
    assert page.driver.switch_to.active_element.accessible_name == "Report fraud"
    assert login.proc.poll() is None
    page.press(card, "Report fraud")
    page.press(card, "Yes, report fraud")
    reply = login.reply()
    assert reply.code == "Access-Reject" and "blocked" in reply.get("Reply-Message")
    assert "Reported as fraud" in page.result()
    page.shot("08-fraud-reported")
    assert "blocked" in daemon.cli("user", "show", "alice").stdout


def test_number_matching_right_and_wrong_and_a_closed_sign_in_in_words(tmp_path, web_port,
                                                                      page):
    daemon = start(tmp_path, web_port, number_matching=True)
    try:
        page.enroll(enrollment_url(daemon, "alice"))
        challenge = daemon.login("alice", PASSWORD, *NAS)
        assert challenge.code == "Access-Challenge"
        card = page.wait_for_signin()
        number = card.find_element(By.CSS_SELECTOR, ".number strong").text
        assert re.fullmatch(r"[1-9][0-9]", number)
        assert "Type this number at the sign-in prompt" in card.text
        page.shot("09-number")
        page.press(card, "Approve")
        assert number in page.wait_for_result("Approved")
        answer = daemon.login("alice", number, f"State = {challenge.get('State')}", *NAS)
        assert answer.code == "Access-Accept"
        page.wait_until_no_signins()

        # A wrong number at the prompt closes the sign-in: the page says so in words
        # when it is answered before the page has heard (its polls held back here).
        challenge = daemon.login("alice", PASSWORD, *NAS)
        card = page.wait_for_signin()
        number = card.find_element(By.CSS_SELECTOR, ".number strong").text
        page.block_polls()
        wrong = "10" if number != "10" else "11"
        answer = daemon.login("alice", wrong, f"State = {challenge.get('State')}", *NAS)
        assert answer.code == "Access-Reject"
        page.press(card, "Approve")
        said = page.wait_for_result("expired or was closed")
        assert said.startswith("Not answered: alice’s sign-in to nas. This sign-in has expired")
        page.shot("10-closed")
        page.unblock_polls()
    finally:
        stop_daemon(daemon)


def test_answered_on_another_device_and_a_wrong_clock_in_words(daemon, page, tmp_path):
    # The same user also has the reference app; a phone whose clock is ten minutes fast.
    page.driver.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument", {"source": (
        "const realNow = Date.now; Date.now = () => realNow() + 600000;")})
    page.enroll(enrollment_url(daemon, "alice"))
    other = enroll_reference_phone(daemon, tmp_path, "alice")

    login = Login(daemon, "alice", PASSWORD, *NAS)
    card = page.wait_for_signin()
    page.block_polls()
    other.run("deny", other.wait_for_transaction()["txid"])
    assert login.reply().code == "Access-Reject"
    page.press(card, "Approve")
    assert "answered already, here or on another device" in page.result()
    page.unblock_polls()

    # Signed at the server's time (the page learns it from the Date header).
    login = Login(daemon, "alice", PASSWORD, *NAS)
    page.press(page.wait_for_signin(), "Approve")
    assert login.reply().code == "Access-Accept"

    words = run_js(page.driver, """
        const { ApiError, describe } = await import('/app/api.js');
        return ['stale_timestamp', 'not_found', 'already_answered', 'expired', 'unauthorized']
          .map((code) => describe(new ApiError(401, code, '')))
          .concat([describe(new ApiError(404, 'not_found', ''), 'link'),
                   describe(new ApiError(410, 'expired', ''), 'link'),
                   describe(new ApiError(503, 'unavailable', ''))]);""")
    assert words == [
        "This phone’s clock is more than a minute off. Set the date and time to automatic,"
        " then try again.",
        "The server does not know this sign-in (any more).",
        "This sign-in was answered already, here or on another device.",
        "This sign-in has expired or was closed (a wrong number, or the service gave up)."
        " If it was yours, sign in again.",
        "The server no longer knows this browser for this account: an administrator may have"
        " removed it.",
        "The server does not know this enrollment link. Check that you have the whole link,"
        " or ask your administrator for a new one.",
        "This enrollment link has expired or was used already. Ask your administrator for a"
        " new one.",
        "The server is busy or has a problem. Try again in a minute.",
    ]


def test_the_key_survives_a_reload_and_a_restart_and_cannot_be_exported(daemon, profile):
    driver = browser.start_browser(profile)
    try:
        page = AppPage(driver)
        page.enroll(enrollment_url(daemon, "alice"))
        stored = run_js(driver, """
            const { listDevices } = await import('/app/store.js');
            const [device] = await listDevices();
            let exported = 'exported';
            try { await crypto.subtle.exportKey('pkcs8', device.privateKey); }
            catch (error) { exported = error.name; }
            return { user: device.user, kind: device.kind,
                     extractable: device.privateKey.extractable, exported };""")
        assert stored == {"user": "alice", "kind": "ed25519", "extractable": False,
                          "exported": "InvalidAccessError"}
        driver.refresh()
        page.wait_for_accounts()
        login = Login(daemon, "alice", PASSWORD, *NAS)
        page.press(page.wait_for_signin(), "Approve")
        assert login.reply().code == "Access-Accept"
    finally:
        driver.quit()

    driver = browser.start_browser(profile)      # the same profile: the browser restarted
    try:
        page = AppPage(driver)
        driver.get(base_url(daemon) + "/")
        assert driver.current_url.endswith("/app/")
        assert page.wait_for_accounts() == ["alice"]
        login = Login(daemon, "alice", PASSWORD, *NAS)
        page.press(page.wait_for_signin(), "Approve")
        assert login.reply().code == "Access-Accept"
        # The service worker has the shell: it opens without the network.
        driver.execute_cdp_cmd("Network.enable", {})
        driver.execute_cdp_cmd("Network.emulateNetworkConditions", {
            "offline": True, "latency": 0, "downloadThroughput": -1, "uploadThroughput": -1})
        driver.refresh()
        assert page.wait_for_accounts() == ["alice"]
        page.wait(lambda d: "cannot be reached" in page.text("accounts"))
        page.shot("11-offline")
    finally:
        driver.quit()


def test_two_users_in_one_browser(daemon, page):
    page.enroll(enrollment_url(daemon, "alice"))
    page.enroll(enrollment_url(daemon, "bob"))
    assert page.wait_for_accounts() == ["alice", "bob"]

    login = Login(daemon, "bob", PASSWORD, *NAS)
    card = page.wait_for_signin("bob")
    assert card.find_element(By.TAG_NAME, "h3").text == "bob signing in to nas"
    # A new sign-in takes the focus; the keyboard reaches Approve next.
    assert page.driver.switch_to.active_element == card.find_element(By.TAG_NAME, "h3")
    page.shot("12-two-accounts")
    page.driver.switch_to.active_element.send_keys(Keys.TAB)
    assert page.driver.switch_to.active_element.accessible_name == "Approve"
    page.driver.switch_to.active_element.send_keys(Keys.ENTER)
    assert login.reply().code == "Access-Accept"
    assert page.result() == "Approved: bob’s sign-in to nas."

    alice = Login(daemon, "alice", PASSWORD, *NAS)
    bob = Login(daemon, "bob", PASSWORD, 'Calling-Station-Id = "198.51.100.4"')
    page.press(page.wait_for_signin("alice"), "Deny")
    page.press(page.wait_for_signin("bob"), "Approve")
    assert alice.reply().code == "Access-Reject"
    assert bob.reply().code == "Access-Accept"


def test_a_used_or_unknown_link_says_so(daemon, page):
    url = enrollment_url(daemon, "alice")
    page.enroll(url)
    page.open_link(url)
    assert page.driver.find_element(By.TAG_NAME, "h1").text == \
        "This enrollment link cannot be used"
    assert "expired or was used already" in page.driver.find_element(By.TAG_NAME, "main").text
    page.shot("13-link-used")
    page.open_link(url[:-4] + "AAAA")
    assert "The server does not know it" in page.driver.find_element(By.TAG_NAME, "main").text
    page.shot("14-link-unknown")

    # Pasting a link: a wrong one is refused in the page, a good one enrolls.
    page.driver.get(base_url(daemon) + "/app/")
    page.wait_for_accounts()
    field = page.driver.find_element(By.ID, "add-link")
    assert not field.is_displayed()       # folded away once there is an account
    page.driver.find_element(By.CSS_SELECTOR, "#add summary").click()
    field.send_keys("https://elsewhere.example/v1/enroll/abc", Keys.ENTER)
    page.wait(lambda d: "not an enrollment link of this server" in page.text("add-status"))
    assert field.get_attribute("aria-invalid") == "true"
    field.clear()
    field.send_keys(enrollment_url(daemon, "bob"), Keys.ENTER)
    page.wait(lambda d: "now enrolled for bob" in page.text("add-status"))
    assert page.wait_for_accounts() == ["alice", "bob"]


def test_a_device_the_administrator_removed_can_be_removed_from_the_browser(daemon, page):
    page.enroll(enrollment_url(daemon, "alice"))
    device_id = daemon.cli("device", "list", "alice").stdout.splitlines()[1].split()[0]
    daemon.cli("device", "delete", "alice", device_id)
    time.sleep(1.2)     # the daemon notices the store changed within a second
    page.driver.refresh()
    page.wait(lambda d: "no longer knows this browser" in page.text("accounts"))
    page.shot("16-device-removed")
    remove = page.driver.find_element(By.CSS_SELECTOR, "#accounts button")
    assert remove.accessible_name == "Remove alice from this browser"
    remove.click()
    page.wait(lambda d: page.driver.find_element(By.ID, "accounts-empty").is_displayed())
    assert page.driver.find_element(By.ID, "add-link").is_displayed()
    assert run_js(page.driver, """
        const { listDevices } = await import('/app/store.js');
        return (await listDevices()).length;""") == 0
    page.shot("00-not-enrolled")
    assert page.low_contrast() == []


def test_protocol_in_the_browser_matches_the_reference(daemon, page):
    page.driver.get(base_url(daemon) + "/app/")
    # RFC 8032 test 1, the key of the test vectors in docs/device-api.rst.
    seed = bytes.fromhex("9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60")
    pkcs8 = bytes.fromhex("302e020100300506032b657004220420") + seed
    got = run_js(page.driver, """
        const p = await import('/app/protocol.js');
        const key = await crypto.subtle.importKey('pkcs8', p.b64urlDecode(args[0]),
          { name: 'Ed25519' }, false, ['sign']);
        const digest = await p.tokenDigest('q3Jd0l6X7c1v0nZkq8mWn2bB0yQ5cH3tR9sLwE4aF1U');
        const publicKey = 'ed25519:11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo';
        const messages = [
          p.enrollMessage(digest, publicKey, 1700000000),
          p.pollMessage('Xq7pD2mVtY1kLs9wB4nR0g', 1700000000, 'mN3bV5cX7zL9kJ1hG2fD4s'),
          p.answerMessage('Xq7pD2mVtY1kLs9wB4nR0g', 'T0pQ9rS8uV7wX6yZ5aB4cA', 'approve',
                          1700000005)];
        const signatures = [];
        for (const m of messages) signatures.push(await p.sign('ed25519', key, m));
        return { digest, messages, signatures };""", proto.b64url_encode(pkcs8))
    assert got["digest"] == "eb1ed448be9e152932627eabb95471c36358f15d894eeda538bb7ee1ef1b8323"
    assert got["messages"] == [
        proto.enroll_message(got["digest"], "ed25519:11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo",
                             1700000000).decode(),
        proto.poll_message("Xq7pD2mVtY1kLs9wB4nR0g", 1700000000, "mN3bV5cX7zL9kJ1hG2fD4s")
        .decode(),
        proto.answer_message("Xq7pD2mVtY1kLs9wB4nR0g", "T0pQ9rS8uV7wX6yZ5aB4cA", "approve",
                             1700000005).decode(),
    ]
    assert got["signatures"] == [
        "etAaZBEKiTFkuJnPuUXMZP29wuLKumE4GJxJBnXiURjQpE4Rrfa6itUIAKvuNkqfhd2xsl4yY_09dLhoi8U5BA",
        "LjAiU9ZVMiHwZI7ttxFxn75X8QnljnekLhcqUDdpPCPhQ_Zs79FPtYvWuOkzWctnqve5OMtZtgU7sVkLGJqrDQ",
        "WuXIRMoWjvcqEx0C38ZbyoctgV6quUFGRSvco0_gv7Gg3nDo5wzw-rC8NZ_RqscxfpD2Xt1o_dCI7XiYCfDNCw",
    ]

    # P-256: WebCrypto's r || s becomes the one minimal DER the server takes.
    edges = [bytes(32), b"\x00" * 31 + b"\x01", b"\x7f" + b"\xff" * 31, b"\x80" + bytes(31),
             b"\x00\x80" + bytes(30), b"\x00\x00\x7f" + b"\x01" * 29]
    pairs = [(r, s) for r in edges for s in edges[1:3]]
    ders = run_js(page.driver, """
        const p = await import('/app/protocol.js');
        return args[0].map((hex) => p.b64urlEncode(p.derSignature(
          Uint8Array.from(hex.match(/../g), (h) => parseInt(h, 16)))));""",
                  [(r + s).hex() for r, s in pairs])
    assert ders == [proto.b64url_encode(encode_dss_signature(int.from_bytes(r, "big"),
                                                             int.from_bytes(s, "big")))
                    for r, s in pairs]
    signed = run_js(page.driver, """
        const p = await import('/app/protocol.js');
        const key = await p.createKey('p256');
        const message = p.pollMessage('Xq7pD2mVtY1kLs9wB4nR0g', 1700000000,
                                      'mN3bV5cX7zL9kJ1hG2fD4s');
        const signatures = [];
        for (let i = 0; i < 20; i++) signatures.push(await p.sign('p256', key.privateKey, message));
        return { publicKey: key.publicKey, signatures };""")
    public_key = proto.load_public_key(signed["publicKey"])
    message = proto.poll_message("Xq7pD2mVtY1kLs9wB4nR0g", 1700000000, "mN3bV5cX7zL9kJ1hG2fD4s")
    assert all(proto.verify(public_key, message, s) for s in signed["signatures"])

    # A browser without Ed25519 enrolls a P-256 key, and it approves.
    token = enrollment_url(daemon, "alice").rsplit("/", 1)[1]
    enrolled = run_js(page.driver, """
        const { enrollThisBrowser } = await import('/app/enrollment.js');
        return enrollThisBrowser(args[0], () => {}, null, 'p256');""", token)
    assert enrolled["user"] == "alice"
    assert "p256" in daemon.cli("device", "list", "alice").stdout
    page.driver.refresh()
    login = Login(daemon, "alice", PASSWORD, *NAS)
    page.press(page.wait_for_signin(), "Approve")
    assert login.reply().code == "Access-Accept"


def test_the_sign_in_page_has_strict_headers_everywhere(daemon):
    import urllib.request
    url = enrollment_url(daemon, "alice")
    for path in (url, base_url(daemon) + "/app/"):
        request = urllib.request.Request(path, headers={"Accept": "text/html"})
        with urllib.request.urlopen(request, timeout=10) as response:
            csp = response.headers["Content-Security-Policy"]
            assert "script-src 'self'" in csp and "unsafe-inline" not in csp
            assert b"<script>" not in response.read()


webpush_missing = importlib.util.find_spec("mfaserver.gateways.webpush") is None


@pytest.mark.skipif(webpush_missing, reason="Web Push wake-ups are not in this tree yet")
def test_web_push_subscription_at_enrollment(tmp_path, web_port, page):
    daemon = start(tmp_path, web_port, users=("alice", "bob", "carol"), notify="webpush")
    try:
        origin = base_url(daemon)
        page.driver.get(origin + "/app/settings.json")
        vapid = json.loads(page.driver.find_element(By.TAG_NAME, "body").text)
        key = base64.urlsafe_b64decode(vapid["vapid_public_key"] + "==")
        assert len(key) == 65 and key[0] == 4

        # Notifications refused (headless Chromium's default): enrolled all the same.
        said = page.enroll(enrollment_url(daemon, "alice"))
        assert "Notifications are not allowed. Keep the authenticator open" in said
        assert "webpush" not in daemon.cli("device", "list", "alice").stdout

        # Allowed, but the browser cannot subscribe: enrolled all the same.
        page.driver.execute_cdp_cmd("Browser.grantPermissions", {
            "origin": origin, "permissions": ["notifications"]})
        failing = page.driver.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument", {
            "source": "PushManager.prototype.subscribe = async () => {"
                      " throw new DOMException('push service error', 'AbortError'); };"})
        said = page.start_enrollment(enrollment_url(daemon, "carol"))
        assert said == ("This phone is now enrolled for carol. This browser could not subscribe"
                        " to notifications (push service error). Keep the authenticator open"
                        " to see sign-ins.")
        assert "webpush" not in daemon.cli("device", "list", "carol").stdout
        # The enrollment page opens the app a few seconds after it says so; let it,
        # or that navigation may replace the next link's page under the test.
        page.wait(lambda d: d.current_url.endswith("/app/"), message="the app did not open")
        page.driver.execute_cdp_cmd("Page.removeScriptToEvaluateOnNewDocument", failing)

        # Allowed: the subscription goes in notify. (Headless Chromium has no push
        # service, so the page is handed a subscription as a browser's would be.)
        point = ec.generate_private_key(ec.SECP256R1()).public_key().public_bytes(
            Encoding.X962, PublicFormat.UncompressedPoint)
        page.driver.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument", {"source": """
            const point = Uint8Array.from(POINT).buffer;
            PushManager.prototype.subscribe = async () => ({
              endpoint: 'https://push.example.net/send/abc',
              getKey: (name) => (name === 'p256dh' ? point : new Uint8Array(16).fill(7).buffer),
            });
            const realFetch = window.fetch;
            window.sent = [];
            window.fetch = (url, init) => {
              if (init && init.body) window.sent.push(JSON.parse(init.body));
              return realFetch(url, init);
            };""".replace("POINT", json.dumps(list(point)))})
        said = page.start_enrollment(enrollment_url(daemon, "bob"))
        sent = page.driver.execute_script("return window.sent")
        assert len(sent) == 1, (said, sent)
        assert sent[-1]["notify"] == {
            "type": "webpush", "url": "https://push.example.net/send/abc",
            "keys": {"p256dh": proto.b64url_encode(point),
                     "auth": proto.b64url_encode(bytes([7]) * 16)}}
        assert said == ("This phone is now enrolled for bob. This phone will be notified of"
                        " sign-ins.")
        assert "webpush" in daemon.cli("device", "list", "bob").stdout

        # The worker shows a wake-up as "A sign-in needs you", and nothing else.
        page.wait(lambda d: d.current_url.endswith("/app/"))
        shown = deliver_push(page)
        assert shown == [{"title": "A sign-in needs you", "body": ""}]

        # iOS Safari outside the Home Screen: the step that notifications need.
        page.driver.execute_cdp_cmd("Emulation.setUserAgentOverride", {"userAgent": (
            "Mozilla/5.0 (iPhone; CPU iPhone OS 17_4 like Mac OS X) AppleWebKit/605.1.15"
            " (KHTML, like Gecko) Version/17.4 Mobile/15E148 Safari/604.1")})
        page.open_link(enrollment_url(daemon, "alice"))
        section = page.driver.find_element(By.ID, "home-screen")
        page.wait(lambda d: section.is_displayed())
        assert "Add to Home Screen" in section.text
        page.driver.execute_script("arguments[0].scrollIntoView()", section)
        page.shot("15-ios-home-screen")
    finally:
        stop_daemon(daemon)


def deliver_push(page) -> list[dict]:
    """Send the service worker a push (as the push service would), and return the
    notifications it then shows."""
    driver = page.driver
    origin = driver.execute_script("return location.origin")
    driver.execute_cdp_cmd("ServiceWorker.enable", {})
    for registration_id in range(10):     # Chromium numbers them per profile
        try:
            driver.execute_cdp_cmd("ServiceWorker.deliverPushMessage", {
                "origin": origin, "registrationId": str(registration_id), "data": "wake"})
            break
        except Exception:
            continue
    else:
        raise AssertionError("no service worker registration took the push")
    time.sleep(1)
    return run_js(driver, """
        const registration = await navigator.serviceWorker.ready;
        const shown = await registration.getNotifications();
        return shown.map((n) => ({ title: n.title, body: n.body }));""")
