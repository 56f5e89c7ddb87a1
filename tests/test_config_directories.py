"""Config sections for directories (LDAP, upstream RADIUS, sync) and reply rules."""

from __future__ import annotations

from pathlib import Path

import pytest

from mfaserver import config

CLIENT = """
[[radius.clients]]
name = "vpn"
address = "127.0.0.1"
secret = "0123456789abcdef0123"
"""

LDAP = """
[directory.ldap]
servers = ["ldap://127.0.0.1:389"]
base_dn = "dc=example,dc=org"
bind_dn = "cn=svc,dc=example,dc=org"
bind_password = "svc-password"
"""


def load(tmp_path: Path, text: str) -> config.Config:
    path = tmp_path / "mfaserver.toml"
    path.write_text(CLIENT + text)
    return config.load_config(path)


def error(tmp_path: Path, text: str) -> str:
    with pytest.raises(config.ConfigError) as e:
        load(tmp_path, text)
    return str(e.value)


def test_ldap_backend_needs_its_section(tmp_path):
    assert "[directory.ldap] is required" in error(tmp_path, '[directory]\nbackend = "ldap"\n')


def test_ldap_section_is_read_with_defaults(tmp_path):
    c = load(tmp_path, '[directory]\nbackend = ["ldap", "local"]\n' + LDAP)
    ldap = c.directory.ldap
    assert c.directory.backends == ("ldap", "local")
    assert ldap.servers == ("ldap://127.0.0.1:389",)
    assert (ldap.user_filter, ldap.username_attribute, ldap.timeout) == ("(uid={username})",
                                                                         "uid", 5.0)
    assert "svc-password" not in repr(c)


def test_clear_text_ldap_to_another_host_is_refused_unless_allowed(tmp_path):
    remote = LDAP.replace("ldap://127.0.0.1:389", "ldap://dc1.example.org")
    message = error(tmp_path, remote)
    assert "directory.ldap.servers" in message and "clear text" in message
    assert load(tmp_path, remote.replace("[directory.ldap]\n",
                                         "[directory.ldap]\nstart_tls = true\n"))
    assert load(tmp_path, remote.replace("[directory.ldap]\n",
                                         "[directory.ldap]\nallow_plaintext = true\n"))
    assert load(tmp_path, remote.replace("ldap://", "ldaps://"))


def test_bind_dn_needs_a_password(tmp_path):
    text = LDAP.replace('bind_password = "svc-password"\n', "")
    assert "bind_password" in error(tmp_path, text)


def test_bind_password_file_is_read(tmp_path):
    (tmp_path / "pw").write_text("from-file\n")
    c = load(tmp_path, LDAP.replace('bind_password = "svc-password"',
                                    'bind_password_file = "pw"'))
    assert c.directory.ldap.bind_password == "from-file"


def test_user_filter_must_hold_the_placeholder(tmp_path):
    assert "{username}" in error(tmp_path, LDAP + 'user_filter = "(uid=alice)"\n')


def test_bad_ldap_url_is_refused(tmp_path):
    assert "ldap://" in error(tmp_path, LDAP.replace("ldap://127.0.0.1:389", "http://x"))


def test_upstream_radius_servers_and_pass_through(tmp_path):
    c = load(tmp_path, """
[directory]
backend = "radius"
[directory.radius]
servers = ["127.0.0.1:18120", "::1", "[::1]:1645", "nps.example.org"]
secret = "upstream-secret-0123456789"
pass_through = ["Class", "Filter-Id"]
""")
    r = c.directory.radius
    assert r.servers == (("127.0.0.1", 18120), ("::1", 1812), ("::1", 1645),
                         ("nps.example.org", 1812))
    assert r.pass_through == ("Class", "Filter-Id")
    assert r.secret == b"upstream-secret-0123456789"


def test_unknown_pass_through_attribute_is_refused(tmp_path):
    message = error(tmp_path, """
[directory.radius]
servers = ["127.0.0.1"]
secret = "upstream-secret-0123456789"
pass_through = ["User-Password"]
""")
    assert "directory.radius.pass_through" in message and "User-Password" in message


def test_reply_rules_are_normalised_and_checked(tmp_path):
    c = load(tmp_path, """
[[radius.reply]]
group = "CN=VPN Admins,OU=Groups,DC=example,DC=org"
attributes = { Filter-Id = "admins", Session-Timeout = 3600 }
""")
    [rule] = c.radius.reply
    assert rule.group == "cn=vpn admins,ou=groups,dc=example,dc=org"
    assert rule.attributes == (("Filter-Id", "admins"), ("Session-Timeout", "3600"))
    assert "not a reply attribute" in error(tmp_path, """
[[radius.reply]]
group = "cn=x"
attributes = { User-Password = "x" }
""")
    assert "Session-Timeout" in error(tmp_path, """
[[radius.reply]]
group = "cn=x"
attributes = { Session-Timeout = "soon" }
""")


def test_sync_defaults(tmp_path):
    c = load(tmp_path, "")
    assert c.directory.sync == config.SyncConfig(interval=0, keep_days=30, filter="")


def test_web_section_is_checked_at_load(tmp_path):
    c = load(tmp_path, '[web]\nport = 18443\npublic_url = "https://mfa.example.org:8443"\n')
    assert (c.web.listen, c.web.port) == ("127.0.0.1", 18443)
    message = error(tmp_path, '[web]\nlisten = "0.0.0.0"\n')
    assert "web.tls_certificate" in message


def test_no_web_section_no_listener(tmp_path):
    assert load(tmp_path, "").web is None
